"""The notebook's path in one call, for scripts and worker processes: `python -m nblib.job params.json`."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from . import contract, data, hardware, launch, lock, model, params, state, train


def run(values: Mapping[str, Any]) -> train.RunResult:
    """Resolve `values` (notebook parameters by name), prepare the data, build the model and train it: the notebook's cells
    from setup to train, with no export."""
    cfg = params.resolve(values)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train as the notebook does, without Jupyter")
    parser.add_argument("params", type=Path, help="a JSON file of notebook parameters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(run(json.loads(args.params.read_text())).describe(), flush=True)


if __name__ == "__main__":
    main()
