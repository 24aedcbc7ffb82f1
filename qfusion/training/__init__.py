"""qfusion.training: the paper's recipe as a library on transformers' Trainer.

Stages: ``align`` (stage 1: contrastive + identity through the fusion only), ``generate`` (stage 2:
the generation loss through the frozen host), ``elastic`` (stage 2 with a budget drawn per
micro-batch), ``eval`` (scores per budget and question type, beside two training-free baselines)
and ``sweep`` (stage 3: per mode a plugin of its own, one fine-tune per budget, one comparison).

    from qfusion.training import load_config, run
    run(load_config(["examples/configs/llava-1.5-7b.yaml"], ["stage=align", "output_dir=runs/align"]))

Needs the ``train`` extra (``pip install 'qfusion[train]'``). The names below load their module on
first use, so reading settings (``--help``) does not import the Trainer.
"""

import importlib

_MODULES = {
    "Collator": "collator", "ConversationDataset": "data", "QFusionTrainer": "trainer", "Sample": "data",
    "StageModel": "stages", "StreamingConversations": "data", "TrainConfig": "config", "evaluate": "evaluation",
    "load_config": "config", "load_conversations": "data", "main": "cli", "parse_args": "cli", "run": "cli",
    "settings_markdown": "config", "sweep": "sweeps", "train": "run",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'qfusion.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qfusion.training.{_MODULES[name]}"), name)
