"""The training command line: ``qfusion train`` and ``examples/train.py`` (the same parser and run)."""

from __future__ import annotations

import argparse
import logging

from qfusion.training.config import STAGES, TrainConfig, load_config, settings_help

DESCRIPTION = """Train, evaluate or sweep a qfusion plugin on a transformers VLM host.

  stage 1 (align):     --stage align --output-dir runs/align
  stage 2 (generate):  --stage generate --plugin runs/align --output-dir runs/generate
  elastic budgets:     --stage elastic --plugin runs/align --output-dir runs/elastic --set "elastic.budgets=[1, 4, 16]"
  evaluation:          --stage eval --plugin runs/generate --output-dir runs/eval --set "eval.budgets=[16, 64]"
  stage 3 (sweep):     --stage sweep --plugin runs/align --output-dir runs/sweep --set "sweep.budgets=[1, 4, 16, 64]"

Several GPUs: `accelerate launch --config_file examples/configs/<ddp|fsdp2|deepspeed-zero2>.yaml -m qfusion train
...` (or examples/train.py); several CPU processes: `torchrun --nproc_per_node N examples/train.py ...`."""


def build_parser(prog: str = "qfusion train") -> argparse.ArgumentParser:
    """The argument parser; its help lists every setting with its section, type, default and help."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=settings_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file of settings; several merge in order (e.g. a model file, then a size file)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, sections by dotted keys (optim.lr=1e-3, fusion.m=4); the value "
                             "is parsed as YAML, and a mapping merges into its section")
    parser.add_argument("--stage", choices=STAGES, help="the stage to run (the setting `stage`)")
    parser.add_argument("--plugin", help="the plugin to start from or evaluate (the setting `plugin`)")
    parser.add_argument("--output-dir", help="the setting `output_dir`")
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "qfusion train") -> TrainConfig:
    """A TrainConfig from command-line arguments; a bad setting exits with an error naming it."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.set, stage=args.stage, plugin=args.plugin, output_dir=args.output_dir)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))


def run(config: TrainConfig) -> dict:
    """Run ``config.stage``: a training stage (:func:`qfusion.training.train`), the evaluation
    (:func:`qfusion.training.evaluate`) or the sweep (:func:`qfusion.training.sweep`)."""
    from qfusion.training.evaluation import evaluate
    from qfusion.training.run import train
    from qfusion.training.sweeps import sweep

    if config.stage == "eval":
        return evaluate(config)
    if config.stage == "sweep":
        return sweep(config)
    return train(config)


def main(argv: list[str] | None = None, prog: str = "qfusion train") -> int:
    """Parse, run, print the eval or sweep table; returns the exit status."""
    config = parse_args(argv, prog)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    package = logging.getLogger("qfusion")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        result = run(config)
    finally:
        package.removeHandler(handler)
    if config.stage in ("eval", "sweep"):
        print(result["table"])
    return 0
