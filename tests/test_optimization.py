import math

import pytest
import torch
from conftest import tiny_params
from test_train import run_tiny

from nblib import data, model
from nblib.setup import hardware, params
from nblib.training import checkpoint, loop, loss, optimization


def test_weight_decay_only_on_matrices(tiny_config):
    net = model.build(tiny_config.model, data.prepare(tiny_config).tokenizer)
    opt = optimization.build_optimizer(net, tiny_config)
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0




@pytest.fixture
def nan_on_steps(monkeypatch):
    """Poison the hidden states (and so the logits) of the training forward passes that belong to
    the given (1-based) steps."""
    from transformers import GPT2Model
    forward = GPT2Model.forward

    def install(bad_steps, micro_per_step):
        calls = {"n": 0}

        def patched(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            if self.training:
                calls["n"] += 1
                if (calls["n"] - 1) // micro_per_step + 1 in bad_steps:
                    out.last_hidden_state = out.last_hidden_state * float("nan")
            return out

        monkeypatch.setattr(GPT2Model, "forward", patched)
    return install


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_nan_loss_skips_the_update_and_is_counted(tiny_config, nan_on_steps, precision):
    from dataclasses import replace
    cfg = replace(tiny_config, train=replace(tiny_config.train, precision=precision))
    nan_on_steps({3, 4}, micro_per_step=cfg.train.gradient_accumulation_steps)
    result, net = run_tiny(cfg)
    s = result.state
    assert result.stop_reason is loop.StopReason.COMPLETED and s.step == 12
    assert s.skipped_steps == 2 and math.isnan(s.step_losses[2]) and math.isnan(s.step_losses[3])
    assert result.history[0].skipped_steps == 2
    assert model.weights_are_finite(net)


def test_an_fp16_overflow_is_skipped_by_the_scaler_without_counting_as_a_bad_loss(tiny_config):
    """A real overflow: a loss scale of 2**60 makes the fp16 backward overflow. The GradScaler skips
    the update and halves the scale; the loss was finite, so no bad-loss streak begins."""
    corpus = data.prepare(tiny_config)
    device = hardware.detect("fp16")
    net = model.build(tiny_config.model, corpus.tokenizer)
    state = optimization.new_state(tiny_config, device, net, steps=12)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = optimization.optimizer_step(state, corpus.blocks("train")[:8], device, max_grad_norm=1.0)
    assert math.isfinite(stats.loss) and not math.isfinite(stats.grad_norm)
    assert not stats.applied and not stats.bad_loss
    assert state.scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    state.scaler = torch.amp.GradScaler("cpu")  # an ordinary scale: the next step trains
    assert optimization.optimizer_step(state, corpus.blocks("train")[8:16], device, max_grad_norm=1.0).applied


def test_a_streak_of_bad_losses_stops_with_the_last_good_weights(tmp_path, wikitext_file, tokenizer_dir, nan_on_steps):
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                                     max_steps=40, max_bad_steps=5, save_steps=100, eval_steps=2))
    nan_on_steps(set(range(4, 100)), micro_per_step=cfg.train.gradient_accumulation_steps)
    result, net = run_tiny(cfg)
    assert result.stop_reason is loop.StopReason.BAD_LOSS and result.state.step == 3 + 5
    assert "lower learning_rate" in result.describe()
    with pytest.raises(RuntimeError, match="non-finite loss"):
        result.raise_if_failed()
    emergency = checkpoint.load(cfg.output_dir / checkpoint.EMERGENCY)
    assert all(torch.isfinite(t).all() for t in emergency["model_state_dict"].values())
    best = checkpoint.load(cfg.output_dir / checkpoint.BEST_MODEL)
    assert best["step"] <= 4 and math.isfinite(best["val_loss"])  # steps 4+ changed nothing


def test_torch_compile_trains_the_same_and_saves_plain_keys(tmp_path, wikitext_file, tokenizer_dir):
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), max_steps=8)
    plain, _ = run_tiny(params.resolve({**base, "output_dir": str(tmp_path / "plain")}))
    compiled, _ = run_tiny(params.resolve({**base, "output_dir": str(tmp_path / "compiled"), "torch_compile": True}))
    assert compiled.state.compiled._orig_mod is compiled.state.model.transformer  # the body; the model stays plain
    assert loss._compiled_piece.cache_info().currsize >= 1  # the chunked loss's pieces too
    for a, b in zip(plain.state.step_losses, compiled.state.step_losses):
        assert a == pytest.approx(b, rel=1e-5)
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "compiled" / "checkpoints")[-1][1])
    assert not any(k.startswith("_orig_mod.") for k in saved["model_state_dict"])


def test_evaluation_and_sampling_never_enter_the_compiled_training_graphs(tmp_path, wikitext_file, tokenizer_dir,
                                                                          monkeypatch):
    """Each would recompile the body (no_grad; a KV cache without autocast), and past torch's
    limit of 8 recompiles torch silently runs eager: seven graphs were seen after one step, one
    OOM back-off, one evaluation and two prompts. The compiler's own backend is swapped for
    "eager" (the same graphs and guards, without code generation)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(loss, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    compiled_during = []  # new graphs per evaluation and per sampling

    def counting(function):
        def spy(*args, **kwargs):
            before = counters["stats"]["unique_graphs"]
            value = function(*args, **kwargs)
            compiled_during.append((function.__name__, counters["stats"]["unique_graphs"] - before))
            return value
        return spy

    monkeypatch.setattr(loop, "evaluate", counting(loop.evaluate))
    monkeypatch.setattr(loop.generate, "samples", counting(loop.generate.samples))
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                                     max_steps=6, eval_steps=3, torch_compile=True,
                                     prompts=["the river", "a song of"]))
    result, _ = run_tiny(cfg)
    assert result.state.step == 6
    assert [name for name, _ in compiled_during] == ["evaluate", "samples"] * 2
    assert all(new == 0 for _, new in compiled_during), compiled_during
    assert 1 <= counters["stats"]["unique_graphs"] <= 4  # training's own: the body and the loss's piece


@pytest.fixture
def one_rank_process_group():
    """This process as a data-parallel worker of a world of one: the workers' code path, in-process."""
    import torch.distributed as dist

    from nblib.training import launch
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{launch._free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def count_calls(monkeypatch, module, name) -> list:
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("in_worker", [False, True])
def test_host_synchronisations_and_all_reduces_per_optimizer_step(tiny_config, monkeypatch, request, in_worker):
    """As optimizer_step's comment says: 1 host sync a step on one process; in a worker 3 (the
    stop and OOM agreements too), and the gradients cross ranks in one flat all-reduce for this
    small model (before: one all-reduce per parameter, 12 here)."""
    import torch.distributed as dist

    from nblib.training import collectives
    if in_worker:
        request.getfixturevalue("one_rank_process_group")
    syncs = count_calls(monkeypatch, collectives, "to_host")
    reduces = count_calls(monkeypatch, dist, "all_reduce")
    result, _ = run_tiny(tiny_config)  # 12 steps
    steps = result.state.step
    assert len(syncs) == (3 if in_worker else 1) * steps
    # per step in a worker: the stop and OOM agreements, the loss's mean, and the gradients' one bucket
    assert len(reduces) == (4 * steps if in_worker else 0)


def test_the_guides_gradients_cross_ranks_in_two_buckets(tokenizer_dir):
    from nblib.training import collectives
    cfg = params.resolve(dict(preset="kaggle-t4", tokenizer=str(tokenizer_dir), vocab_size=50257, dataset="unused"))
    from transformers import AutoTokenizer
    net = model.build(cfg.model, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    sizes = [sum(p.numel() * 4 for p in bucket) / 2**20 for bucket in collectives.buckets(list(net.parameters()))]
    print(f"buckets of the guide's fp32 gradients (MB): {[round(s, 1) for s in sizes]}")
    assert len(sizes) == 2 and sum(sizes) == pytest.approx(19.32e6 * 4 / 2**20, rel=0.01)


def test_torch_compile_is_refused_on_a_gpu_below_7_0():
    device = hardware.Device(torch.device("cpu"), "fp32", gpu_name="Tesla P100", compute_capability=(6, 0))
    object.__setattr__(device, "device", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="torch_compile=True: torch.compile needs compute capability 7.0"):
        optimization.compiled_forward(torch.nn.Linear(1, 1), device)
