"""TrainConfig: every setting of a training run, its sections, and how they are read and listed.

Settings come from YAML files (several merge in order: a model file, then a size file) and
``--set KEY=VALUE`` overrides, dotted into sections (``--set optim.lr=1e-3``); a mapping value
merges into its section (``--set "fusion={m: 4, n: 4}"`` changes those two fields only). An
unknown key, a mistyped value or a value that is not YAML is an error naming it. The help of
every setting (``--help``, the table of docs/training.md) is generated from the fields below
(:func:`settings_rows`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from qfusion.config import FusionConfig

STAGES = ("align", "generate", "elastic", "eval", "sweep")
"""The stages: align (stage 1), generate (stage 2), elastic (stage 2, a budget drawn per micro-batch),
eval, sweep (stage 3)."""

TRAINING_STAGES = ("align", "generate", "elastic")
"""Stages that train one plugin."""

MODES = ("question", "no_question")
"""The sweep's modes: the question fused, and the paper's ablation without it."""

METRICS = ("exact_match", "vqa_match")
"""The scores of the eval stage, in percent."""

BASELINES = ("avg_pool", "random")
"""Training-free baselines of the eval stage at the plugin's N: the host's vision tokens average-pooled
to N, and N of them chosen at random."""


def setting(default, help: str, *, factory=None):
    """A settings field with its one line of help (``factory`` for a mutable default)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Training data (section ``data``)."""

    train: str | None = setting(None, "training data: a conversation JSONL file (read by qfusion), or what "
                                      "datasets.load_dataset reads (a .json / .parquet file, a folder, a hub id)")
    image_root: str = setting(".", "folder the records' image and video paths are relative to")
    split: str = setting("train", "the split of a datasets source")
    streaming: bool = setting(False, "stream a datasets source instead of loading it (then set optim.max_steps)")
    num_frames: int | None = setting(None, "frames sampled uniformly from a video file; null = all frames")
    num_workers: int = setting(0, "dataloader worker processes")

    def __post_init__(self) -> None:
        _at_least("data.num_workers", self.num_workers, 0)
        if self.num_frames is not None:
            _at_least("data.num_frames", self.num_frames, 1)


@dataclass
class AdapterConfig:
    """How a new plugin is wired into its host (section ``adapter``); a loaded plugin keeps its own (a
    different value is an error naming it)."""

    mode: str | None = setting(None, "'replace' (fused tokens instead of the host's vision tokens) or, for BLIP "
                                     "hosts, 'augment' (after the Q-Former's); null = the family's default")
    vision_source: str | None = setting(None, "where the fusion reads the host's vision features, one of the "
                                              "family's sources (LLaVA 'projector' or 'tower', Qwen-VL 'merger' "
                                              "or 'tower'); null = the family's default")
    hd_grid: list | None = setting(None, "[rows, cols] of the high-resolution front-end's local views, plain LLaVA "
                                         "only (the paper's HD-9: [3, 3]); null = none")


@dataclass
class OptimConfig:
    """Optimisation (section ``optim``): the paper's 7B settings by default; a small fresh plugin needs a
    far larger learning rate (examples/configs/small-plugin.yaml)."""

    lr: float = setting(2e-5, "peak learning rate (AdamW, cosine schedule)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float | None = setting(None, "share of the steps warming up; null = 0.1 for align, 0.03 otherwise")
    max_steps: int | None = setting(None, "optimizer steps; null = optim.epochs over the data")
    epochs: float = setting(2.0, "passes over the data when optim.max_steps is null")
    batch_size: int = setting(4, "samples per process per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0 = none")
    mixed_precision: str = setting("auto", "'auto' (bf16 on a GPU that has it, else none), 'no', 'bf16' or 'fp16'; "
                                           "with bf16 / fp16 the frozen host is loaded in that dtype")
    gradient_checkpointing: bool = setting(False, "recompute the fusion's layers (and the host LLM's in stage 2) "
                                                  "in backward to save memory")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            _at_least(f"optim.{name}", getattr(self, name), 1)
        if self.max_steps is not None:
            _at_least("optim.max_steps", self.max_steps, 1)
        if not self.lr > 0:
            raise ValueError(f"optim.lr: expected > 0, got {self.lr}")
        if not self.epochs > 0:
            raise ValueError(f"optim.epochs: expected > 0, got {self.epochs}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio: expected in [0, 1) or null, got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ValueError(f"optim.max_grad_norm: expected >= 0, got {self.max_grad_norm}")
        _one_of("optim.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))


@dataclass
class AlignConfig:
    """Stage 1 (section ``align``): the answer encoder and the loss weights."""

    text_encoder: str | None = setting(None, "a transformers text model (dir or hub id) encoding the answers, e.g. "
                                             "CLIP's; null = the host LLM's own input embeddings (nothing to load)")
    text_pooling: str = setting("eos", "how text_encoder's states are pooled: 'eos' (CLIP), 'mean' or 'cls'")
    identity_weight: float = setting(1.0, "weight λ of the identity loss: contrastive + λ·identity")
    identity_scope: str = setting("group", "identity loss over each group's slots ('group') or all slots of the "
                                           "batch ('batch', as the seed code)")
    gather_negatives: bool = setting(True, "with several processes, contrast against every process's question "
                                           "groups (false: this process's micro-batch only)")

    def __post_init__(self) -> None:
        _one_of("align.text_pooling", self.text_pooling, ("eos", "mean", "cls"))
        _one_of("align.identity_scope", self.identity_scope, ("group", "batch"))
        if self.identity_weight < 0:
            raise ValueError(f"align.identity_weight: expected >= 0, got {self.identity_weight}")


@dataclass
class ElasticConfig:
    """The elastic stage (section ``elastic``)."""

    budgets: list | None = setting(None, "the m drawn per micro-batch (n <= m drawn from them too); null = the "
                                         "powers of 4 up to the plugin's m, and m")


@dataclass
class LoraConfig:
    """LoRA on the host LLM (section ``lora``), saved in the plugin's lora/ folder (peft's format)."""

    enabled: bool = setting(False, "train LoRA on the LLM in the generation stages (align has no LLM forward)")
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha")
    dropout: float = setting(0.05, "LoRA dropout")
    target_modules: list = setting(None, "layer names inside the LLM that get LoRA", factory=lambda: ["q_proj", "v_proj"])
    vision_tower: bool = setting(False, "also train the vision tower (saved with the LoRA, peft's modules_to_save)")

    def __post_init__(self) -> None:
        _at_least("lora.r", self.r, 1)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout: expected in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"lora.target_modules: expected a non-empty list of layer names, got {self.target_modules!r}")


@dataclass
class LogConfig:
    """Logging and checkpoints (section ``log``)."""

    every: int = setting(1, "log (metrics.jsonl, report_to) every this many optimizer steps")
    save_every: int = setting(500, "write a checkpoint every this many optimizer steps (and at the end)")
    save_total_limit: int | None = setting(2, "checkpoints kept (the newest); null = all")
    report_to: str = setting("none", "where the Trainer reports: 'none', 'tensorboard' (when installed), 'all', "
                                     "or names separated by commas")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        _at_least("log.every", self.every, 1)
        _at_least("log.save_every", self.save_every, 1)
        if self.save_total_limit is not None:
            _at_least("log.save_total_limit", self.save_total_limit, 1)


@dataclass
class EvalConfig:
    """Evaluation (section ``eval``): greedy answers on held-out conversations."""

    data: str | None = setting(None, "held-out conversations (as data.train; images under data.image_root)")
    budgets: list | None = setting(None, "[m, ...] or [[m, n], ...] (an m alone takes n = min(the plugin's n, m)); "
                                         "null = the plugin's budget")
    batch_size: int = setting(8, "questions per generate call")
    max_new_tokens: int = setting(16, "longest answer generated")
    baselines: list = setting(None, f"training-free baselines at the same N, a subset of {list(BASELINES)}",
                              factory=lambda: list(BASELINES))

    def __post_init__(self) -> None:
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.max_new_tokens", self.max_new_tokens, 1)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown or len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"eval.baselines: expected a subset of {list(BASELINES)}, got {self.baselines!r}")


@dataclass
class SweepConfig:
    """The budget sweep (section ``sweep``): per mode a stage-2 plugin of its own, then one fine-tune and
    evaluation per budget, and one comparison of both modes."""

    budgets: list | None = setting(None, "[m, ...] or [[m, n], ...]; null = the powers of two up to "
                                         "codebook_size, and codebook_size")
    modes: list = setting(None, f"a subset of {list(MODES)}", factory=lambda: list(MODES))
    plugins: dict = setting(None, "mode -> a stage-2 plugin of that mode to fine-tune from; a mode without one "
                                  "gets its own generate stage first (from `plugin`)", factory=dict)
    fraction: float = setting(0.1, "share of the training data each budget's fine-tune runs on")
    metric: str = setting("vqa_match", f"the score the power law is fitted to, one of {list(METRICS)}")
    bootstrap: int = setting(1000, "bootstrap resamples for each fit's alpha interval")

    def __post_init__(self) -> None:
        if not self.modes or any(mode not in MODES for mode in self.modes) or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"sweep.modes: expected a non-empty subset of {list(MODES)}, got {self.modes!r}")
        unknown = sorted(set(self.plugins) - set(MODES))
        if unknown:
            raise ValueError(f"sweep.plugins: expected keys from {list(MODES)}, got {unknown}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"sweep.fraction: expected in (0, 1], got {self.fraction}")
        _one_of("sweep.metric", self.metric, METRICS)
        _at_least("sweep.bootstrap", self.bootstrap, 0)


@dataclass
class HubConfig:
    """Sharing (section ``hub``): push the trained plugin to the Hugging Face Hub."""

    repo_id: str | None = setting(None, "push the plugin (files, model card, LoRA) to this repo after training; "
                                        "null = no push (the token comes from `hf auth login` or HF_TOKEN)")
    private: bool = setting(False, "create the repo private")


@dataclass
class TrainConfig:
    """Every setting of a run (YAML keys of the same names; the defaults follow the paper's Appendix C)."""

    stage: str = setting("generate", f"one of {list(STAGES)}")
    model: str = setting("", "host checkpoint (directory or hub id) of a supported family")
    plugin: str | None = setting(None, "start from (eval: evaluate) this saved plugin; null = a new plugin")
    output_dir: str = setting("qfusion-out", "where the plugin, checkpoints, metrics and results go")
    seed: int = setting(0, "seed of the plugin's initialisation, the data order and the elastic budget draws")
    resume: bool = setting(False, "continue from the last complete checkpoint in output_dir (exactly: same "
                                  "losses, data order and final weights as an uninterrupted run)")
    fusion: dict = setting(None, "FusionConfig fields: a new plugin's architecture, or a loaded plugin's "
                                 "m / n / use_question / runtime choices", factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self) -> None:
        _one_of("stage", self.stage, STAGES)
        if not self.model:
            raise ValueError("model: expected a host checkpoint (directory or hub id), got none")
        if not self.data.train and self.stage != "eval":
            raise ValueError(f"data.train: the {self.stage} stage trains on conversations; expected their path")
        if self.stage in ("eval", "sweep") and not self.eval.data:
            raise ValueError(f"eval.data: the {self.stage} stage scores answers on held-out conversations; "
                             "expected their path")
        if self.stage == "eval" and not self.plugin:
            raise ValueError("plugin: the eval stage needs a saved plugin directory to evaluate")
        unknown = sorted(set(self.fusion) - {f.name for f in fields(FusionConfig)})
        if unknown:
            raise ValueError(f"fusion: unknown FusionConfig fields {unknown}")
        if self.data.streaming and self.optim.max_steps is None and self.stage in TRAINING_STAGES:
            raise ValueError("optim.max_steps: a streamed data set (data.streaming) has no length to count epochs "
                             "over; set the number of optimizer steps")

    @property
    def warmup_ratio(self) -> float:
        """The warm-up share of this stage (optim.warmup_ratio, or the paper's 0.1 for align, 0.03 else)."""
        if self.optim.warmup_ratio is not None:
            return self.optim.warmup_ratio
        return 0.1 if self.stage == "align" else 0.03

    def replace(self, **changes) -> "TrainConfig":
        """A copy with top-level fields changed; a mapping given for a section merges into it
        (``config.replace(eval={"budgets": [4]})`` changes that one field)."""
        for name, value in changes.items():
            current = getattr(self, name)
            if is_dataclass(current) and isinstance(value, dict):
                changes[name] = build_config(type(current), merge(dataclasses.asdict(current), value), f"{name}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as a nested mapping (what a YAML file of them holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The settings from a nested mapping (sections as mappings); unknown keys and mistyped values
        are errors naming the key."""
        return build_config(cls, values)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name}: expected >= {low}, got {value}")


def _one_of(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}")


# ---------------------------------------------------------------------------------------------- reading


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
    """``--set a.b=value`` -> ``{"a": {"b": value}}``; the value is parsed as YAML (and ``1e-3`` as a
    number, which YAML 1.1 reads as a string). A value that is not YAML is an error naming ``--set`` and the key."""
    import yaml

    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"--set: expected KEY=VALUE with KEY a name or a dotted path (optim.lr), got {item!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"--set {key.strip()}: the value {text!r} is not valid YAML ({problem})") from None
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        value = float(value)
    for part in reversed(parts):
        value = {part: value}
    return value


def read_yaml(path: str) -> dict:
    """The mapping of settings in a YAML file; anything else is an error naming ``--config`` and the file."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such file {path!r}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config: {path!r} is not valid YAML ({error})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config: expected a mapping of settings in {path!r}, got {type(loaded).__name__}")
    return loaded


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


def _section_of() -> dict[str, str]:
    """Key -> section of every key that lives in a section (for the hint of an unknown top-level key)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: name for name, kind in hints.items() if is_dataclass(kind) for f in fields(kind)}


def build_config(cls, values: dict, prefix: str = ""):
    """A settings dataclass from a (nested) mapping; unknown keys and mistyped values are errors naming the key."""
    if not isinstance(values, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        sections = _section_of() if cls is TrainConfig else {}
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


def load_config(files=(), overrides=(), **fields_given) -> TrainConfig:
    """A TrainConfig from YAML ``files`` (merged in order), then ``overrides`` (``--set`` items), then
    top-level ``fields_given`` that are not None (``stage=``, ``plugin=``, ``output_dir=``)."""
    values: dict = {}
    for path in files:
        values = merge(values, read_yaml(path))
    for item in overrides:
        values = merge(values, parse_override(item))
    values.update({key: value for key, value in fields_given.items() if value is not None})
    return build_config(TrainConfig, values)


# ---------------------------------------------------------------------------------------------- listing


def _type_name(hint) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in options)


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value else "''"
    return str(value)


def settings_rows() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, help) of every setting, in the order of the config; ``fusion``'s rows
    are FusionConfig's fields."""
    rows = []
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = hints[f.name]
        if is_dataclass(kind):
            section_hints = typing.get_type_hints(kind)
            rows += [(f.name, f"{f.name}.{g.name}", _type_name(section_hints[g.name]), _default_text(g),
                      g.metadata["help"]) for g in fields(kind)]
        elif f.name == "fusion":
            fusion_hints = typing.get_type_hints(FusionConfig)
            rows += [("fusion", f"fusion.{g.name}", _type_name(fusion_hints[g.name]), _default_text(g),
                      g.metadata["help"]) for g in fields(FusionConfig) if g.name != "format_version"]
        else:
            rows.append(("", f.name, _type_name(kind), _default_text(f), f.metadata["help"]))
    return rows


def section_docs() -> dict[str, str]:
    """Section name -> the first line of its docstring ('' for the top-level settings)."""
    hints = typing.get_type_hints(TrainConfig)
    docs = {"": "Top-level settings.", "fusion": "The plugin's architecture (section ``fusion``, FusionConfig's fields)."}
    for name, kind in hints.items():
        if is_dataclass(kind):
            docs[name] = kind.__doc__.strip().splitlines()[0]
    return docs


def settings_markdown() -> str:
    """The settings table of docs/training.md: one row per setting (key, type, default, help)."""
    lines = ["| setting | type | default | help |", "|---|---|---|---|"]
    for _, key, kind, default, text in settings_rows():
        cell = text.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{default}` | {cell} |")
    return "\n".join(lines)


def settings_help() -> str:
    """Every setting by section, with type, default and help (the epilog of ``--help``)."""
    docs = section_docs()
    lines, current = [], None
    for section, key, kind, default, text in settings_rows():
        if section != current:
            current = section
            lines.append(f"\n{docs[section].replace('``', '')}")
        lines.append(f"  {key} ({kind}, default {default}): {text}")
    return "settings (YAML keys; --set KEY=VALUE):" + "\n".join(lines)
