"""Kaggle delivery: a push-ready kernel folder with a self-contained notebook, and dataset bundles.

    python -m nblib.kaggle stage OUT            # OUT/kernel-metadata.json + the notebook
    python -m nblib.kaggle bundle OUT -f p.yaml # tokens prepared once, ready to upload
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import nbformat

from nblib import console, job

REPO = Path(__file__).resolve().parent.parent
METADATA = REPO / "kaggle-metadata.json"
NOTEBOOK = REPO / "notebooks" / "text_generation_kaggle_production.ipynb"
LANGUAGES = ("python", "r", "rmarkdown")
KERNEL_TYPES = ("script", "notebook")
BUNDLE_CELL_TAG = "nblib-embedded"


def slugify(title: str) -> str:
    """Kaggle's kernel slug for a title (python-slugify's rule for ASCII titles)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def validate_metadata(meta: dict[str, Any], folder: Path) -> list[str]:
    """The checks `kaggle kernels push` makes (kaggle-api's kernels_push), plus a title that
    slugifies to the id's slug; an empty list when the metadata would be accepted."""
    problems = [f"missing {key!r}" for key in ("id", "title", "code_file", "language", "kernel_type")
                if not meta.get(key)]
    owner, _, slug = str(meta.get("id", "")).partition("/")
    if not owner or not slug or "/" in slug:
        problems.append(f"id {meta.get('id')!r}: must be '<username>/<kernel-slug>'")
    elif len(slug) < 5:
        problems.append(f"id {meta['id']!r}: the kernel slug must be at least five characters")
    title = str(meta.get("title", ""))
    if len(title) < 5:
        problems.append(f"title {title!r}: must be at least five characters")
    elif slug and slugify(title) != slug.lower():
        problems.append(f"title {title!r} slugifies to {slugify(title)!r}, not the id's {slug!r}")
    if meta.get("code_file") and not (Path(folder) / meta["code_file"]).is_file():
        problems.append(f"code_file {meta['code_file']!r}: no such file in {folder}")
    if meta.get("language") not in LANGUAGES:
        problems.append(f"language {meta.get('language')!r}: must be one of {LANGUAGES}")
    if meta.get("kernel_type") not in KERNEL_TYPES:
        problems.append(f"kernel_type {meta.get('kernel_type')!r}: must be one of {KERNEL_TYPES}")
    problems += _source_problems(meta)
    return problems


def _source_problems(meta: dict[str, Any]) -> list[str]:
    problems = []
    for source in meta.get("dataset_sources", []):
        if len(source.split("/")) != 2 or not all(source.split("/")):
            problems.append(f"dataset_sources {source!r}: must be '<username>/<dataset-slug>'")
    for source in meta.get("kernel_sources", []):
        parts = source.split("/")
        if len(parts) != 2 or not all(parts) or len(parts[1]) < 5:
            problems.append(f"kernel_sources {source!r}: must be '<username>/<kernel-slug>', slug of 5+ characters")
    for source in meta.get("model_sources", []):
        parts = source.split("/")
        if len(parts) != 5 or not all(parts) or not parts[4].isdigit():
            problems.append(f"model_sources {source!r}: must be "
                            "'<owner>/<model>/<framework>/<variation>/<version number>'")
    return problems


def stage(out: Path) -> Path:
    """Write `out/kernel-metadata.json` and a self-contained copy of the notebook.

    Raises:
        ValueError: the metadata would be refused by `kaggle kernels push`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads(METADATA.read_text())
    meta["code_file"] = NOTEBOOK.name
    nb = embed_nblib(nbformat.read(NOTEBOOK, as_version=4))
    nb.metadata["kaggle"] = notebook_settings(meta)
    nbformat.write(nb, out / NOTEBOOK.name)
    problems = validate_metadata(meta, out)
    if problems:
        raise ValueError("kaggle-metadata.json would be refused:\n  - " + "\n  - ".join(problems))
    (out / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def notebook_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The notebook's own `kaggle` metadata, in the form Kaggle writes into the notebooks it
    exports (read from public exported notebooks), for Import Notebook, which gets no
    kernel-metadata.json. "nvidiaTeslaT4" is the GPU T4 x2 accelerator. Whether Import Notebook
    applies it could not be checked here (Kaggle is unreachable)."""
    settings = {"dataSources": [], "isGpuEnabled": bool(meta.get("enable_gpu")),
                "isInternetEnabled": bool(meta.get("enable_internet")), "language": "python",
                "sourceType": "notebook"}
    if meta.get("machine_shape") == "NvidiaTeslaT4":
        settings["accelerator"] = "nvidiaTeslaT4"
    return settings


def embed_nblib(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Insert, before the setup cell, a cell carrying nblib's sources as a zip that it unpacks
    only when `import nblib` fails (Kaggle's Import Notebook uploads this one file)."""
    archive = base64.b64encode(_nblib_zip()).decode()
    source = (
        f"# nblib {_version()}, embedded by `python -m nblib.kaggle stage`: unpacked only when it\n"
        "# is not importable (Import Notebook uploads this file alone).\n"
        "import base64, importlib.util, io, sys, tempfile, zipfile\n\n"
        f'NBLIB_ZIP = "{archive}"\n'
        "if importlib.util.find_spec('nblib') is None:\n"
        "    target = tempfile.mkdtemp(prefix='nblib-')\n"
        "    zipfile.ZipFile(io.BytesIO(base64.b64decode(NBLIB_ZIP))).extractall(target)\n"
        "    sys.path.insert(0, target)\n"
        "    print(f'unpacked the embedded nblib into {target}')")
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [BUNDLE_CELL_TAG]})
    cell["id"] = "nblib-embedded"
    setup = next(i for i, c in enumerate(nb.cells) if "import nblib" in c.source)
    nb.cells.insert(setup, cell)
    return nb


def _nblib_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((REPO / "nblib").rglob("*.py")):
            archive.write(path, f"nblib/{path.relative_to(REPO / 'nblib')}")
    return buffer.getvalue()


def _version() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(no git)"


def make_bundle(out: Path, values: dict[str, Any], dataset_id: str) -> Path:
    """Tokenize once, as the notebook's Setup and Data cells do (the same `nblib.run` stages),
    and write the bundle to `out`.

    Raises:
        console.Refusal: a bad parameter or data file, as the notebook would show it.
    """
    from nblib import run as notebook
    from nblib.data import bundle
    from nblib.setup import lock

    session = notebook.start(values)
    try:
        corpus = session.data()
        if session.stopped is not None:
            session.summary()  # raises a refusal; a dry run has nothing to bundle
            raise console.ConfigError("dry_run=True: nothing is tokenized in a dry run, so there is no bundle to write")
        return bundle.write(corpus.cache_dir, session.cfg, out, dataset_id)
    finally:
        if session.cfg is not None:
            lock.release(session.cfg.output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nblib.kaggle", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    staging = commands.add_parser("stage", help="write a folder for `kaggle kernels push -p OUT`")
    staging.add_argument("out", type=Path)
    bundling = commands.add_parser("bundle", help="prepare the tokens once, as a Kaggle dataset folder")
    bundling.add_argument("out", type=Path)
    job.add_parameter_options(bundling)  # -f FILE, -p NAME VALUE, --set NAME=VALUE, as nblib.job takes them
    bundling.add_argument("--id", default="YOUR-KAGGLE-USERNAME/gpt2-training-tokens",
                          help="the Kaggle dataset id to write into dataset-metadata.json")
    args = parser.parse_args(argv)
    if args.command == "stage":
        print(f"staged {stage(args.out)}: run `kaggle kernels push -p {args.out}`")
        return
    try:
        out = make_bundle(args.out, job.parameter_values(args), args.id)
    except console.Refusal as refusal:  # its message, not a traceback
        parser.exit(2, f"error: {refusal}\n")
    print(f"bundle written to {out}: upload it with `kaggle datasets create -p {out}`, then pass "
          f"dataset='/kaggle/input/<its slug>' to the notebook")


if __name__ == "__main__":
    main()
