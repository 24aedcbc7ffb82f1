"""Train a QuestionFusion plugin on a LLaVA-family checkpoint: the paper's three-stage recipe.

Stages (``--stage``):
  align     stage 1: vision tower (optional) + fusion + a text encoder; contrastive + λ·identity loss
            (each question's ⟨eos⟩ embedding vs its answer's text embedding). No LLM forward.
  generate  stage 2: fusion (+ LoRA on the LLM, optional) through the frozen LLM; generation loss on
            the answers and their closing eos only.
  sweep     stage 3: fine-tune the stage-2 plugin on a fraction of the data for each (m, n) in
            ``sweep`` and, with ``sweep_no_question``, for the vision-and-queries-only ablation;
            one output folder per setting.
  elastic   stage 2 with m (and n ≤ m) drawn per step from ``budgets``: one plugin for every budget.

Data: LLaVA-style conversation JSONL, one record a line:
  {"image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\nQuestion?"},
   {"from": "gpt", "value": "Answer."}, {"from": "human", "value": "Follow-up?"}, ...]}
Several turns about one image use the m/n layout (m fused tokens before the first question, n before
each later one).

Run with plain python or ``accelerate launch`` (DDP; FSDP/DeepSpeed through accelerate configs):
  python examples/train.py --config examples/configs/llava-1.5-7b.yaml --stage align
  accelerate launch --num_processes 8 examples/train.py --config ... --stage generate --plugin out/align
Any config key can be overridden on the command line: ``--set lr=1e-5 --set max_steps=100``.

Writes into ``output_dir``: the plugin only (``config.json`` + ``model.safetensors`` + adapter settings
+ the question tokenizer), ``metrics.jsonl`` (one line per optimizer step) and ``checkpoint/`` (for
``resume: true``: plugin, optimizer, scheduler, step and RNG states).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, get_cosine_schedule_with_warmup

import qfusion
from qfusion import FusionConfig, QFusionProcessor
from qfusion.adapters import get_adapter
from qfusion.config import RUNTIME_FIELDS
from qfusion.inputs import decode_questions
from qfusion.answer_encoder import AnswerEncoder
from qfusion.losses import contrastive_loss, generation_loss, identity_loss

STAGES = ("align", "generate", "sweep", "elastic")


@dataclass
class TrainConfig:
    """Every setting of a training run (YAML keys of the same names; defaults from the paper's Appendix C)."""

    model: str = field(default="", metadata={"help": "host checkpoint (directory or hub id), LLaVA family"})
    data: str = field(default="", metadata={"help": "conversation JSONL"})
    image_root: str = field(default=".", metadata={"help": "folder the records' image paths are relative to"})
    output_dir: str = field(default="qfusion-out", metadata={"help": "where the plugin, metrics and checkpoints go"})
    stage: str = field(default="generate", metadata={"help": f"one of {STAGES}"})
    plugin: str | None = field(default=None, metadata={"help": "start from this saved plugin (e.g. stage 1's output)"})
    fusion: dict = field(default_factory=dict, metadata={"help": "FusionConfig fields for a new plugin"})
    text_encoder: str | None = field(default=None, metadata={"help": "align: transformers text model (dir or id)"})
    text_pooling: str = field(default="eos", metadata={"help": "align: 'eos' (CLIP), 'mean' or 'cls'"})
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float | None = field(default=None, metadata={"help": "default 0.1 for align, 0.03 otherwise"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; default: epochs over the data"})
    epochs: float = 2.0
    batch_size: int = field(default=4, metadata={"help": "samples per process per micro-batch"})
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 where supported), 'no', 'bf16'"})
    seed: int = 0
    log_every: int = 1
    save_every: int = 500
    resume: bool = False
    train_vision_tower: bool = False
    lora: bool = False
    lora_r: int = 8
    budgets: list = field(default_factory=lambda: [1, 4, 16, 64], metadata={"help": "elastic: m drawn from these"})
    sweep: list = field(default_factory=list, metadata={"help": "sweep: [[m, n], ...]"})
    sweep_no_question: bool = False
    sweep_fraction: float = 0.1
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.stage!r}")
        if not self.model:
            raise ValueError("model: expected a host checkpoint (directory or hub id)")
        if not self.data:
            raise ValueError("data: expected a conversation JSONL file")
        if self.stage == "align" and not self.text_encoder:
            raise ValueError("text_encoder: the align stage needs a transformers text encoder")
        if self.stage == "sweep" and not (self.sweep or self.sweep_no_question):
            raise ValueError("sweep: expected a list of [m, n] pairs (or sweep_no_question: true)")
        for name in ("batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 < self.sweep_fraction <= 1:
            raise ValueError(f"sweep_fraction: expected in (0, 1], got {self.sweep_fraction}")

    @property
    def warmup(self) -> float:
        return self.warmup_ratio if self.warmup_ratio is not None else (0.1 if self.stage == "align" else 0.03)


def load_config(argv=None) -> TrainConfig:
    """A TrainConfig from ``--config file.yaml``, then ``--stage``/``--plugin``/``--output-dir`` and ``--set k=v``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--plugin")
    parser.add_argument("--output-dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (the value is parsed as YAML)")
    args = parser.parse_args(argv)
    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    known = {f.name for f in fields(TrainConfig)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        values[key] = yaml.safe_load(value)
    for key, value in (("stage", args.stage), ("plugin", args.plugin), ("output_dir", args.output_dir)):
        if value is not None:
            values[key] = value
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}")
    return TrainConfig(**values)


class ConversationDataset(Dataset):
    """LLaVA-style records → (PIL image, chat conversation in the transformers format)."""

    def __init__(self, path: str, image_root: str):
        self.image_root = Path(image_root)
        self.records = []
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    record = json.loads(line)
                    if "image" not in record or not record.get("conversations"):
                        raise ValueError(f"{path}:{number}: expected 'image' and 'conversations'")
                    self.records.append(record)
        if not self.records:
            raise ValueError(f"data: no records in {path}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = Image.open(self.image_root / record["image"]).convert("RGB")
        conversation = []
        for turn in record["conversations"]:
            text = turn["value"].replace("<image>", "").strip()
            if turn["from"] == "human":
                conversation.append({"role": "user", "content": [{"type": "text", "text": text}]})
            else:
                conversation.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        return image, conversation


def answers_of(conversation: list[dict]) -> list[str]:
    return [" ".join(c["text"] for c in turn["content"]) for turn in conversation if turn["role"] == "assistant"]


class Collator:
    """Builds the host inputs, the ``qfusion_*`` questions (with their ``qfusion_budget``) and the
    answer-only labels of a batch.

    processors: budget (m, n) -> the QFusionProcessor building inputs for it; with several, one is
        drawn per micro-batch (elastic training: nested slots make every budget the same module).
    """

    def __init__(self, processors: dict, answer_tokenizer=None, seed: int = 0):
        self.processors = processors
        self.answer_tokenizer = answer_tokenizer
        self.rng = random.Random(seed)

    def __call__(self, batch):
        images, conversations = zip(*batch)
        budget = self.rng.choice(sorted(self.processors))
        inputs = self.processors[budget](images=list(images), conversations=list(conversations), return_labels=True,
                                         add_generation_prompt=False)
        if self.answer_tokenizer is not None:
            # one answer per question group, in batch order (questions without an answer are dropped)
            answers = [a for c in conversations for a in answers_of(c)]
            tokens = self.answer_tokenizer(answers, padding=True, truncation=True, return_tensors="pt")
            inputs["answer_input_ids"], inputs["answer_attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return inputs


def elastic_budgets(budgets: list) -> list[tuple[int, int]]:
    """Every (m, n) with m and n <= m drawn from ``budgets``."""
    return sorted({(m, n) for m in budgets for n in budgets if n <= m})


RECONFIGURABLE = ("m", "n", "use_question")
"""Fusion settings a run may change on a loaded plugin (they change no weight)."""


def plugin_changes(cfg: "TrainConfig") -> tuple[dict, dict]:
    """(reconfigurable changes, runtime choices) of ``cfg.fusion`` for a loaded plugin; any other
    setting must equal the plugin's, else an error naming it."""
    saved = FusionConfig.from_pretrained(cfg.plugin).to_dict()
    changes, runtime = {}, {}
    for key, value in cfg.fusion.items():
        if key in RUNTIME_FIELDS:
            runtime[key] = value
        elif key in RECONFIGURABLE:
            changes[key] = value
        elif key not in saved:
            raise ValueError(f"fusion.{key}: not a FusionConfig field")
        elif saved[key] is not None and value != saved[key]:
            raise ValueError(
                f"fusion.{key}: the plugin {cfg.plugin!r} was built with {key}={saved[key]!r}, the config asks "
                f"for {value!r}; drop the setting or train a new plugin (only {list(RECONFIGURABLE)} may change)"
            )
    return changes, runtime


def build(cfg: TrainConfig):
    """Host with the plugin attached (+ LoRA), the processor, and for align the answer encoder."""
    model = AutoModelForImageTextToText.from_pretrained(cfg.model)
    host_processor = AutoProcessor.from_pretrained(cfg.model)
    if cfg.plugin:
        changes, runtime = plugin_changes(cfg)
        adapter = qfusion.attach(model, cfg.plugin, train_vision_tower=cfg.train_vision_tower, **runtime)
        if changes:  # e.g. a sweep setting: the plugin of this run is saved with it
            adapter.fusion.configure(**changes)
    else:
        runtime = {k: v for k, v in cfg.fusion.items() if k in RUNTIME_FIELDS}
        architecture = {k: v for k, v in cfg.fusion.items() if k not in RUNTIME_FIELDS}
        adapter = qfusion.attach(model, FusionConfig(**architecture), train_vision_tower=cfg.train_vision_tower,
                                 **runtime)
    if cfg.lora and cfg.stage != "align":
        from peft import get_peft_model

        model = get_peft_model(model, qfusion.lora_config(model, r=cfg.lora_r))
    if cfg.stage == "elastic":
        codebook = adapter.fusion.config.codebook_size
        too_large = [b for b in cfg.budgets if b > codebook]
        if too_large:
            raise ValueError(f"budgets: {too_large} exceed the plugin's codebook_size={codebook}")
        budgets = elastic_budgets(cfg.budgets)
    else:
        budgets = [adapter.budget]
    processors = {(m, n): QFusionProcessor(host_processor, model, m=m, n=n) for m, n in budgets}
    encoder = None
    if cfg.stage == "align":
        text_model = AutoModel.from_pretrained(cfg.text_encoder)
        if not hasattr(text_model.config, "hidden_size"):  # a dual encoder (CLIP): keep its text tower
            text_model = text_model.text_model
        encoder = AnswerEncoder(text_model, adapter.fusion.config.contrastive_dim, pooling=cfg.text_pooling)
        encoder.tokenizer = AutoTokenizer.from_pretrained(cfg.text_encoder)
    return model, adapter, processors, encoder


def align_loss(model, encoder: AnswerEncoder, batch) -> torch.Tensor:
    """Stage 1: contrastive (⟨eos⟩ vs answer) + λ·identity, through the fusion only (no LLM forward)."""
    adapter = get_adapter(model)
    fusion = adapter.fusion
    questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"],
                                 batch["input_ids"].shape[0])
    features = [f.to(fusion.dtype) for f in adapter.encode(batch["pixel_values"])]
    m, n = batch["qfusion_budget"]
    out = fusion(features, [[q.to(fusion.device) for q in sample] for sample in questions], m=m, n=n)
    answer_ids = batch["answer_input_ids"]
    num = answer_ids.shape[0]
    if num != out.eos_embed.shape[0]:
        raise ValueError(f"data: every question needs an answer turn; {out.eos_embed.shape[0]} questions, {num} answers")
    answer_embed = encoder(answer_ids, batch["answer_attention_mask"])
    keys = [ids[mask.bool()] for ids, mask in zip(answer_ids, batch["answer_attention_mask"])]
    config = fusion.config
    return contrastive_loss(out.eos_embed, answer_embed, fusion.logit_scale, keys) + \
        config.identity_weight * identity_loss(out.slot_states, scope=config.identity_scope)


def host_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("answer_") and k != "labels"}


def train(cfg: TrainConfig) -> dict:
    """Run one stage; returns the final metrics (and writes the plugin into cfg.output_dir)."""
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision)
    set_seed(cfg.seed)
    model, adapter, processors, encoder = build(cfg)
    dataset = ConversationDataset(cfg.data, cfg.image_root)
    if cfg.stage == "sweep":
        count = max(1, int(len(dataset) * cfg.sweep_fraction))
        dataset.records = random.Random(cfg.seed).sample(dataset.records, count)
    collate = Collator(processors, encoder.tokenizer if encoder is not None else None,
                       seed=cfg.seed + accelerator.process_index)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum / accelerator.num_processes)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    modules = [model] + ([encoder] if encoder is not None else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * total_steps), total_steps)
    prepared = accelerator.prepare(*modules, optimizer, loader, scheduler)
    model, encoder = prepared[0], (prepared[1] if encoder is not None else None)
    optimizer, loader, scheduler = prepared[-3:]
    accelerator.register_for_checkpointing(scheduler)

    out_dir = Path(cfg.output_dir)
    checkpoint = out_dir / "checkpoint"
    step = 0
    if cfg.resume and (checkpoint / "state.json").exists():
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / "state.json").read_text())["step"]
    fusion_model = accelerator.unwrap_model(model)
    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=cfg.stage)
    model.train()
    last = {}
    while step < total_steps:
        for batch in loader:
            if step >= total_steps:
                break
            m, n = batch["qfusion_budget"]
            with accelerator.accumulate(model):
                if cfg.stage == "align":
                    loss = align_loss(fusion_model, encoder, batch)
                else:
                    labels = batch["labels"]
                    logits = model(**host_inputs(batch)).logits
                    # normalise by the answer tokens of the whole accumulation window on every process
                    items = accelerator.gather((labels[:, 1:] != -100).sum()).sum() * cfg.grad_accum
                    loss = generation_loss(logits, labels, num_items_in_batch=items) \
                        * accelerator.num_processes * cfg.grad_accum
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            last = {"step": step, "loss": accelerator.gather(loss.detach()).float().mean().item(),
                    "lr": scheduler.get_last_lr()[0], "m": m, "n": n}
            if accelerator.is_main_process and (step % cfg.log_every == 0 or step == total_steps):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
            if step % cfg.save_every == 0 or step == total_steps:
                accelerator.save_state(str(checkpoint))
                if accelerator.is_main_process:
                    (checkpoint / "state.json").write_text(json.dumps({"step": step}))
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        get_adapter(accelerator.unwrap_model(model)).save_pretrained(out_dir)
        next(iter(processors.values())).save_pretrained(out_dir)  # its question settings; the budget is the plugin's
    return last


def main(argv=None) -> None:
    cfg = load_config(argv)
    if cfg.stage != "sweep":
        train(cfg)
        return
    base = FusionConfig.from_pretrained(cfg.plugin) if cfg.plugin else FusionConfig(**cfg.fusion)
    settings = [(m, n, True) for m, n in cfg.sweep] + ([(cfg.fusion.get("m", base.m), cfg.fusion.get("n", base.n), False)]
                                                      if cfg.sweep_no_question else [])
    for m, n, use_question in settings:
        name = f"m{m}-n{n}" + ("" if use_question else "-no-question")
        fusion = {**cfg.fusion, "m": m, "n": n, "use_question": use_question}
        train(replace(cfg, fusion=fusion, output_dir=os.path.join(cfg.output_dir, name)))


if __name__ == "__main__":
    main()
