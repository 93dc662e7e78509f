"""Tiny generated data and configs: no network, no files from outside the repository."""
from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest

from nblib.data import tokenizer
from nblib.setup import config, params

# Set by .ci/run where the optional packages are installed on purpose: a missing one fails there.
REQUIRE_OPTIONAL = os.environ.get("NBLIB_REQUIRE_OPTIONAL") == "1"
# "compat", set by .ci/run in Kaggle's and the oldest environment: the fast tests and the slow ones
# marked compat (what differs between library versions); unset, every test.
TIER = os.environ.get("NBLIB_TEST_TIER", "all")


def pytest_collection_modifyitems(config, items):
    """In the compat tier, deselect the slow tests not marked compat (pytest reports how many)."""
    if TIER != "compat":
        return
    dropped = [item for item in items if item.get_closest_marker("slow") and not item.get_closest_marker("compat")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def needs(package: str) -> pytest.MarkDecorator:
    """Skip a test of an optional package (peft, tensorboard) where it is not installed, except
    in the environment that installs it on purpose, where its absence fails the test."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing and not REQUIRE_OPTIONAL, reason=f"{package} is optional and not installed")


WORDS = ("the river city was built in north old king wrote a song of stone and light "
         "people came to see new bridge over water during year first war ended").split()


def sentences(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + " ."
                    for _ in range(n))


def wikitext_lines(n_articles: int, seed: int = 0) -> list[str]:
    """Rows in WikiText's raw layout: blank lines, ' = Title = ', ' = = Section = = ', paragraphs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_articles):
        rows += [" \n", f" = Article {i} = \n", " \n", f" {sentences(rng, 4)} \n", " \n",
                 " = = History = = \n", " \n", f" {sentences(rng, 3)} \n"]
    return rows


@pytest.fixture(scope="session")
def wikitext_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wiki") / "wiki.train.txt"
    path.write_text("".join(wikitext_lines(60)))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A saved GPT-2-style tokenizer directory: the local stand-in for the Hub's 'gpt2'."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tok = tokenizer.train_bpe(["".join(wikitext_lines(30, seed=1))] * 3, vocab_size=300)
    tok.save_pretrained(str(directory))
    return directory


def tiny_params(tmp_path: Path, **overrides) -> dict:
    """Parameters for a model and run small enough for a unit test."""
    params = dict(preset="smoke", output_dir=str(tmp_path / "run"), n_positions=32, n_embd=32,
                  n_layer=1, n_head=2, n_inner=64, max_length=16, batch_size=4,
                  gradient_accumulation_steps=2, max_steps=12, warmup_steps=2, save_steps=4,
                  eval_steps=4, max_checkpoints=2, precision="fp32", resume_from_checkpoint="")
    params.update(overrides)
    return params


@pytest.fixture
def tiny_config(tmp_path, wikitext_file, tokenizer_dir) -> config.RunConfig:
    return params.resolve(tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir)))


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny GPT-2 saved in Hugging Face format with its tokenizer: the local stand-in for
    init_from='gpt2' (a previous run's final_model has the same layout)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("pretrained")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
                    ).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture
def moves(monkeypatch) -> list:
    """Every call in this process that moves or casts a whole module: (module, method, args).
    On a CPU a move to the CPU changes nothing visible, so the tests look at the calls."""
    import torch

    calls = []

    def spying(name: str):
        original = getattr(torch.nn.Module, name)

        def spy(self, *args, **kwargs):
            calls.append((self, name, args))
            return original(self, *args, **kwargs)
        return spy

    for name in ("to", "cpu", "cuda", "half", "float", "bfloat16"):
        monkeypatch.setattr(torch.nn.Module, name, spying(name))
    return calls


HIDE_INSTALLED_NBLIB = """import os, sys
# As on Kaggle, where nblib is not installed: the editable install of this checkout is hidden.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "nblib"))]
"""

FAKE_CLOCK = """import functools, sys, time
from nblib.training import stopping
# The time budget's clock: from this process's start, each reading a second later (two on
# data-parallel rank 0, whose budget then runs out first), so no test waits for real time.
_now = [time.time()]

def _clock():
    distributed = sys.modules.get("torch.distributed")
    rank_0 = distributed is not None and distributed.is_initialized() and distributed.get_rank() == 0
    _now[0] += 2.0 if rank_0 else 1.0
    return _now[0]

stopping.TimeBudget = functools.partial(stopping.TimeBudget, clock=_clock)
"""


def sitecustomize(tmp_path: Path, monkeypatch, code: str) -> None:
    """Run `code` at the start of every Python process started from here on: notebook kernels
    and data-parallel workers, which a monkeypatch in this process cannot reach."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))


def hide_installed_nblib(tmp_path: Path, monkeypatch) -> None:
    """Python processes started from here on (notebook kernels too) cannot import nblib."""
    sitecustomize(tmp_path, monkeypatch, HIDE_INSTALLED_NBLIB)


def fake_clock(tmp_path: Path, monkeypatch) -> None:
    """Python processes started from here on read the time budget's clock from FAKE_CLOCK."""
    sitecustomize(tmp_path, monkeypatch, FAKE_CLOCK)
