"""Train, evaluate or sweep a qfusion plugin: the paper's three-stage recipe on a transformers VLM host.

A thin script over the library (``qfusion.training``); ``qfusion train`` runs the same. Every
setting, with its section, type, default and help: ``python examples/train.py --help`` (and the
table of docs/training.md).

Stages (``--stage``):
  align     stage 1: the fusion (+ an answer encoder) on the host's vision tokens, read through the
            host family's own feature hook; contrastive + identity loss, no LLM forward
  generate  stage 2: the fusion (+ LoRA on the LLM by option) through the frozen host; generation
            loss on the answers and their closing eos only
  elastic   stage 2 with a budget (m, n) drawn per micro-batch from ``elastic.budgets``
  eval      greedy answers scored per budget and question type, beside two training-free baselines
            at the same N (the host's vision tokens average-pooled to N, and N of them at random)
  sweep     stage 3: per mode (question fused / the paper's no-question ablation) a stage-2 plugin of
            its own, one fine-tune and evaluation per budget, one comparison (table, fits, plot)

Run it with plain python, ``torchrun`` or ``accelerate launch`` (DDP, FSDP 2, DeepSpeed ZeRO-2 with
the files in examples/configs/; see docs/training.md):

  python examples/train.py --config examples/configs/llava-1.5-7b.yaml --stage align --output-dir runs/align
  accelerate launch --config_file examples/configs/ddp.yaml examples/train.py \\
      --config examples/configs/llava-1.5-7b.yaml --stage generate --plugin runs/align --output-dir runs/generate
  python examples/train.py --config examples/configs/llava-1.5-7b.yaml --stage eval --plugin runs/generate \\
      --output-dir runs/eval --set "eval.budgets=[16, 64]"

A killed run continues exactly where its last complete checkpoint left it with ``--set resume=true``.
"""

import sys

from qfusion.training import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
