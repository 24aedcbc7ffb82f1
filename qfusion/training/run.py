"""Running a training stage: the host and data set up, transformers' ``TrainingArguments`` from the
config, the Trainer run (or resumed), the plugin saved with its model card and, on request, pushed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from qfusion.files import write_json
from qfusion.training.card import plugin_card, read_stages, stage_record
from qfusion.training.collator import Collator
from qfusion.training.config import TRAINING_STAGES, TrainConfig
from qfusion.training.data import load_conversations
from qfusion.training.host import (LORA_DIR, answer_encoder, checkpoint_llm, is_peft, load_host, on_cpu, precision,
                                   process_state, stage_budgets, takes_text_only)
from qfusion.training.stages import StageModel
from qfusion.training.trainer import METRICS_NAME, QFusionTrainer, trim_metrics

logger = logging.getLogger(__name__)

CONFIG_RECORD = "train_config.json"
"""The settings of a run, in its output directory (a resumed run must have the same)."""

FREE_ON_RESUME = ("resume", "log", "hub", "eval", "sweep", "data.num_workers")
"""Settings a resumed run may change: they do not change what it computes."""


def training_arguments(config: TrainConfig):
    """transformers' ``TrainingArguments`` of a training stage."""
    from transformers import TrainingArguments

    optim, log = config.optim, config.log
    mixed = precision(config)
    return TrainingArguments(
        output_dir=config.output_dir, seed=config.seed,
        per_device_train_batch_size=optim.batch_size, gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr, weight_decay=optim.weight_decay, max_grad_norm=optim.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio,
        max_steps=optim.max_steps if optim.max_steps is not None else -1, num_train_epochs=optim.epochs,
        bf16=mixed == "bf16", fp16=mixed == "fp16",
        logging_steps=log.every, save_strategy="steps", save_steps=log.save_every,
        save_total_limit=log.save_total_limit, report_to=[r.strip() for r in log.report_to.split(",")],
        disable_tqdm=not log.progress, dataloader_num_workers=config.data.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(), use_cpu=on_cpu(),
        remove_unused_columns=False, accelerator_config={"dispatch_batches": False},
    )


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if name in FREE_ON_RESUME:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and name != "fusion" and name != "sweep.plugins":
            keys += _differences(a, b, name + ".")
        elif a != b:
            keys.append(name)
    return keys


def resume_point(config: TrainConfig) -> str | None:
    """The checkpoint a run continues from (the last complete one in output_dir with ``resume``), or
    None for a fresh run. A fresh run refuses an output_dir that holds an earlier run's checkpoints or
    metrics; a resumed run refuses settings that differ from the run it continues (naming them).
    The metrics of steps after the checkpoint are dropped: the resumed run logs them again."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(config.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    metrics = out / METRICS_NAME
    if not config.resume:
        if last is not None or metrics.exists():
            raise ValueError(f"output_dir: {str(out)!r} holds an earlier run ({'checkpoints' if last else 'metrics'}); "
                             "set resume: true to continue it, or choose another output_dir")
        return None
    record = out / CONFIG_RECORD
    if record.is_file():
        changed = _differences(json.loads(record.read_text()), config.to_dict())
        if changed:
            raise ValueError(f"resume: the run in {str(out)!r} was started with other settings for {changed}; "
                             "a resumed run continues exactly the run it resumes")
    if last is None:
        logger.info("resume: no complete checkpoint in %s; starting at step 0", out)
    from transformers.trainer_callback import TrainerState

    if process_state().is_main_process and metrics.exists():
        step = TrainerState.load_from_json(os.path.join(last, "trainer_state.json")).global_step if last else 0
        trim_metrics(str(metrics), step)
    return last


def _write_record(config: TrainConfig) -> None:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(config.to_dict(), out / CONFIG_RECORD)


def train(config: TrainConfig, *, host=None, host_processor=None, train_dataset=None) -> dict:
    """Run one training stage (``config.stage``: align, generate or elastic); writes the plugin (+ LoRA,
    + model card) into ``config.output_dir`` and returns the Trainer's final metrics.

    host / host_processor: the host model (not attached yet) and its processor, instead of loading
    ``config.model``. train_dataset: the samples to train on, instead of reading ``data.train``
    (:func:`qfusion.training.load_conversations`).
    """
    from transformers import set_seed

    from qfusion.plugin import push_plugin

    if config.stage not in TRAINING_STAGES:
        raise ValueError(f"stage: train() runs {list(TRAINING_STAGES)}, got {config.stage!r} (see qfusion.training.run)")
    checkpoint = resume_point(config)
    state = process_state()
    if state.is_main_process:
        _write_record(config)
    set_seed(config.seed)  # the new plugin's initial weights
    loaded = load_host(config, host, host_processor, train_lora=config.stage != "align")
    if config.lora.enabled and config.stage == "align":
        logger.info("lora.enabled: the align stage has no LLM forward; no LoRA is trained in it")
    budgets = stage_budgets(config, loaded.adapter)
    if train_dataset is None:
        train_dataset = load_conversations(config.data.train, image_root=config.data.image_root,
                                           split=config.data.split, streaming=config.data.streaming,
                                           num_frames=config.data.num_frames)
    encoder = tokenizer = None
    special = True
    if config.stage == "align":
        encoder, tokenizer, special = answer_encoder(config, loaded)
        logger.info("align: records without an image or video are left out of the alignment (nothing to align)")
    if config.optim.gradient_checkpointing and config.stage != "align":
        checkpoint_llm(loaded.model)
    model = StageModel(loaded.model, config.stage, encoder)
    text_only = "leave out" if config.stage == "align" else "keep" if takes_text_only(loaded.model) else "refuse"
    collator = Collator(loaded.processor, budgets, config.seed, answer_tokenizer=tokenizer,
                        answer_special_tokens=special, text_only=text_only)
    args = training_arguments(config)
    stages = (read_stages(config.plugin) if config.plugin else None) or []
    mode = "question" if loaded.adapter.fusion.config.use_question else "no_question"
    record = stage_record(config.stage, mode=mode, budgets=budgets, steps=config.optim.max_steps,
                          data=getattr(train_dataset, "source", str(config.data.train)), lr=config.optim.lr,
                          batch_size=config.optim.batch_size * config.optim.grad_accum * state.num_processes,
                          lora=is_peft(loaded.model))
    card = plugin_card(base_model=config.model, family=loaded.adapter.family.name, budget=loaded.adapter.budget,
                       stages=stages + [record])
    trainer = QFusionTrainer(model, args=args, processor=loaded.processor, card=card, align=config.align,
                             train_dataset=train_dataset, data_collator=collator)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    record["steps"] = result.global_step  # what the run came to (optim.max_steps, or the epochs)
    trainer.card = plugin_card(base_model=config.model, family=loaded.adapter.family.name,
                               budget=loaded.adapter.budget, stages=stages + [record])
    trainer.save_model(config.output_dir)
    if config.hub.repo_id and state.is_main_process:
        push_plugin(config.output_dir, config.hub.repo_id, private=config.hub.private, folders=(LORA_DIR,))
    state.wait_for_everyone()
    return dict(result.metrics, global_step=result.global_step)
