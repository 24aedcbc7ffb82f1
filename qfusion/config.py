"""FusionConfig: every setting of a QuestionFusion module, validated on construction."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from qfusion.layout import POLICIES
from qfusion.ops.attention import IMPLEMENTATIONS

FORMAT_VERSION = 1
"""Version of the on-disk format (config.json + model.safetensors) this code reads and writes."""

CONFIG_NAME = "config.json"


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class FusionConfig:
    """Settings of a QuestionFusion module (the defaults follow the paper's fusion: hidden 1024, 20 layers).

    >>> cfg = FusionConfig(vision_dim=32, hidden_size=64, num_layers=2, num_heads=4,
    ...                    intermediate_size=128, codebook_size=16, m=8, n=2, output_dim=48)
    >>> FusionConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    vision_dim: int = _help("Width of the vision tokens fed to the fusion (host vision tower output).", 1024)
    hidden_size: int = _help("Width of the fusion transformer.", 1024)
    num_layers: int = _help("Number of decoder layers of the fusion transformer.", 20)
    num_heads: int = _help("Attention heads; must divide hidden_size.", 16)
    intermediate_size: int = _help("Hidden width of the SwiGLU MLP.", 2816)
    codebook_size: int = _help(
        "Largest number of query slots allowed (m); the codebook holds codebook_size - 1 rows, the "
        "last slot of every group is the shared <eos> embedding.", 768)
    m: int = _help("Slots (fused tokens) for the first question of a sample.", 64)
    n: int = _help("Slots for every later question of the same sample (n <= m).", 16)
    output_dim: int = _help("Width of the fused tokens: the host LLM's hidden size.", 4096)
    text_vocab_size: int = _help("Vocabulary size of the fusion's own question embedding.", 49408)
    mask: str = _help("Attention mask policy: 'causal' (the paper), 'prefix' or 'grouped'.", "causal")
    attn_impl: str = _help("Attention implementation: 'auto', 'eager', 'sdpa', 'flex' or 'triton'.", "auto")
    use_question: bool = _help(
        "False gives the paper's ablation: every group holds only its slots, no question text.", True)
    contrastive_dim: int = _help("Width of the <eos> embedding used by the contrastive loss.", 512)
    output_mlp: bool = _help("Project fused tokens with a 2-layer GELU MLP instead of one Linear.", False)
    gradient_checkpointing: bool = _help("Recompute decoder layers in backward to save memory.", False)
    rms_norm_eps: float = _help("Epsilon of the RMSNorm layers.", 1e-6)
    rope_theta: float = _help("Base of the rotary position frequencies.", 10000.0)
    initializer_range: float = _help("Standard deviation of the initial weights.", 0.02)
    identity_weight: float = _help("Weight λ of the identity loss in stage 1 (L_con + λ·L_id).", 1.0)
    identity_scope: str = _help("Identity loss scope: 'group' (SPEC default) or 'batch' (seed code).", "group")
    format_version: int = _help("On-disk format version; checked on load.", FORMAT_VERSION)

    def __post_init__(self) -> None:
        positive = ("vision_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "codebook_size", "m", "n", "output_dim", "text_vocab_size", "contrastive_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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
        if self.m > self.codebook_size:
            raise ValueError(f"m: expected m <= codebook_size={self.codebook_size}, got {self.m}")
        if self.n > self.m:
            raise ValueError(f"n: expected n <= m={self.m}, got {self.n}")
        if self.mask not in POLICIES:
            raise ValueError(f"mask: expected one of {POLICIES}, got {self.mask!r}")
        if self.attn_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attn_impl: expected one of {IMPLEMENTATIONS}, got {self.attn_impl!r}")
        if self.identity_scope not in ("group", "batch"):
            raise ValueError(f"identity_scope: expected 'group' or 'batch', got {self.identity_scope!r}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if self.identity_weight < 0:
            raise ValueError(f"identity_weight: expected >= 0, got {self.identity_weight!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version: this qfusion reads format {FORMAT_VERSION}, got {self.format_version} "
                "(saved by a different qfusion release)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FusionConfig":
        """Build a config from a dict (e.g. a config.json); unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"data: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown FusionConfig fields {unknown}")
        if "format_version" not in data:
            raise ValueError("data: no 'format_version'; not a qfusion config")
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write config.json into save_directory (created if needed); returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FusionConfig":
        """Read config.json from a directory written by ``save_pretrained``."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {os.fspath(directory)!r}")
        with open(path) as f:
            return cls.from_dict(json.load(f))
