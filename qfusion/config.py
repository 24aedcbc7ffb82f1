"""FusionConfig: every setting of a QuestionFusion module, validated on construction."""

from __future__ import annotations

import json
import os
import math
from dataclasses import asdict, dataclass, field, fields, replace

from qfusion.budget import Budget
from qfusion.files import write_json
from qfusion.layout import POLICIES
from qfusion.ops.attention import IMPLEMENTATIONS

FORMAT_VERSION = 2
"""Version of the on-disk format (config.json + model.safetensors) this code writes. Format 1 files
also read: they carried the stage-1 loss weights (``identity_weight``, ``identity_scope``), which
belong to the training recipe now and are dropped on load."""

TRAINING_FIELDS_OF_FORMAT_1 = ("identity_weight", "identity_scope")
"""Keys of a format-1 config.json that are training settings, not the module's."""

CONFIG_NAME = "config.json"


RUNTIME_FIELDS = ("attn_impl", "gradient_checkpointing")
"""Fields chosen when a module is built or loaded, not part of its identity: never written to config.json."""


def _help(text: str, default, kind: type | tuple[type, ...] | None = None, optional: bool = False):
    return field(default=default, metadata={"help": text, "kind": kind, "optional": optional})


def _check_kind(name: str, value, kind, optional: bool) -> None:
    """Type-check one field by kind: bool, int (not bool), finite float (int accepted), str."""
    if value is None and optional:
        return
    if kind is bool:
        ok = isinstance(value, bool)
        expected = "a bool (True or False)"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    else:
        ok = isinstance(value, kind)
        expected = f"a {kind.__name__}"
    if not ok:
        suffix = " or None (from the host)" if optional else ""
        raise TypeError(f"{name}: expected {expected}{suffix}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class FusionConfig:
    """Settings of a QuestionFusion module (the defaults follow the paper's fusion: hidden 1024, 20 layers).

    Immutable: derive a changed config with :meth:`replace`. ``vision_dim``, ``output_dim`` and
    ``text_vocab_size`` default to ``None`` = "from the host": ``qfusion.attach`` fills them (a module
    built on its own needs them set). ``m``/``n`` are the default budget; a call may use another
    (``forward(..., m=, n=)``, the host's ``qfusion_budget``). ``attn_impl`` and
    ``gradient_checkpointing`` are runtime choices, not saved with the weights.

    >>> cfg = FusionConfig(vision_dim=32, hidden_size=64, num_layers=2, num_heads=4,
    ...                    intermediate_size=128, codebook_size=16, m=8, n=2, output_dim=48)
    >>> FusionConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.replace(m=4).m
    4
    """

    vision_dim: int | None = _help(
        "Width of the vision tokens fed to the fusion (host vision features); None = from the host.", None, int,
        optional=True)
    hidden_size: int = _help("Width of the fusion transformer.", 1024, int)
    num_layers: int = _help("Number of decoder layers of the fusion transformer.", 20, int)
    num_heads: int = _help("Attention heads; must divide hidden_size.", 16, int)
    intermediate_size: int = _help("Hidden width of the SwiGLU MLP.", 2816, int)
    codebook_size: int = _help(
        "Largest number of query slots allowed (m); the codebook holds codebook_size - 1 rows, the "
        "last slot of every group is the shared <eos> embedding.", 768, int)
    m: int = _help("Slots (fused tokens) for the first question of a sample.", 64, int)
    n: int = _help("Slots for every later question of the same sample (n <= m).", 16, int)
    output_dim: int | None = _help(
        "Width of the fused tokens: the host LLM's (or projection's) input width; None = from the host.", None, int,
        optional=True)
    text_vocab_size: int | None = _help(
        "Vocabulary size of the fusion's question embedding; None = the host LLM's (questions tokenized by the "
        "host tokenizer).", None, int, optional=True)
    mask: str = _help("Attention mask policy: 'causal' (the paper), 'prefix' or 'grouped'.", "causal", str)
    attn_impl: str = _help("Attention implementation: 'auto', 'eager', 'sdpa', 'flex' or 'triton'.", "auto", str)
    use_question: bool = _help(
        "False gives the paper's ablation: every group holds only its slots, no question text.", True, bool)
    contrastive_dim: int = _help("Width of the <eos> embedding used by the contrastive loss.", 512, int)
    output_mlp: bool = _help("Project fused tokens with a 2-layer GELU MLP instead of one Linear.", False, bool)
    gradient_checkpointing: bool = _help("Recompute decoder layers in backward to save memory.", False, bool)
    rms_norm_eps: float = _help("Epsilon of the RMSNorm layers.", 1e-6, float)
    rope_theta: float = _help("Base of the rotary position frequencies.", 10000.0, float)
    initializer_range: float = _help("Standard deviation of the initial weights.", 0.02, float)
    format_version: int = _help("On-disk format version; checked on load.", FORMAT_VERSION, int)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_kind(f.name, getattr(self, f.name), f.metadata["kind"], f.metadata["optional"])
        positive = ("vision_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "codebook_size", "m", "n", "output_dim", "text_vocab_size", "contrastive_dim")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of hidden_size={self.hidden_size}, got {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"num_heads: rotary positions need an even head dim, got hidden_size/num_heads = "
                f"{self.hidden_size // self.num_heads}"
            )
        Budget.of((self.m, self.n), name="m, n", codebook_size=self.codebook_size)
        if self.mask not in POLICIES:
            raise ValueError(f"mask: expected one of {POLICIES}, got {self.mask!r}")
        if self.attn_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attn_impl: expected one of {IMPLEMENTATIONS}, got {self.attn_impl!r}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version: this qfusion writes format {FORMAT_VERSION}, got {self.format_version} "
                "(files of format 1 are read with FusionConfig.from_dict)"
            )

    def replace(self, **changes) -> "FusionConfig":
        """A copy with some fields changed (validated like a new config)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"changes: unknown FusionConfig fields {unknown}")
        return replace(self, **changes)

    def unresolved(self) -> list[str]:
        """The host-determined fields still None (``qfusion.attach`` fills them)."""
        return [name for name in ("vision_dim", "output_dim", "text_vocab_size") if getattr(self, name) is None]

    @property
    def budget(self) -> Budget:
        """The default budget (m, n)."""
        return Budget(self.m, self.n)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        """Every field (the runtime ones included); see :meth:`architecture_dict` for what is saved."""
        return asdict(self)

    def architecture_dict(self) -> dict:
        """The fields that define the weights and the default budget: what config.json holds."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, data: dict, source: str = "data") -> "FusionConfig":
        """Build a config from a dict (e.g. a config.json), strictly: unknown keys and missing keys are
        errors naming them (a missing key never falls back to a default, which would change the
        module). ``format_version`` decides how the file is read: format 1 files drop their
        training keys (:data:`TRAINING_FIELDS_OF_FORMAT_1`)."""
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a dict, got {type(data).__name__}")
        if "format_version" not in data:
            raise ValueError(f"{source}: no 'format_version'; not a qfusion config")
        version = data["format_version"]
        if version not in (1, FORMAT_VERSION):
            raise ValueError(
                f"{source}: format_version {version!r}; this qfusion reads formats 1 and {FORMAT_VERSION} "
                "(saved by a newer qfusion release?)"
            )
        data = dict(data)
        if version == 1:
            for name in TRAINING_FIELDS_OF_FORMAT_1:
                data.pop(name, None)
            data["format_version"] = FORMAT_VERSION
        saved = {f.name for f in fields(cls) if f.name not in RUNTIME_FIELDS}
        known = saved | set(RUNTIME_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown FusionConfig fields {unknown}")
        missing = sorted(saved - set(data))
        if missing:
            raise ValueError(
                f"{source}: missing FusionConfig fields {missing}; a config.json holds every architecture field "
                "(a default would silently change the module)"
            )
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write config.json into save_directory (created if needed); returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        write_json(self.architecture_dict(), path, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FusionConfig":
        """Read config.json from a directory written by ``save_pretrained``."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {os.fspath(directory)!r}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error}); the file is damaged") from None
        return cls.from_dict(data, source=path)
