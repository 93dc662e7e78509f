"""The notebook's path in one call, for scripts and worker processes:

    python -m nblib.job [params.yaml] [-p name value ...] [--set name=value ...] [--show-config]
    torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT] -m nblib.job params.yaml

The file is what papermill's `-f` takes (YAML; JSON is YAML too); each `--set` overrides one
parameter, its value read as YAML (`--set max_steps=200`, `--set prompts='[a, b]'`; `--set
name=` gives the empty string, `--set name=null` the preset's value).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nblib import console
from nblib.run import start
from nblib.setup import params
from nblib.training import launch
from nblib.training.result import RunResult


class _Loader(yaml.SafeLoader):
    """YAML as papermill's -p reads numbers: `3e-4` is a float (YAML 1.1 wants `3.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def run(values: Mapping[str, Any]) -> RunResult | None:
    """Every cell of the notebook, as Run All does: setup, data, model, train, the test split,
    the curves, the export (with `export_gguf`, the GGUF), HellaSwag, samples, the upload and the
    summary. Under torchrun every process runs the cells through training, each its share, and
    rank 0 alone prints and writes; rank 0 then runs the rest alone while the others wait for it.
    None after a dry run."""
    other_rank = launch.under_torchrun() and int(os.environ["RANK"]) > 0
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet) if other_rank else contextlib.nullcontext():
        notebook = start(values)
        corpus = notebook.data()
        model = notebook.model(corpus)
        result = notebook.train(model, corpus)
    if other_rank:
        launch.leave_torchrun(trained=notebook.result is not None)
        if notebook.stopped is not None and notebook.stopped.refusal is not None:
            raise notebook.stopped.refusal
        return result
    notebook.evaluate(model, corpus)
    notebook.curves()
    final_dir = notebook.export(model, corpus)
    notebook.hellaswag(model, corpus)
    notebook.generate(model, corpus)
    notebook.publish(final_dir)
    launch.leave_torchrun(trained=notebook.result is not None)  # under torchrun: the others may go now
    notebook.summary()
    return result


def add_parameter_options(parser: argparse.ArgumentParser) -> None:
    """The notebook parameters on a command line, as papermill takes them: `-f FILE` (YAML or
    JSON), `-p NAME VALUE` (repeatable), and `--set NAME=VALUE` (repeatable); values read as YAML."""
    parser.add_argument("-f", "--parameters", type=Path, dest="parameters_file", metavar="FILE",
                        help="a YAML (or JSON) file of notebook parameters, as papermill's -f takes")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        dest="pairs", help="one notebook parameter (repeatable), as papermill's -p")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                        help="one notebook parameter as name=value (repeatable)")


def parameter_values(args: argparse.Namespace, path: Path | None = None) -> dict[str, Any]:
    """The parameters `add_parameter_options` read (`path`: a file given otherwise, read first).

    Raises:
        ValueError: a file that is not a mapping of names, or a setting without `=`.
        yaml.YAMLError: a file that is not YAML, naming the file and the line.
    """
    files = [f for f in (path, args.parameters_file) if f is not None]
    settings = [*args.settings, *(f"{name}={value}" for name, value in args.pairs)]
    values: dict[str, Any] = {}
    for file in files:
        values.update(load_values(file, []))
    values.update(load_values(None, settings))
    return values


def load_values(path: Path | None, settings: list[str]) -> dict[str, Any]:
    """Notebook parameters from a YAML file and `name=value` overrides.

    Raises:
        ValueError: a file that is not a mapping of names, or a setting without `=`.
        yaml.YAMLError: a file that is not YAML, naming the file and the line.
    """
    values = {}
    if path is not None:
        with path.open(encoding="utf-8") as stream:  # the stream's name goes into YAML's errors
            loaded = yaml.load(stream, Loader=_Loader)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: not a mapping of parameter names to values "
                             "(a YAML file such as notebooks/params/cpu-demo.yaml)")
        values.update(loaded)
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"--set {setting!r}: write --set name=value, e.g. --set max_steps=200")
        values[name.strip()] = yaml.load(value, Loader=_Loader) if value else ""
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train as the notebook does, without Jupyter")
    parser.add_argument("params", type=Path, nargs="?",
                        help="a YAML (or JSON) file of notebook parameters, as papermill's -f takes")
    add_parameter_options(parser)
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved configuration and exit without training")
    args = parser.parse_args(argv)
    console.show_logs()
    try:
        values = parameter_values(args, args.params)
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.exit(2, f"error: {error}\n")
    try:
        if args.show_config:
            print(params.resolve(values).to_json(), flush=True)
            return
        run(values)
    except console.Refusal as refusal:  # a bad parameter or data file: its message, not a traceback
        parser.exit(2, f"error: {refusal}\n")


if __name__ == "__main__":
    main()
