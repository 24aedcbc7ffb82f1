"""QFusionTrainer: transformers' Trainer with one loss per stage, plugin-only saving and crash-safe checkpoints.

What it changes in ``Trainer`` (everything else — the loop, gradient accumulation, DDP / FSDP /
DeepSpeed through accelerate, mixed precision, logging through ``report_to``, the progress bar,
checkpoint rotation, resuming the optimizer, scheduler, RNG states and data order — is the Trainer's):

* ``compute_loss``: the stage's loss (align: contrastive over every process's question groups +
  λ·identity; generate / elastic: the generation loss over the answer tokens, divided by the answer
  tokens of the whole accumulation window on every process, counted in ``get_batch_samples``);
* ``_save`` / ``_load_from_checkpoint``: a checkpoint holds the plugin (+ LoRA, + the align stage's
  answer encoder), never the host;
* ``_save_checkpoint``: a checkpoint is written into a staging folder and renamed into place when
  complete, so a run killed while saving resumes from the last complete checkpoint, never a mix;
* ``log``: every logged step goes to ``metrics.jsonl`` once, with the budgets drawn.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from qfusion.files import write_text
from qfusion.losses import contrastive_loss, generation_loss, identity_loss
from qfusion.training.collator import scored_tokens
from qfusion.training.config import AlignConfig
from qfusion.training.stages import StageModel

METRICS_NAME = "metrics.jsonl"
"""One line per logged optimizer step, in the output directory."""

STAGING_DIR = ".staging"
"""Folder in the output directory where a checkpoint is written before it is renamed into place."""


def append_line(path: str, record: dict) -> None:
    """Append one JSON line and flush it to disk (a line is either whole or torn at the end of the file)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
    """The whole lines of a metrics file (a line torn by a kill is left out)."""
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def trim_metrics(path: str, step: int) -> None:
    """Keep only the steps <= ``step`` of a metrics file (those a resumed run will not log again),
    rewritten atomically."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class QFusionTrainer(Trainer):
    """transformers' ``Trainer`` for one qfusion stage (see the module docstring).

    model: the stage's :class:`qfusion.training.StageModel`. processor: the QFusionProcessor whose
    settings are saved with the plugin. card: the plugin's model card text. align: the stage-1 loss
    weights. Other arguments go to ``Trainer`` (``args``, ``train_dataset``, ``data_collator``, ...).
    """

    def __init__(self, model: StageModel, *, processor, card: str, align: AlignConfig | None = None, **kwargs):
        if not isinstance(model, StageModel):
            raise TypeError(f"model: expected a qfusion.training.StageModel, got {type(model).__name__}")
        super().__init__(model=model, **kwargs)
        self.stage = model.stage
        self.plugin_processor = processor
        self.card = card
        self.align = align or AlignConfig()
        # the generation loss is divided by the answer tokens of the whole accumulation window
        self.model_accepts_loss_kwargs = self.stage != "align"
        self._checkpoint_root: str | None = None
        self._budgets: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ the loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and, in the generation stages, the answer tokens they
        score (over every process when ``average_tokens_across_devices``)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.stage == "align" or not batches:
            return batches, None
        count = sum(scored_tokens(batch) for batch in batches)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's loss on one micro-batch."""
        self._budgets.append(tuple(inputs["budget"]))
        outputs = model(**inputs)
        if self.stage == "align":
            loss = self._align_loss(outputs)
        else:
            count = num_items_in_batch if num_items_in_batch is not None else scored_tokens(inputs)
            loss = sum(generation_loss(logits, labels, num_items_in_batch=count) for logits, labels in outputs["parts"])
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
            if "empty" in outputs:  # nothing here reaches a trained weight
                loss = loss + outputs["empty"]
        return (loss, outputs) if return_outputs else loss

    def _align_loss(self, outputs: dict) -> torch.Tensor:
        """Contrastive + λ·identity. With several processes and ``align.gather_negatives`` every process
        contrasts the question groups of all of them (each process computes the same contrastive loss;
        the gather's backward and the gradient averaging give the gradient of one process holding the
        whole global micro-batch); the identity loss stays per process."""
        gather = self.align.gather_negatives and self.args.world_size > 1
        if "empty" in outputs and not gather:  # no visual record in this micro-batch: nothing to align
            return outputs["empty"]
        eos, answers, ids = outputs["eos_embed"], outputs["answer_embed"], outputs["answer_ids"]
        if gather:
            eos, answers, ids = gather_groups(eos, answers, ids)
            if eos.shape[0] == 0:  # no process had a visual record
                return outputs["empty"]
        contrastive = contrastive_loss(eos, answers, outputs["logit_scale"], ids)
        if not outputs["slot_states"]:
            return contrastive
        identity = identity_loss(outputs["slot_states"], scope=self.align.identity_scope)
        return contrastive + self.align.identity_weight * identity

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's logging, and each step's record in ``metrics.jsonl`` (once per step, with the
        budgets of this process's micro-batches since the last record)."""
        if "loss" in logs and self.is_world_process_zero():
            record = {"step": self.state.global_step, **logs, "budgets": [list(b) for b in self._budgets]}
            append_line(os.path.join(self.args.output_dir, METRICS_NAME), record)
        if "loss" in logs:
            self._budgets = []
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and resuming

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the plugin (+ LoRA; in a checkpoint also the answer encoder), never the host."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save(output_dir, processor=self.plugin_processor, card=self.card,
                                                       state_dict=state_dict,
                                                       with_encoder=self._checkpoint_root is not None)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the plugin; under FSDP with sharded state dicts its weights are gathered first."""
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint's plugin (+ LoRA, + answer encoder); FSDP and DeepSpeed load their own."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        self.accelerator.unwrap_model(model if model is not None else self.model).load(resume_from_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed into place once every
        process has written its part; then older checkpoints are rotated out."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # a checkpoint of this step from an earlier, resumed run
                shutil.rmtree(final)
            _sync_tree(os.path.join(staging_root, name))
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root)  # what else is there: stale parts of a killed run's saves
            _sync_dir(run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()


def gather_groups(eos_embed: torch.Tensor, answer_embed: torch.Tensor, answer_ids: list[torch.Tensor]):
    """Every process's (K_p, C) ⟨eos⟩ and answer embeddings, concatenated in process order (gradients flow
    back to each process's own rows), and their answer ids. Processes may hold different K_p (0 included)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    ids = [i.tolist() for i in answer_ids]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ids)
    sizes = [len(p) for p in everyone]
    widest = max(sizes)

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(widest - x.shape[0], x.shape[1])]) if x.shape[0] < widest else x

    def joined(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[:size] for part, size in zip(all_gather(padded(x)), sizes)])

    device = eos_embed.device
    return joined(eos_embed), joined(answer_embed), [torch.tensor(i, device=device) for p in everyone for i in p]


def _sync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_tree(root: str) -> None:
    """fsync every file and folder under ``root``, so a rename of ``root`` never publishes unwritten data."""
    for folder, _, names in os.walk(root):
        for name in names:
            descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _sync_dir(folder)
