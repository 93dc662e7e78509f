"""The notebook's path in one call, for scripts and worker processes:

    python -m nblib.job [params.yaml] [--set name=value ...] [--show-config]
    torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT] -m nblib.job params.yaml

The file is what papermill's `-f` takes (YAML; JSON is YAML too); each `--set` overrides one
parameter, its value read as YAML (`--set max_steps=200`, `--set prompts='[a, b]'`; `--set
name=` gives the empty string, `--set name=null` the preset's value).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import contract, data, hardware, launch, lock, model, params, state, train


def run(values: Mapping[str, Any]) -> train.RunResult:
    """Resolve `values` (notebook parameters by name), prepare the data, build the model and train it: the notebook's cells
    from setup to train, with no export."""
    cfg = params.resolve(values)
    if launch.under_torchrun():  # torchrun started this process, and the others
        return launch.torchrun_worker(cfg)
    device = hardware.detect(cfg.train.precision, cfg.devices)
    state.seed_everything(cfg.train.seed)
    taken = lock.hold(cfg.output_dir)
    try:
        logging.getLogger(__name__).info(contract.preview(cfg, device.world_size))
        corpus = data.prepare(cfg)
        return launch.fit(cfg, device, model.build(cfg.model, corpus.tokenizer), corpus)
    finally:
        if taken:  # a notebook that held the folder already keeps it
            lock.release(cfg.output_dir)


def load_values(path: Path | None, settings: list[str]) -> dict[str, Any]:
    """Notebook parameters from a YAML file and `name=value` overrides.

    Raises:
        ValueError: a file that is not a mapping of names, or a setting without `=`.
    """
    values = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: not a mapping of parameter names to values "
                             "(a YAML file such as notebooks/params/cpu-demo.yaml)")
        values.update(loaded)
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"--set {setting!r}: write --set name=value, e.g. --set max_steps=200")
        values[name.strip()] = yaml.safe_load(value) if value else ""
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train as the notebook does, without Jupyter")
    parser.add_argument("params", type=Path, nargs="?",
                        help="a YAML (or JSON) file of notebook parameters, as papermill's -f takes")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                        help="override one parameter (repeatable); the value is read as YAML")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved configuration and exit without training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        values = load_values(args.params, args.settings)
        if args.show_config:
            print(params.resolve(values).to_json(), flush=True)
            return
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.exit(2, f"error: {error}\n")
    result = run(values)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for the run
        print(result.describe(), flush=True)


if __name__ == "__main__":
    main()
