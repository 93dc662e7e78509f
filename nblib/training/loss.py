"""The language-modelling loss: token blocks to inputs and targets, and the cross-entropy over them.

The LM head is most of a small GPT-2's work and memory: for the guide's micro-batch the (B, T, V)
logits are 412 MB in fp16 and twice that as the fp32 copy a plain cross-entropy takes. So the loss
is computed chunk by chunk over the tokens (the idea of Liger Kernel's fused linear cross-entropy
and Apple's Cut Cross-Entropy, in plain PyTorch so that it runs on a T4 and a CPU alike): each
chunk's logits, loss and gradients are made and freed in turn, and the full logits never exist.
The model stays a plain GPT2LMHeadModel; only how its loss is computed changes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from nblib.setup.hardware import Device

CHUNK_ELEMENTS = 2**25  # logits per chunk, in the matmul dtype (64 MB in bf16: 667 GPT-2 tokens)
PIECE_ELEMENTS = 2**21  # on a CPU, logits per softmax piece (8 MB in fp32), so the fp32 work stays in cache
COMPILE_BACKEND = "inductor"  # torch.compile's default (the tests use "eager")
IGNORE_INDEX = -100  # a target that carries no loss (transformers' and torch's convention)


def to_batch(blocks: np.ndarray, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token blocks, or (B, 2, T+1) tokens and labels (data.Blocks of conversations)
    -> inputs and targets, each (B, T) int64 on the device."""
    tokens = torch.from_numpy(blocks.astype(np.int64))
    if device.is_cuda:
        tokens = tokens.pin_memory().to(device.device, non_blocking=True)
    if tokens.dim() == 3:
        return tokens[:, 0, :-1], tokens[:, 1, 1:]
    return tokens[:, :-1], tokens[:, 1:]


def counted_targets(blocks: np.ndarray) -> int:
    """How many of the blocks' targets carry loss (all, unless labels mark some IGNORE_INDEX)."""
    if blocks.ndim == 3:
        return int(np.count_nonzero(blocks[:, 1, 1:] != IGNORE_INDEX))
    return blocks.shape[0] * (blocks.shape[1] - 1)


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: Device,
            reduction: str = "mean", compiled: torch.nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy of the next-token predictions, "mean" or "sum" over the tokens whose target
    is not IGNORE_INDEX. A plain GPT-2 goes through the chunked head; any other model through
    its own logits. `compiled`: what optimization.compiled_forward made of the model (a plain
    GPT-2's body, or the whole model), called in its place; training passes it, evaluation not."""
    head = chunkable_head(model)
    forward = compiled if compiled is not None else head.transformer if head is not None else model
    with device.autocast():
        if head is not None:
            hidden = forward(input_ids=inputs, use_cache=False).last_hidden_state
            total = linear_cross_entropy(hidden.flatten(0, 1), head.lm_head.weight, targets.flatten(),
                                         compiled is not None)
        else:
            logits = forward(input_ids=inputs, use_cache=False).logits  # no KV cache in training
            total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                                    ignore_index=IGNORE_INDEX)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else total


def chunkable_head(model: torch.nn.Module) -> GPT2LMHeadModel | None:
    """The plain GPT-2 whose hidden states and tied head the chunked loss can take, or None."""
    return model if type(model) is GPT2LMHeadModel and model.lm_head.bias is None else None


def compile_for_training(target):
    """`target` under torch.compile with COMPILE_BACKEND."""
    return torch.compile(target, backend=COMPILE_BACKEND)


@functools.cache
def _compiled_piece(backend: str):
    """_cross_entropy_piece under torch.compile, for a model whose body is compiled: one fused
    kernel for what is otherwise a softmax, two reductions, a gather and a copy."""
    return torch.compile(_cross_entropy_piece, dynamic=True, backend=backend)


def sizes(vocab: int, device_type: str) -> tuple[int, int]:
    """Rows of logits per chunk and per softmax piece. On a CPU the pieces are cache-sized; on a
    GPU a chunk is one piece, since each piece is a dozen small kernels (41-row pieces at
    V=50304 would be over a thousand launches per micro-batch of 4,096 tokens)."""
    chunk = max(16, CHUNK_ELEMENTS // vocab)
    return chunk, min(chunk, max(16, PIECE_ELEMENTS // vocab)) if device_type == "cpu" else chunk


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         compiled: bool = False, device_type: str | None = None) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), targets of IGNORE_INDEX
    skipped, without the (N, V) logits:
    `hidden` (N, C), `weight` (V, C), `targets` (N,). Matmuls in the autocast dtype, the
    softmax in fp32, as the plain path does; `compiled`: its pieces under torch.compile;
    `device_type`: whose chunk and piece sizes to use (default: the tensors' device's)."""
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    chunk, piece = sizes(weight.shape[0], device_type or kind)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # not in evaluation
    piece_loss = _compiled_piece(COMPILE_BACKEND) if compiled else _cross_entropy_piece
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, piece, dtype, grads, piece_loss)


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and both gradients (for the hidden states and the tied weight) are computed in
    the forward pass, a chunk of tokens at a time; backward only scales them, in fp32. Each
    chunk's logits are one matmul; the softmax goes over them a piece at a time and leaves the
    gradient of the logits in their place, for two more matmuls."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, piece, dtype, grads, piece_loss):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if grads else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                logits = h @ w.T
                for row in range(0, len(t), piece):
                    total += piece_loss(logits[row:row + piece], t[row:row + piece], grads)
                if grads:  # the logits now hold d loss / d logits, but for ignored targets' rows
                    counted = (t != IGNORE_INDEX)[:, None].to(dtype)
                    grad_hidden[start:start + chunk] = (logits @ w) * counted
                    grad_weight += matmul_fp32(logits.T, h * counted)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden.float() * grad_output).to(ctx.hidden_dtype), grad_weight * grad_output, *[None] * 6


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. With fp16/bf16 inputs on CUDA the product is written in fp32 by the matmul
    itself (out_dtype), so the partial sums are never rounded to 16 bits; CPU kernels have no
    such output (a 16-bit product is widened after), and an fp32 matmul there costs several
    times more."""
    if a.dtype != torch.float32 and _has_fp32_output(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


@functools.cache
def _has_fp32_output(device_type: str) -> bool:
    """Whether this torch has a 16-bit matmul with an fp32 output on `device_type` (CUDA, torch 2.8+)."""
    probe = torch.ones(2, 2, dtype=torch.float16, device=device_type)
    try:
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _cross_entropy_piece(logits: torch.Tensor, targets: torch.Tensor, grads: bool) -> torch.Tensor:
    """The summed cross-entropy of these rows; with `grads`, the logits are overwritten by its
    gradient, softmax - one-hot. One fused fp32 softmax gives both: at each row's largest logit
    the probability is 1 / sum(exp(logits - max)) >= 1 / V, so log-sum-exp = max - log(that
    probability) never underflows."""
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    rows = torch.arange(len(targets), device=targets.device)
    counted = targets != IGNORE_INDEX
    picked = targets.clamp(min=0)  # any row for an ignored target: its terms are zeroed
    log_total = logits.amax(dim=-1).float() - probabilities.amax(dim=-1).log()
    total = ((log_total - logits[rows, picked].float()) * counted).sum()
    if grads:
        probabilities[rows, picked] -= counted.float()  # an ignored row's: zeroed by the caller
        logits.copy_(probabilities)
    return total
