"""Train and evaluate a QuestionFusion plugin on a LLaVA-family checkpoint: the paper's three-stage recipe.

Stages (``--stage``):
  align     stage 1: vision tower (optional) + fusion + an answer encoder; contrastive + λ·identity loss
            (each question's ⟨eos⟩ embedding vs its answer's embedding). No LLM forward. The answer
            encoder is, by default, the host LLM's own input embeddings (mean-pooled, frozen; only
            its projection trains): nothing to download. ``text_encoder`` names a transformers text
            model instead (the paper: CLIP's text tower, read at its <eos>).
  generate  stage 2: fusion (+ LoRA on the LLM, optional) through the frozen LLM; generation loss on
            the answers and their closing eos only.
  elastic   stage 2 with m (and n ≤ m) drawn per micro-batch from ``budgets``: one plugin for every budget.
  eval      greedy answers of the attached host (``generate`` on left-padded batches) to every question
            of ``eval.data``, scored by exact match and VQA-normalised match, per budget of
            ``eval.budgets`` and per question type.
  sweep     stage 3: for every budget of ``sweep.budgets`` and every mode of ``sweep.modes`` (the
            question fused, and the paper's no-question ablation), fine-tune on ``sweep.fraction``
            of the data, evaluate, then fit P(N) = (N_c / N)^α per mode and question type.

Data: LLaVA-style conversation JSONL, one record a line:
  {"image": "relative/path.jpg", "type": "color", "conversations": [{"from": "human", "value": "<image>\\nQ?"},
   {"from": "gpt", "value": "Answer."}, {"from": "human", "value": "Follow-up?"}, ...]}
Several turns about one image use the m/n layout (m fused tokens before the first question, n before
each later one). ``type`` (on the record, or on a human turn for that question) is optional: eval
reports each type apart.

Settings: a YAML file (``--config``, repeatable: later files merge into earlier ones) with the keys of
TrainConfig, its sections ``optim``, ``eval`` and ``sweep``, and ``fusion`` (FusionConfig fields);
``--set KEY=VALUE`` overrides one key, dotted into sections (``--set optim.lr=1e-3``,
``--set fusion.m=4``); a mapping value merges into the section (``--set "fusion={m: 4, n: 4}"``
changes those two fields only).

Run with plain python or ``accelerate launch`` (DDP; FSDP/DeepSpeed through accelerate configs):
  python examples/train.py --config examples/configs/llava-1.5-7b.yaml --stage align
  accelerate launch --num_processes 8 examples/train.py --config ... --stage generate --plugin out/align

Writes into ``output_dir``: training stages the plugin only (``config.json`` + ``model.safetensors``
+ adapter settings + the question tokenizer), ``metrics.jsonl`` (one line per optimizer step) and
``checkpoint/`` (for ``resume: true``); eval ``eval.json`` and ``scores.csv`` (what ``qfusion fit``
reads: ``qfusion fit scores.csv --y vqa_match --group series``); sweep one folder per run and
``scores.csv``, ``fits.json`` (what ``qfusion fit --json`` writes and ``qfusion budget`` reads),
``scaling.png`` and ``sweep.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, set_seed
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import (AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          get_cosine_schedule_with_warmup)

import qfusion
from qfusion import FusionConfig, QFusionProcessor
from qfusion.adapters import get_adapter
from qfusion.adapters.patching import unwrap_model as peft_base
from qfusion.answer_encoder import AnswerEncoder
from qfusion.config import RUNTIME_FIELDS
from qfusion.budget import Budget
from qfusion.inputs import decode_questions
from qfusion.losses import contrastive_loss, generation_loss, identity_loss
from qfusion.scaling import PoorFitWarning, fit_power_law, plot_scaling, save_fits

STAGES = ("align", "generate", "elastic", "eval", "sweep")
MODES = ("question", "no_question")
METRICS = ("exact_match", "vqa_match")


@dataclass
class OptimConfig:
    """Optimisation (YAML section ``optim``): the paper's 7B settings by default; see docs/training.md for
    the settings of a small fresh plugin (a far larger learning rate)."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float | None = field(default=None, metadata={"help": "default 0.1 for align, 0.03 otherwise"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; default: epochs over the data"})
    epochs: float = 2.0
    batch_size: int = field(default=4, metadata={"help": "samples per process per micro-batch"})
    grad_accum: int = 1
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps: expected >= 1 or null, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr: expected > 0, got {self.lr}")


@dataclass
class EvalConfig:
    """Evaluation (YAML section ``eval``): greedy answers on held-out conversations."""

    data: str | None = field(default=None, metadata={"help": "held-out conversation JSONL (images under image_root)"})
    budgets: list | None = field(default=None, metadata={
        "help": "[m, ...] or [[m, n], ...] (an m alone takes n = min(the plugin's n, m)); "
                "default: the plugin's budget"})
    batch_size: int = 8
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class SweepConfig:
    """The budget sweep (YAML section ``sweep``): one fine-tune and evaluation per budget and mode."""

    budgets: list | None = field(default=None, metadata={
        "help": "[m, ...] or [[m, n], ...]; default: the powers of two up to codebook_size, and codebook_size"})
    modes: list = field(default_factory=lambda: list(MODES), metadata={"help": f"a subset of {MODES}"})
    fraction: float = field(default=0.1, metadata={"help": "share of the training data each run fine-tunes on"})
    metric: str = field(default="vqa_match", metadata={"help": f"the score the power law is fitted to, {METRICS}"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for each fit's alpha interval"})

    def __post_init__(self) -> None:
        if not self.modes or any(mode not in MODES for mode in self.modes):
            raise ValueError(f"sweep.modes: expected a non-empty subset of {list(MODES)}, got {self.modes!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"sweep.fraction: expected in (0, 1], got {self.fraction}")
        if self.metric not in METRICS:
            raise ValueError(f"sweep.metric: expected one of {METRICS}, got {self.metric!r}")
        if self.bootstrap < 0:
            raise ValueError(f"sweep.bootstrap: expected >= 0, got {self.bootstrap}")


@dataclass
class TrainConfig:
    """Every setting of a run (YAML keys of the same names; the defaults follow the paper's Appendix C)."""

    model: str = field(default="", metadata={"help": "host checkpoint (directory or hub id), LLaVA family"})
    data: str = field(default="", metadata={"help": "training conversation JSONL"})
    image_root: str = field(default=".", metadata={"help": "folder the records' image paths are relative to"})
    output_dir: str = field(default="qfusion-out", metadata={"help": "where the plugin, metrics and results go"})
    stage: str = field(default="generate", metadata={"help": f"one of {STAGES}"})
    plugin: str | None = field(default=None, metadata={"help": "start from (eval: evaluate) this saved plugin"})
    fusion: dict = field(default_factory=dict, metadata={
        "help": "FusionConfig fields: a new plugin's architecture, or a loaded plugin's m / n / use_question"})
    text_encoder: str | None = field(default=None, metadata={
        "help": "align: a transformers text model (dir or id); null = the host LLM's input embeddings"})
    text_pooling: str = field(default="eos", metadata={
        "help": "align with text_encoder: 'eos' (CLIP), 'mean' or 'cls'"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    budgets: list | None = field(default=None, metadata={
        "help": "elastic: the m drawn from (n <= m drawn too); default: the powers of 4 up to the plugin's m, and m"})
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 where supported), 'no', 'bf16'"})
    seed: int = 0
    log_every: int = 1
    save_every: int = 500
    resume: bool = False
    train_vision_tower: bool = False
    lora: bool = field(default=False, metadata={
        "help": "LoRA on the LLM (not in align); saved in the plugin's lora/ folder and loaded with it"})
    lora_r: int = 8
    identity_weight: float = field(default=1.0, metadata={"help": "weight λ of the identity loss in stage 1"})
    identity_scope: str = field(default="group", metadata={"help": "identity loss scope: 'group' or 'batch'"})
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.stage!r}")
        if not self.model:
            raise ValueError("model: expected a host checkpoint (directory or hub id)")
        if not self.data and self.stage != "eval":
            raise ValueError("data: expected a conversation JSONL file")
        if self.stage in ("eval", "sweep") and not self.eval.data:
            raise ValueError(f"eval.data: the {self.stage} stage scores answers on a held-out conversation JSONL; "
                             "expected its path")
        if self.stage == "eval" and not self.plugin:
            raise ValueError("plugin: the eval stage needs a saved plugin directory to evaluate")
        unknown = sorted(set(self.fusion) - {f.name for f in fields(FusionConfig)})
        if unknown:
            raise ValueError(f"fusion: unknown FusionConfig fields {unknown}")
        for name in ("log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")

    @property
    def warmup(self) -> float:
        if self.optim.warmup_ratio is not None:
            return self.optim.warmup_ratio
        return 0.1 if self.stage == "align" else 0.03


# ---------------------------------------------------------------------------------------------- settings


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: a mapping merges into a mapping key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_override(item: str) -> dict:
    """``--set a.b=value`` → ``{"a": {"b": value}}``; the value is parsed as YAML (and ``1e-3`` as a number,
    which YAML 1.1 would read as a string)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"--set: expected KEY=VALUE with KEY a name or a dotted path (optim.lr), got {item!r}")
    value = yaml.safe_load(text)
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        value = float(value)
    for part in reversed(parts):
        value = {part: value}
    return value


def _check_value(name: str, value, hint) -> None:
    """A TypeError naming the key unless value fits the annotation (int, float, bool, str, list, dict, X | None)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return
    for kind in options:
        kind = typing.get_origin(kind) or kind
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind in (bool, str, list, dict) and isinstance(value, kind):
            return
    expected = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in options)
    hint = (" (YAML reads 1e-3 as text: write 1.0e-3)" if float in options and isinstance(value, str)
            and NUMBER.fullmatch(value.strip()) else "")
    raise TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__}){hint}")


def _sections() -> dict[str, str]:
    """Key → section of every key that lives in a section (for the hint of an unknown top-level key)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: name for name, kind in hints.items() if is_dataclass(kind) for f in fields(kind)}


def build_config(cls, values: dict, prefix: str = ""):
    """A settings dataclass from a (nested) mapping; unknown keys and mistyped values are errors naming the key."""
    if not isinstance(values, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        sections = _sections() if cls is TrainConfig else {}
        moved = [f"{sections[key]}.{key}" for key in unknown if key in sections]
        raise ValueError(f"config: unknown keys {[prefix + key for key in unknown]}"
                         + (f" (did you mean {moved}?)" if moved else ""))
    kwargs = {}
    for key, value in values.items():
        if is_dataclass(hints[key]):
            kwargs[key] = build_config(hints[key], value, f"{prefix}{key}.")
        else:
            _check_value(prefix + key, value, hints[key])
            kwargs[key] = value
    return cls(**kwargs)


def load_config(argv=None) -> TrainConfig:
    """A TrainConfig from ``--config`` files, then ``--set`` overrides, then ``--stage``, ``--plugin``,
    ``--output-dir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="YAML file of settings; several merge in order (e.g. a model file, then a size file)")
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--plugin")
    parser.add_argument("--output-dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, sections by dotted keys (optim.lr=1e-3, fusion.m=4); "
                             "the value is parsed as YAML, and a mapping merges into its section")
    args = parser.parse_args(argv)
    values: dict = {}
    for path in args.config:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config: expected a mapping of settings in {path!r}, got {type(loaded).__name__}")
        values = merge(values, loaded)
    for item in args.set:
        values = merge(values, parse_override(item))
    for key, value in (("stage", args.stage), ("plugin", args.plugin), ("output_dir", args.output_dir)):
        if value is not None:
            values[key] = value
    return build_config(TrainConfig, values)


def parse_budgets(values: list, name: str, codebook_size: int, default_n: int) -> list[tuple[int, int]]:
    """Budgets (m, n) from ``[m, ...]`` or ``[[m, n], ...]``: an m alone takes n = min(default_n, m)."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name}: expected a non-empty list of m or [m, n], got {values!r}")
    budgets = []
    for i, value in enumerate(values):
        pair = (value, min(default_n, value)) if isinstance(value, int) and not isinstance(value, bool) else value
        budgets.append(Budget.of(pair, name=f"{name}[{i}]", codebook_size=codebook_size))
    return budgets


def powers_up_to(base: int, limit: int) -> list[int]:
    """1, base, base², ... up to limit, and limit itself."""
    values = [1]
    while values[-1] * base <= limit:
        values.append(values[-1] * base)
    return values + ([limit] if values[-1] != limit else [])


def elastic_budgets(budgets: list[int]) -> list[tuple[int, int]]:
    """Every (m, n) with m and n <= m drawn from ``budgets``."""
    return sorted({(m, n) for m in budgets for n in budgets if n <= m})


def new_fusion_config(fusion: dict) -> FusionConfig:
    """The FusionConfig of a new plugin from ``fusion``; an m (n) left out defaults to FusionConfig's
    default capped at codebook_size (m), so a small codebook needs no budget of its own."""
    defaults = {f.name: f.default for f in fields(FusionConfig)}
    architecture = {k: v for k, v in fusion.items() if k not in RUNTIME_FIELDS}
    codebook = architecture.get("codebook_size", defaults["codebook_size"])
    if isinstance(codebook, int):
        architecture.setdefault("m", min(defaults["m"], codebook))
        if isinstance(architecture["m"], int):
            architecture.setdefault("n", min(defaults["n"], architecture["m"]))
    return FusionConfig(**architecture)


RECONFIGURABLE = ("m", "n", "use_question")
"""Fusion settings a run may change on a loaded plugin (they change no weight)."""


def plugin_changes(cfg: TrainConfig) -> tuple[dict, dict]:
    """(reconfigurable changes, runtime choices) of ``cfg.fusion`` for a loaded plugin; any other
    setting must equal the plugin's, else an error naming it."""
    saved = FusionConfig.from_pretrained(cfg.plugin).to_dict()
    changes, runtime = {}, {}
    for key, value in cfg.fusion.items():
        if key in RUNTIME_FIELDS:
            runtime[key] = value
        elif key in RECONFIGURABLE:
            changes[key] = value
        elif saved[key] is not None and value != saved[key]:
            raise ValueError(
                f"fusion.{key}: the plugin {cfg.plugin!r} was built with {key}={saved[key]!r}, the config asks "
                f"for {value!r}; drop the setting or train a new plugin (only {list(RECONFIGURABLE)} may change)"
            )
    return changes, runtime


# ---------------------------------------------------------------------------------------------- data


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

    def image(self, index: int) -> Image.Image:
        return Image.open(self.image_root / self.records[index]["image"]).convert("RGB")

    def __getitem__(self, index: int):
        return self.image(index), [chat_turn(turn) for turn in self.records[index]["conversations"]]


def chat_turn(turn: dict) -> dict:
    """A LLaVA turn ({"from", "value"}) as a transformers chat message (the <image> marker dropped)."""
    role = "user" if turn["from"] == "human" else "assistant"
    return {"role": role, "content": [{"type": "text", "text": turn["value"].replace("<image>", "").strip()}]}


def answers_of(conversation: list[dict]) -> list[str]:
    return [" ".join(c["text"] for c in turn["content"]) for turn in conversation if turn["role"] == "assistant"]


class Collator:
    """Builds the host inputs, the ``qfusion_*`` questions (with their ``qfusion_budget``) and the
    answer-only labels of a batch.

    processors: budget (m, n) -> the QFusionProcessor building inputs for it; with several, one is
        drawn per micro-batch (elastic training: nested slots make every budget the same module).
    answer_tokenizer: align: tokenizes each answer for the answer encoder;
        answer_special_tokens whether it adds its special tokens (CLIP's <eos> is read; the host's
        own <s> would only shift every mean-pooled answer alike).
    """

    def __init__(self, processors: dict, answer_tokenizer=None, answer_special_tokens: bool = True, seed: int = 0):
        self.processors = processors
        self.answer_tokenizer = answer_tokenizer
        self.answer_special_tokens = answer_special_tokens
        self.rng = random.Random(seed)

    def __call__(self, batch):
        images, conversations = zip(*batch)
        budget = self.rng.choice(sorted(self.processors))
        inputs = self.processors[budget](images=list(images), conversations=list(conversations), return_labels=True,
                                         add_generation_prompt=False)
        if self.answer_tokenizer is not None:
            # one answer per question group, in batch order (questions without an answer are dropped)
            answers = [a for c in conversations for a in answers_of(c)]
            tokens = self.answer_tokenizer(answers, padding=True, truncation=True, padding_side="right",
                                           add_special_tokens=self.answer_special_tokens, return_tensors="pt")
            inputs["answer_input_ids"], inputs["answer_attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return inputs


# ---------------------------------------------------------------------------------------------- training


LORA_DIR = "lora"
"""Folder inside a plugin directory for the LLM's LoRA weights of a run with ``lora: true`` (peft's format)."""


def load_host(cfg: TrainConfig):
    """(host with the plugin attached, its adapter, the host processor) for cfg's plugin or a new one.

    A plugin trained with LoRA on the LLM comes with its LoRA (a peft model; trainable again except in eval)."""
    model = AutoModelForImageTextToText.from_pretrained(cfg.model)
    host_processor = AutoProcessor.from_pretrained(cfg.model)
    if cfg.plugin:
        changes, runtime = plugin_changes(cfg)
        adapter = qfusion.attach(model, cfg.plugin, train_vision_tower=cfg.train_vision_tower, **runtime)
        if changes:  # e.g. a sweep setting: the plugin of this run is saved with it
            adapter.fusion.configure(**changes)
    else:
        runtime = {k: v for k, v in cfg.fusion.items() if k in RUNTIME_FIELDS}
        adapter = qfusion.attach(model, new_fusion_config(cfg.fusion), train_vision_tower=cfg.train_vision_tower,
                                 **runtime)
    if cfg.plugin and (Path(cfg.plugin) / LORA_DIR).is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(cfg.plugin) / LORA_DIR, is_trainable=cfg.stage != "eval")
    return model, adapter, host_processor


def build(cfg: TrainConfig):
    """Host with the plugin attached (+ LoRA), the processors per budget, and for align the answer encoder
    with its tokenizer and whether that adds special tokens."""
    model, adapter, host_processor = load_host(cfg)
    if cfg.lora and cfg.stage != "align" and peft_base(model) is model:
        from peft import get_peft_model

        model = get_peft_model(model, qfusion.lora_config(model, r=cfg.lora_r))
    config = adapter.fusion.config
    if cfg.stage == "elastic":
        values = cfg.budgets if cfg.budgets is not None else powers_up_to(4, config.m)
        if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
            raise ValueError(f"budgets: expected a non-empty list of positive integers, got {values!r}")
        too_large = [b for b in values if b > config.codebook_size]
        if too_large:
            raise ValueError(f"budgets: {too_large} exceed the plugin's codebook_size={config.codebook_size}")
        budgets = elastic_budgets(values)
    else:
        budgets = [adapter.budget]
    processors = {(m, n): QFusionProcessor(host_processor, model, m=m, n=n) for m, n in budgets}
    encoder = None
    if cfg.stage == "align" and cfg.text_encoder:
        text_model = AutoModel.from_pretrained(cfg.text_encoder)
        if not hasattr(text_model.config, "hidden_size"):  # a dual encoder (CLIP): keep its text tower
            text_model = text_model.text_model
        encoder = AnswerEncoder(text_model, config.contrastive_dim, pooling=cfg.text_pooling)
        encoder.tokenizer, encoder.special_tokens = AutoTokenizer.from_pretrained(cfg.text_encoder), True
    elif cfg.stage == "align":
        embeddings = model.get_input_embeddings()
        encoder = AnswerEncoder.from_input_embeddings(embeddings, config.contrastive_dim).to(embeddings.weight.device)
        encoder.tokenizer, encoder.special_tokens = host_processor.tokenizer, False
    return model, adapter, processors, encoder


def align_loss(model, encoder: AnswerEncoder, batch, cfg: "TrainConfig") -> torch.Tensor:
    """Stage 1: contrastive (⟨eos⟩ vs answer) + λ·identity, through the fusion only (no LLM forward)."""
    adapter = get_adapter(model)
    fusion = adapter.fusion
    questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"],
                                 batch["input_ids"].shape[0])
    host_inputs = {k: v for k, v in batch.items() if not k.startswith("answer_") and k != "labels"}
    features = [f.to(fusion.dtype) for f in adapter.encode(host_inputs)]
    m, n = batch["qfusion_budget"]
    out = fusion(features, [[q.to(fusion.device) for q in sample] for sample in questions], m=m, n=n)
    answer_ids = batch["answer_input_ids"]
    num = answer_ids.shape[0]
    if num != out.eos_embed.shape[0]:
        raise ValueError(
            f"data: every question needs an answer turn; {out.eos_embed.shape[0]} questions, {num} answers")
    answer_embed = encoder(answer_ids, batch["answer_attention_mask"])
    keys = [ids[mask.bool()] for ids, mask in zip(answer_ids, batch["answer_attention_mask"])]
    return contrastive_loss(out.eos_embed, answer_embed, fusion.logit_scale, keys) + \
        cfg.identity_weight * identity_loss(out.slot_states, scope=cfg.identity_scope)


def host_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("answer_") and k != "labels"}


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(gradient_accumulation_steps=cfg.optim.grad_accum, mixed_precision=precision)


def train(cfg: TrainConfig) -> dict:
    """Run one training stage; returns the final metrics (and writes the plugin into cfg.output_dir)."""
    opt = cfg.optim
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    model, adapter, processors, encoder = build(cfg)
    dataset = ConversationDataset(cfg.data, cfg.image_root)
    if cfg.stage == "sweep":
        count = max(1, int(len(dataset) * cfg.sweep.fraction))
        dataset.records = random.Random(cfg.seed).sample(dataset.records, count)
    collate = Collator(processors, getattr(encoder, "tokenizer", None), getattr(encoder, "special_tokens", True),
                       seed=cfg.seed + accelerator.process_index)
    loader = DataLoader(dataset, batch_size=opt.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = math.ceil(len(loader) / opt.grad_accum / accelerator.num_processes)
    total_steps = opt.max_steps or max(1, math.ceil(opt.epochs * steps_per_epoch))
    modules = [model] + ([encoder] if encoder is not None else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
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
                    loss = align_loss(fusion_model, encoder, batch, cfg)
                else:
                    labels = batch["labels"]
                    logits = model(**host_inputs(batch)).logits
                    # normalise by the answer tokens of the whole accumulation window on every process
                    items = accelerator.gather((labels[:, 1:] != -100).sum()).sum() * opt.grad_accum
                    loss = generation_loss(logits, labels, num_items_in_batch=items) \
                        * accelerator.num_processes * opt.grad_accum
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, opt.max_grad_norm)
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
        trained = accelerator.unwrap_model(model)
        get_adapter(trained).save_pretrained(out_dir)
        if peft_base(trained) is not trained:  # a peft model: its LoRA goes with the plugin
            trained.save_pretrained(out_dir / LORA_DIR)
        next(iter(processors.values())).save_pretrained(out_dir)  # its question settings; the budget is the plugin's
    return last


# ---------------------------------------------------------------------------------------------- evaluation


NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(r"[^\w\s'.]|_")
DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_answer(text: str) -> str:
    """An answer normalised as the VQA evaluation does: lower case; commas inside numbers and periods
    outside decimals dropped; other punctuation marks (but apostrophes) become spaces; number words
    zero..ten (and none) become digits; the articles a, an, the are dropped. (The VQA evaluation's
    table of spelled-out contractions is not applied.)

    >>> normalize_answer("The Two dogs, 1,000 times!")
    '2 dogs 1000 times'
    >>> normalize_answer("3.5 m.")
    '3.5 m'
    """
    text = DIGIT_COMMA.sub("", text.lower().strip())
    text = LONE_PERIOD.sub(" ", PUNCTUATION.sub(" ", text))
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def eval_items(dataset: ConversationDataset) -> list[dict]:
    """One item per question of every record: the conversation up to that question (the earlier
    answers given as in the data), its reference answer and its type (the turn's, else the record's)."""
    items = []
    for index, record in enumerate(dataset.records):
        history = []
        turns = record["conversations"]
        for t, turn in enumerate(turns):
            history.append(chat_turn(turn))
            if turn["from"] != "human":
                continue
            answer = turns[t + 1] if t + 1 < len(turns) else None
            if answer is None or answer["from"] == "human":
                raise ValueError(f"eval.data: record {index} has a question without an answer turn after it")
            items.append({"record": index, "conversation": list(history), "answer": answer["value"],
                          "type": turn.get("type", record.get("type"))})
    return items


def score(predictions: list[str], answers: list[str]) -> dict:
    """Exact match and VQA-normalised match, in percent, of predictions against reference answers."""
    exact = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    vqa = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
    count = len(answers)
    return {"exact_match": 100.0 * exact / count, "vqa_match": 100.0 * vqa / count, "count": count}


@torch.no_grad()
def predict(model, processor: QFusionProcessor, dataset: ConversationDataset, items: list[dict],
            batch_size: int, max_new_tokens: int, accelerator: Accelerator) -> list[str]:
    """Greedy answers to every item, this process's share in left-padded batches, gathered in item order."""
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    answers = []
    for start in range(0, len(mine), batch_size):
        chunk = [items[i] for i in mine[start:start + batch_size]]
        inputs = processor(images=[dataset.image(item["record"]) for item in chunk],
                           conversations=[item["conversation"] for item in chunk], add_generation_prompt=True)
        inputs = inputs.to(accelerator.device)
        with accelerator.autocast():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    gathered = gather_object(list(zip(mine, answers)))
    return [answer.strip() for _, answer in sorted(gathered)]


def budget_scores(predictions: list[str], items: list[dict]) -> dict:
    """{"all": scores, "by_type": {type: scores}} (types only when the items have any)."""
    answers = [item["answer"] for item in items]
    result = {"all": score(predictions, answers), "by_type": {}}
    for kind in sorted({item["type"] for item in items if item["type"] is not None}):
        chosen = [i for i, item in enumerate(items) if item["type"] == kind]
        result["by_type"][kind] = score([predictions[i] for i in chosen], [answers[i] for i in chosen])
    return result


def score_rows(result: dict, mode: str) -> list[dict]:
    """The rows of scores.csv for one evaluation: per budget, the whole set and each type (series
    ``mode`` and ``mode:type``); ``tokens`` is m, the fused tokens of a first question."""
    rows = []
    for entry in result["budgets"]:
        groups = {mode: entry["all"], **{f"{mode}:{kind}": s for kind, s in entry["by_type"].items()}}
        for series, s in groups.items():
            rows.append({"series": series, "tokens": entry["m"], "m": entry["m"], "n": entry["n"],
                         **{metric: s[metric] for metric in METRICS}, "count": s["count"]})
    return rows


def write_scores_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["series", "tokens", "m", "n", *METRICS, "count"])
        writer.writeheader()
        writer.writerows(rows)


def evaluate(cfg: TrainConfig, mode: str | None = None) -> dict:
    """Score the greedy answers of cfg's plugin on ``eval.data`` at every budget of ``eval.budgets``;
    writes ``eval.json`` (with every prediction) and ``scores.csv`` into cfg.output_dir and returns the
    eval.json content. ``mode`` names the series (default: from the plugin's use_question)."""
    accelerator = make_accelerator(cfg)
    model, adapter, host_processor = load_host(cfg)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    model.eval()
    config = adapter.fusion.config
    mode = mode or ("question" if config.use_question else "no_question")
    budgets = ([adapter.budget] if cfg.eval.budgets is None
               else parse_budgets(cfg.eval.budgets, "eval.budgets", config.codebook_size, config.n))
    dataset = ConversationDataset(cfg.eval.data, cfg.image_root)
    items = eval_items(dataset)
    result = {"plugin": cfg.plugin, "data": cfg.eval.data, "mode": mode, "budgets": [], "predictions": {}}
    for m, n in budgets:
        processor = QFusionProcessor(host_processor, model, m=m, n=n)
        predictions = predict(model, processor, dataset, items, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                              accelerator)
        result["budgets"].append({"m": m, "n": n, **budget_scores(predictions, items)})
        result["predictions"][f"m{m}-n{n}"] = predictions
    if accelerator.is_main_process:
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
        write_scores_csv(score_rows(result, mode), out_dir / "scores.csv")
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------- sweep


def sweep_budgets(cfg: TrainConfig) -> list[tuple[int, int]]:
    """The sweep's budgets: ``sweep.budgets``, or the powers of two up to the plugin's codebook_size."""
    base = FusionConfig.from_pretrained(cfg.plugin) if cfg.plugin else new_fusion_config(cfg.fusion)
    values = cfg.sweep.budgets if cfg.sweep.budgets is not None else powers_up_to(2, base.codebook_size)
    return parse_budgets(values, "sweep.budgets", base.codebook_size, cfg.fusion.get("n", base.n))


def fit_series(rows: list[dict], metric: str, bootstrap: int) -> tuple[dict, dict]:
    """(fits, reasons): P(N) fitted per series of rows on ``metric`` (``bootstrap`` resamples for the α
    interval); a series that cannot be fitted (fewer than 3 budgets, a zero score, no power law) is
    left out with the reason. A poor fit is kept (the sweep prints it with its flag, by series)."""
    fits, reasons = {}, {}
    for series in dict.fromkeys(row["series"] for row in rows):
        chosen = [row for row in rows if row["series"] == series]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PoorFitWarning)
                fits[series] = fit_power_law([row["tokens"] for row in chosen], [row[metric] for row in chosen],
                                             n_bootstrap=bootstrap)
        except ValueError as error:
            reasons[series] = str(error)
    return fits, reasons


def run_sweep(cfg: TrainConfig) -> dict:
    """Fine-tune and evaluate every (budget, mode); fit and plot the law per series; returns sweep.json's content."""
    out_dir = Path(cfg.output_dir)
    runs, rows = [], []
    for mode in cfg.sweep.modes:
        for m, n in sweep_budgets(cfg):
            name = f"m{m}-n{n}" + ("-no-question" if mode == "no_question" else "")
            fusion = merge(cfg.fusion, {"m": m, "n": n, "use_question": mode == "question"})
            run_cfg = replace(cfg, fusion=fusion, output_dir=str(out_dir / name))
            last = train(run_cfg)
            result = evaluate(replace(run_cfg, stage="eval", plugin=run_cfg.output_dir,
                                      eval=replace(cfg.eval, budgets=None)), mode)
            rows += score_rows(result, mode)
            runs.append({"name": name, "mode": mode, "m": m, "n": n, "final_loss": last.get("loss"),
                         **{k: v for k, v in result["budgets"][0].items() if k not in ("m", "n")}})
    fits, reasons = fit_series(rows, cfg.sweep.metric, cfg.sweep.bootstrap)
    summary = {"metric": cfg.sweep.metric, "runs": runs, "fits": {k: f.to_dict() for k, f in fits.items()},
               "unfitted": reasons}
    if PartialState().is_main_process:
        write_scores_csv(rows, out_dir / "scores.csv")
        save_fits(fits, out_dir / "fits.json")
        (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
        plotted = {s: ([r["tokens"] for r in rows if r["series"] == s], [r[cfg.sweep.metric] for r in rows
                                                                         if r["series"] == s], fit)
                   for s, fit in fits.items()}
        if plotted:
            plot_scaling(plotted, out_dir / "scaling.png", ylabel=f"{cfg.sweep.metric} (%)")
        for series, reason in reasons.items():
            print(f"sweep: no power law fitted for {series!r}: {reason}")
        for series, fit in fits.items():
            if fit.poor:
                print(f"sweep: poor fit for {series!r}: {fit}")
    return summary


def main(argv=None) -> None:
    cfg = load_config(argv)
    if cfg.stage == "eval":
        evaluate(cfg)
    elif cfg.stage == "sweep":
        run_sweep(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
