"""The model card of a trained plugin: the host it was trained for, and every stage that trained it.

The card's metadata (YAML front matter, read by the Hugging Face Hub) names the host checkpoint as
``base_model`` and keeps, under ``qfusion``, the plugin's family, default budget and the record of
its stages: stage, mode, budgets trained, steps, data, learning rate, LoRA. A stage that starts from
a plugin extends that plugin's record; the eval stage reads it to say when a budget lies outside
what the plugin was trained at.
"""

from __future__ import annotations

import os

from qfusion.budget import Budget
from qfusion.plugin import CARD_NAME

GENERATION_STAGES = ("generate", "elastic")
"""Stages that train the plugin through the LLM (what the eval stage's trained budgets mean)."""


def stage_record(stage: str, *, mode: str, budgets: list[Budget], steps: int | None, data: str, lr: float,
                 batch_size: int, lora: bool) -> dict:
    """One stage of a plugin's training record (``batch_size``: samples per optimizer step, all processes;
    ``steps``: optimizer steps, None while not known yet)."""
    return {"stage": stage, "mode": mode, "budgets": [list(b) for b in budgets], "steps": steps, "data": data,
            "lr": lr, "batch_size": batch_size, "lora": lora}


def read_stages(directory: str | os.PathLike) -> list[dict] | None:
    """The training record in a plugin directory's model card; None when it has no card or the card has
    no record (a plugin not trained by qfusion.training)."""
    from huggingface_hub import ModelCard

    path = os.path.join(directory, CARD_NAME)
    if not os.path.isfile(path):
        return None
    record = (ModelCard.load(path).data.to_dict().get("qfusion") or {}).get("stages")
    return list(record) if isinstance(record, list) else None


def trained_budgets(stages: list[dict]) -> set[Budget]:
    """The budgets a plugin was trained at through the LLM (its generate and elastic stages)."""
    return {Budget(*pair) for stage in stages if stage["stage"] in GENERATION_STAGES for pair in stage["budgets"]}


def plugin_card(*, base_model: str, family: str, budget: Budget, stages: list[dict]) -> str:
    """The text of a plugin's ``README.md``: metadata (base_model, library, tags, the training record)
    and a short description with a table of the stages and how to load the plugin."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, library_name="qfusion",
                         tags=["qfusion", "vision-token-compression", family],
                         qfusion={"family": family, "budget": list(budget), "stages": stages})
    rows = "\n".join(
        f"| {s['stage']} | {s['mode']} | {', '.join(f'({m}, {n})' for m, n in s['budgets'])} | {s['steps']} | "
        f"{s['batch_size']} | {s['lr']:g} | {'yes' if s['lora'] else 'no'} | `{s['data']}` |" for s in stages)
    lora = ("\nThe plugin carries a LoRA of the host LLM in `lora/`: load it after attaching, with "
            "`peft.PeftModel.from_pretrained(model, \"path/to/this/plugin/lora\")`.\n"
            if any(s["lora"] for s in stages) else "")
    body = f"""
# qfusion plugin for `{base_model}`

A qfusion QuestionFusion plugin: it compresses the host's vision tokens into
{budget.m} fused tokens for the first question about an image and {budget.n} for each follow-up,
chosen by looking at the question. The host checkpoint itself is unchanged and not part of this repository.

## Training

| stage | mode | budgets (m, n) | steps | batch | lr | LoRA | data |
|---|---|---|---|---|---|---|---|
{rows}

## Use

```python
import qfusion
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{base_model}")
qfusion.attach(model, "path/to/this/plugin")
processor = qfusion.QFusionProcessor(AutoProcessor.from_pretrained("{base_model}"), model)
```
{lora}"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
