"""What goes out with the model: the model card in every `final_model/`, and the optional upload
of that folder to Kaggle Models (`upload_to`)."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

from nblib import console, files, history
from nblib.export import gguf_file
from nblib.setup.config import RunConfig

log = logging.getLogger(__name__)

HANDLE_PARTS = ("owner", "model", "framework", "variation")  # kagglehub's unversioned model handle
CARD = "README.md"
CONFIG_COPY = "training_config.json"
CURVES = "training_curves.png"
LICENSE = "Apache 2.0"


def handle_problems(upload_to: str) -> list[str]:
    """An `upload_to` that is not a Kaggle Models handle, or kagglehub missing (checked at setup)."""
    if not upload_to:
        return []
    parts = upload_to.split("/")
    if len(parts) != len(HANDLE_PARTS) or not all(parts):
        return [f"upload_to={upload_to!r}: a Kaggle Models handle is {'/'.join(HANDLE_PARTS)}, e.g. "
                "'yourname/gpt2-wikitext/transformers/default' (\"\": no upload)"]
    if importlib.util.find_spec("kagglehub") is None:
        return [f"upload_to={upload_to!r}: uploading needs the kagglehub package (pip install kagglehub; "
                "Kaggle's notebooks have it), or set upload_to=''"]
    return []


def write_card(model_dir: Path, cfg: RunConfig, chat: bool = False) -> Path:
    """`model_dir/README.md`: what the model is, what it was trained on (`chat`: conversations,
    with the tokenizer's chat template), how well it does and how to load it; the run's config
    and curves are copied beside it."""
    run_dir = Path(cfg.output_dir)
    for name, copy in (("run_config.json", CONFIG_COPY), (CURVES, CURVES)):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, Path(model_dir) / copy)
    measured = Path(model_dir) / gguf_file.TYPES_MEASURED
    gguf = json.loads(measured.read_text()) if measured.is_file() else {} if cfg.export_gguf else None
    text = _card(cfg, history.read(run_dir), chat, curves=(Path(model_dir) / CURVES).is_file(), gguf=gguf)
    return files.atomic_write(Path(model_dir) / CARD, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _card(cfg: RunConfig, records: list[history.Record], chat: bool, curves: bool, gguf: dict | None) -> str:
    m, d, t = cfg.model, cfg.data, cfg.train
    best, last = history.best(records), (records[-1] if records else None)
    start = f"`{m.init_from}`" if m.init_from != "scratch" else "random weights"
    source = f"`{d.dataset}`" + (f" ({d.dataset_config})" if d.dataset_config else "")
    kind = ("conversations, with the loss on the assistant's answers" if chat and d.train_on == "responses"
            else "conversations" if chat else "text")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gpt2, nblib]", "---", "",
        f"# GPT-2 ({m.n_layer} layers, n_embd {m.n_embd}, context {m.n_positions})", "",
        f"Trained with nblib from {start} on {source} ({kind}), with the tokenizer `{d.tokenizer}`.", "",
        "| | |", "|---|---|",
        f"| steps | {last.step if last else 0:,} ({last.tokens_seen if last else 0:,} tokens) |",
        f"| global batch | {t.global_batch} blocks of {t.max_length} tokens |",
        f"| peak learning rate | {t.learning_rate} |",
    ]
    if best:
        lines.append(f"| best validation loss | {best.val_loss:.4f} (perplexity {best.val_perplexity:.2f}, "
                     f"step {best.step:,}) |")
    if last and last.test_loss is not None:
        lines.append(f"| test loss | {last.test_loss:.4f} (perplexity {last.test_perplexity:.2f}) |")
    if last and last.hellaswag_accuracy is not None:
        lines.append(f"| HellaSwag ({last.hellaswag_items:,} items) | {last.hellaswag_accuracy:.4f} |")
    lines += ["", "## Use it", "", "```python", "from transformers import pipeline", "",
              'generate = pipeline("text-generation", model="path/to/this/folder")']
    lines += (['messages = [{"role": "user", "content": "Your question"}]',
               "print(generate(messages)[0][\"generated_text\"])"] if chat
              else [f"print(generate({(cfg.sampling.prompts or ('Once',))[0]!r})[0][\"generated_text\"])"])
    lines += ["```", ""]
    if gguf is not None:
        lines += _gguf_lines(cfg, gguf)
    if curves:
        lines += ["## Training curves", "", f"![loss and validation perplexity]({CURVES})", ""]
    lines += [f"The full configuration is in `{CONFIG_COPY}`.", ""]
    return "\n".join(lines)


def _gguf_lines(cfg: RunConfig, gguf: dict) -> list[str]:
    """The GGUF file, and llama.cpp's own measure of each type where it was taken at export."""
    kind = cfg.gguf_kind
    lines = [f"`{gguf_file.GGUF}` ({kind}), in this folder, runs in llama.cpp (`llama-cli -m {gguf_file.GGUF}`).", ""]
    rows = gguf.get("rows")
    if rows:
        scored = ("their answers' tokens, as the validation loss counts them" if rows[0].get("scored") == "answers"
                  else "every token")
        lines += [f"llama.cpp's perplexity on {rows[0]['blocks']} held-out validation blocks ({scored}), each "
                  "type written from this model:", "",
                  "| GGUF type | file | perplexity | tokens/s (greedy, the export's machine) |", "|---|---|---|---|"]
        lines += [f"| {r['type']}{' (this file)' if r['type'] == kind else ''} | {console.size(r['bytes'])} | "
                  f"{r['perplexity']:.3f} | {r['tokens_per_second']:,.0f} |" for r in rows]
        lines.append("")
    return lines


def upload(model_dir: Path, handle: str, notes: str = "") -> str:
    """Upload `model_dir` to Kaggle Models as a new version of `handle`; returns what happened.
    A failure (no credentials, no network) is a message, not an exception: the run's outputs
    are kept whatever the upload does."""
    import kagglehub

    try:
        kagglehub.model_upload(handle, str(model_dir), license_name=LICENSE, version_notes=notes)
    except Exception as error:  # kagglehub raises many types (HTTP, credentials, handle)
        return (f"upload_to={handle!r}: the upload failed ({type(error).__name__}: {str(error)[:200]}). "
                f"The model is safe in {model_dir}. Check the Kaggle credentials (on Kaggle: Internet on; "
                "elsewhere: KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json), then run this cell again")
    owner, model = handle.split("/")[:2]
    return f"uploaded {model_dir} to https://www.kaggle.com/models/{owner}/{model}"
