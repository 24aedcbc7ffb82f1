"""The plugin on disk and its fit to a host.

A plugin directory holds the fusion (``config.json`` + ``model.safetensors``, written by
``QuestionFusion.save_pretrained``), how it is wired into its host (``qfusion_adapter.json``) and,
with the high-resolution front-end, that front-end's weights. The budget (m, n) lives in
``config.json`` only.

Fitting a config to a host: ``vision_dim``, ``output_dim`` and ``text_vocab_size`` left at ``None``
are filled from the host; an explicit value that disagrees with the host is an error naming both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields

from safetensors.torch import load_model, save_model
from torch import nn

from qfusion.config import CONFIG_NAME, FusionConfig
from qfusion.model import WEIGHTS_NAME, QuestionFusion
from qfusion.vision import HDFrontEnd

ADAPTER_CONFIG_NAME = "qfusion_adapter.json"
"""The adapter's settings in a plugin directory (beside the fusion's config.json and model.safetensors)."""

HD_WEIGHTS_NAME = "hd_front_end.safetensors"
"""Weights of the optional high-resolution front-end in a plugin directory."""

ADAPTER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterSettings:
    """How a fusion is wired into a host; saved with the plugin as ``qfusion_adapter.json``.

    family: "llava" (LLaVA, LLaVA-NeXT, LLaVA-OneVision), "qwen_vl" (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) or
        "blip2" (BLIP-2, InstructBLIP).
    model_type: the host's ``config.model_type`` the plugin was attached to.
    mode: BLIP family: "replace" (fused tokens instead of the Q-Former's query outputs) or
        "augment" (fused tokens after them). LLaVA family: always "replace".
    vision_source: LLaVA family: "projector" (the host's vision features after its multimodal
        projector, as its LLM would see them) or "tower" (the selected vision-tower features before
        it). BLIP family: always "tower" (the vision model's last hidden state).
    hd_grid: (rows, cols) of the high-resolution front-end's local views, or None (LLaVA only).
    hd_merge: whether that front-end applies its local merge.
    """

    family: str
    model_type: str
    mode: str = "replace"
    vision_source: str = "projector"
    hd_grid: tuple[int, int] | None = None
    hd_merge: bool = True
    format_version: int = ADAPTER_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.hd_grid is not None:
            object.__setattr__(self, "hd_grid", _check_int_pair(self.hd_grid, "hd_grid"))
        if self.format_version != ADAPTER_FORMAT_VERSION:
            raise ValueError(
                f"format_version: this qfusion reads adapter format {ADAPTER_FORMAT_VERSION}, "
                f"got {self.format_version}"
            )

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AdapterSettings | None":
        path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            data = json.load(f)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown adapter settings {unknown}")
        return cls(**data)


def _check_int_pair(value, name: str) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name}: expected (rows, cols), two positive integers, got {value!r}")
    return tuple(value)


def resolve_settings(adapter_cls, model_type: str, saved: AdapterSettings | None, mode: str | None,
                     vision_source: str | None, hd) -> AdapterSettings:
    """Settings from the defaults, a saved plugin's settings and the explicit arguments (which must agree)."""
    if saved is not None and saved.family != adapter_cls.family:
        raise ValueError(
            f"fusion: the plugin was saved for a {saved.family!r} host ({saved.model_type}), "
            f"this model is {model_type!r} ({adapter_cls.family!r} family)"
        )
    if mode is not None and mode not in adapter_cls.modes:
        raise ValueError(f"mode: expected one of {adapter_cls.modes} for a {model_type!r} host, got {mode!r}")
    if vision_source is not None and vision_source not in adapter_cls.vision_sources:
        raise ValueError(
            f"vision_source: expected one of {adapter_cls.vision_sources} for a {model_type!r} host, "
            f"got {vision_source!r}"
        )
    if hd is not None and not adapter_cls.supports_hd:
        raise ValueError(f"hd: the high-resolution front-end is supported on 'llava' hosts only, got {model_type!r}")
    grid = merge = None
    if isinstance(hd, HDFrontEnd):
        grid, merge = hd.grid, not isinstance(hd.local_merge, nn.Identity)
    elif hd is not None:
        grid, merge = _check_int_pair(hd, "hd"), True
    settings = saved or AdapterSettings(family=adapter_cls.family, model_type=model_type,
                                        mode=adapter_cls.modes[0], vision_source=adapter_cls.vision_sources[0])
    updates = {"model_type": model_type}
    for name, value in (("mode", mode), ("vision_source", vision_source), ("hd_grid", grid)):
        if value is None:
            continue
        if saved is not None and getattr(saved, name) != value:
            raise ValueError(f"{name}: the plugin was trained with {name}={getattr(saved, name)!r}, got {value!r}")
        updates[name] = value
    if merge is not None:
        updates["hd_merge"] = merge
    return dataclasses.replace(settings, **updates)


HOST_FIELDS = ("vision_dim", "output_dim", "text_vocab_size")
"""FusionConfig fields a host determines (``None`` = fill from the host at attach)."""


def fit_config(config: FusionConfig, host: dict[str, int], source: str = "fusion") -> FusionConfig:
    """The config with its host fields filled in; an explicit value that disagrees is an error.

    host: the host's value of each of :data:`HOST_FIELDS` that must match (``text_vocab_size`` may be
        omitted: then an explicit value is kept, e.g. for a separate question tokenizer).
    """
    updates = {}
    for name in HOST_FIELDS:
        value, wanted = getattr(config, name), host.get(name)
        if value is None:
            if wanted is None:
                raise ValueError(f"{source}: {name} is None (from the host) but this host does not determine it")
            updates[name] = wanted
        elif wanted is not None and name != "text_vocab_size" and value != wanted:
            raise ValueError(f"{source}: has {name}={value}, this host needs {name}={wanted}")
    return config.replace(**updates) if updates else config


def check_fit(fusion: QuestionFusion, host: dict[str, int], source: str) -> None:
    """Raise unless an existing fusion's dimensions are the host's."""
    for name in ("vision_dim", "output_dim"):
        value = getattr(fusion.config, name)
        if value != host[name]:
            raise ValueError(f"fusion: {source} has {name}={value}, this host needs {name}={host[name]}")


def load_plugin(directory: str | os.PathLike) -> tuple[QuestionFusion, AdapterSettings | None]:
    """The fusion and adapter settings of a plugin directory written by ``adapter.save_pretrained``."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"fusion: no {name} in {os.fspath(directory)!r}; not a saved qfusion plugin")
    return QuestionFusion.from_pretrained(os.fspath(directory)), AdapterSettings.load(directory)


def build_hd(settings: AdapterSettings, hd, feature_dim: int, out_dim: int | None, directory=None,
             device=None, dtype=None) -> HDFrontEnd | None:
    """The HD front-end a plugin uses: the one given, a new one, or the saved one of ``directory``."""
    if settings.hd_grid is None:
        return None
    if isinstance(hd, HDFrontEnd):
        if hd.vision_dim != feature_dim:
            raise ValueError(f"hd: vision_dim={hd.vision_dim} does not fit the host features ({feature_dim})")
        return hd
    front = HDFrontEnd(feature_dim, settings.hd_grid, merge=settings.hd_merge, out_dim=out_dim or feature_dim)
    front = front.to(device=device, dtype=dtype)
    if directory is not None:
        path = os.path.join(directory, HD_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fusion: the plugin's settings use an HD front-end but {path!r} is missing")
        load_model(front, path, strict=True, device=str(front.device))
    return front


def save_plugin(directory: str | os.PathLike, fusion: QuestionFusion, settings: AdapterSettings,
                hd: HDFrontEnd | None) -> str:
    """Write a plugin directory (see the module docstring); returns it."""
    os.makedirs(directory, exist_ok=True)
    fusion.save_pretrained(directory)
    settings.save(directory)
    if hd is not None:
        save_model(hd, os.path.join(directory, HD_WEIGHTS_NAME))
    return os.fspath(directory)
