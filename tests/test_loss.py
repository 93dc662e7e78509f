"""The chunked LM-head loss equals the plain logits path, in value and in every gradient."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from nblib.setup import hardware
from nblib.training import loss


def plain_and_chunked(hidden, weight, targets, dtype, monkeypatch):
    """(loss, d hidden, d weight) by F.cross_entropy over full logits, then by the chunked loss
    in chunks of 64 tokens, softmax pieces of 20."""
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if chunked:
                monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 64 * weight.shape[0])  # 5 chunks
                monkeypatch.setattr(loss, "PIECE_ELEMENTS", 20 * weight.shape[0])  # of 4 pieces
                total = loss.linear_cross_entropy(h, w, targets)
            else:
                total = F.cross_entropy((h @ w.T).float(), targets, reduction="sum", ignore_index=-100)
        total.backward()
        results.append((total.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_the_chunked_loss_and_gradients_equal_the_plain_path(monkeypatch, dtype, tolerance):
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 32), torch.randn(1000, 32)
    targets = torch.randint(0, 1000, (300,))
    plain_run, chunked_run = plain_and_chunked(hidden, weight, targets, dtype, monkeypatch)
    (plain, plain_h, plain_w), (chunked, chunked_h, chunked_w) = plain_run, chunked_run
    assert chunked.item() == pytest.approx(plain.item(), rel=tolerance)
    for got, want in ((chunked_h, plain_h), (chunked_w, plain_w)):
        assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_a_gpt2_trains_through_the_chunked_head_as_through_its_logits(monkeypatch):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=32, n_embd=32, n_layer=2, n_head=2, eos_token_id=0,
                                       bos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    inputs, targets = torch.randint(0, 320, (4, 16)), torch.randint(0, 320, (4, 16))
    cpu = hardware.Device(torch.device("cpu"), "fp32")
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 32 * 320)  # 2 chunks over the 64 tokens,
    monkeypatch.setattr(loss, "PIECE_ELEMENTS", 10 * 320)  # each of 2 pieces
    chunked = loss.loss_of(model, inputs, targets, cpu)
    chunked.backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = F.cross_entropy(model(input_ids=inputs).logits.flatten(0, 1), targets.flatten())
    plain.backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, (name, p) in zip(chunked_grads, model.named_parameters()):
        assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-6), name


def test_evaluation_takes_the_chunked_loss_without_computing_gradients():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=32, n_embd=32, n_layer=1, n_head=2, eos_token_id=0,
                                       bos_token_id=0))
    inputs = torch.randint(0, 320, (2, 8))
    with torch.no_grad():
        total = loss.loss_of(model, inputs, inputs, hardware.Device(torch.device("cpu"), "fp32"), reduction="sum")
    assert total.grad_fn is None and total.item() > 0


def test_a_target_far_below_the_top_logit_keeps_a_finite_exact_loss(monkeypatch):
    """Its probability underflows fp32 (exp(-300)); the loss comes from the largest logit's instead."""
    hidden, weight = torch.tensor([[300.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    targets = torch.tensor([1, 2])
    plain_run, chunked_run = plain_and_chunked(hidden, weight, targets, torch.float32, monkeypatch)
    (plain, _, plain_w), (chunked, _, chunked_w) = plain_run, chunked_run
    assert torch.isfinite(chunked) and chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(chunked_w, plain_w)


def test_ignored_targets_carry_no_loss_and_no_gradient(monkeypatch):
    """Labels of -100 (a chat prompt's tokens): skipped as F.cross_entropy's ignore_index skips them."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 32), torch.randn(1000, 32)
    targets = torch.randint(0, 1000, (300,))
    targets[::3] = loss.IGNORE_INDEX
    (plain, plain_h, plain_w), (chunked, chunked_h, chunked_w) = plain_and_chunked(hidden, weight, targets,
                                                                                   torch.float32, monkeypatch)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(chunked_h, plain_h, atol=1e-5) and torch.allclose(chunked_w, plain_w, atol=1e-4)
    assert chunked_h[::3].abs().max() == 0


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched inside it: on a GPU, each is a kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_on_a_gpu_a_micro_batch_is_a_few_hundred_kernels_not_thousands():
    """The guide's micro-batch (8 x 512 tokens) at V=50304: the CPU's cache-sized pieces are 41
    rows, over a hundred pieces of a dozen kernels each; a GPU takes one piece per chunk."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(4096, 8, requires_grad=True), torch.randn(50304, 8, requires_grad=True)
    targets = torch.randint(0, 50304, (4096,))
    ops, results = {}, {}
    for device_type in ("cuda", "cpu"):
        with OpCounter() as counter:
            total = loss.linear_cross_entropy(hidden, weight, targets, device_type=device_type)
            total.backward()
        ops[device_type], results[device_type] = counter.ops, (total.item(), hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
    print(f"dispatched ops per micro-batch: {ops}")
    assert ops["cuda"] <= 300 and ops["cpu"] > 1000
    assert loss.sizes(50304, "cuda") == (667, 667) and loss.sizes(50304, "cpu") == (667, 41)
    (cuda_loss, cuda_h, cuda_w), (cpu_loss, cpu_h, cpu_w) = results["cuda"], results["cpu"]
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-6)
    assert torch.allclose(cuda_h, cpu_h, atol=1e-6) and torch.allclose(cuda_w, cpu_w, atol=1e-6)


def test_the_fp16_gradients_are_scaled_in_fp32():
    """The GradScaler's 65536 over a step's tokens times the fp16 gradient the forward pass kept:
    multiplied in fp16, the product is rounded to 11 bits before it reaches the fp32 hidden states."""
    grad_hidden = torch.full((4, 2), 0.1, dtype=torch.float16)
    ctx = SimpleNamespace(saved_tensors=(grad_hidden, torch.zeros(3, 2)), hidden_dtype=torch.float32)
    scale = torch.tensor(65536 / 3)
    d_hidden, d_weight, *_ = loss._LinearCrossEntropy.backward(ctx, scale)
    assert d_hidden.dtype == torch.float32 and torch.equal(d_hidden, grad_hidden.float() * scale)
