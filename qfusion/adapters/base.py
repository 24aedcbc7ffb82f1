"""What every host adapter shares: attaching a fusion to a model instance and undoing it exactly.

An adapter patches one model *instance* (never a transformers class): its ``forward`` and
``generate`` become functions with explicit signatures that take the host's usual inputs plus
``qfusion_input_ids`` / ``qfusion_attention_mask`` (B, G_max, L_max) and ``qfusion_cache``, turn the
images and questions into fused tokens, and hand those to the host's own code where its vision
tokens went. The fusion is the submodule ``model.qfusion``; the patched code looks it up at every
call (peft's ``modules_to_save`` replaces it by a wrapper around a trainable copy, and that copy is
the one that must run). ``detach`` restores every instance attribute, ``requires_grad`` flag and
save rule the adapter changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from types import MethodType
from typing import Any, Callable, ClassVar

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from qfusion.adapters.cache import FusionCache
from qfusion.config import CONFIG_NAME, FusionConfig
from qfusion.model import WEIGHTS_NAME, QuestionFusion
from qfusion.vision import HDFrontEnd

ADAPTER_CONFIG_NAME = "qfusion_adapter.json"
"""The adapter's settings in a plugin directory (beside the fusion's config.json and model.safetensors)."""

HD_WEIGHTS_NAME = "hd_front_end.safetensors"
"""Weights of the optional high-resolution front-end in a plugin directory."""

ADAPTER_FORMAT_VERSION = 1

FUSION_MODULE = "qfusion"
"""Name of the fusion submodule on an attached host (and of peft's ``modules_to_save`` entry)."""

HD_MODULE = "qfusion_hd"
"""Name of the optional high-resolution front-end submodule on an attached host."""

_HANDLE = "_qfusion_adapter"


class _Missing:
    """Marks an instance attribute the host did not have before attach (survives copy.deepcopy)."""

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


@dataclass
class AdapterSettings:
    """How a fusion is wired into a host; saved with the plugin as ``qfusion_adapter.json``.

    family: "llava" (LLaVA, LLaVA-NeXT) or "blip2" (BLIP-2, InstructBLIP).
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
            self.hd_grid = tuple(self.hd_grid)
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


def active_module(module: nn.Module) -> nn.Module:
    """The module that actually runs: peft's ``modules_to_save`` wrapper stands for its active copy."""
    while hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
        if module.disable_adapters or not module.active_adapters:
            module = module.original_module
        else:
            module = module.modules_to_save[module.active_adapters[0]]
    return module


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers host inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_questions(qfusion_input_ids, qfusion_attention_mask, batch_size: int) -> list[list[Tensor]]:
    """Per sample, the 1-D id tensors of its questions, from (B, G_max, L_max) padded inputs.

    An all-zero mask row is an empty question slot; a sample's questions fill its first slots.
    """
    if not isinstance(qfusion_input_ids, Tensor) or qfusion_input_ids.dim() != 3:
        shape = (tuple(qfusion_input_ids.shape) if isinstance(qfusion_input_ids, Tensor)
                 else type(qfusion_input_ids).__name__)
        raise ValueError(
            f"qfusion_input_ids: expected a (batch, max_questions, max_question_length) integer tensor, got {shape}"
        )
    if qfusion_input_ids.dtype.is_floating_point or qfusion_input_ids.dtype == torch.bool:
        raise TypeError(f"qfusion_input_ids: expected integer token ids, got dtype {qfusion_input_ids.dtype}")
    if qfusion_input_ids.shape[0] != batch_size:
        raise ValueError(
            f"qfusion_input_ids: expected one row per sample ({batch_size} in input_ids/pixel_values), "
            f"got {qfusion_input_ids.shape[0]}"
        )
    if qfusion_attention_mask is None:
        mask = torch.ones_like(qfusion_input_ids, dtype=torch.bool)
    else:
        if not isinstance(qfusion_attention_mask, Tensor) or qfusion_attention_mask.shape != qfusion_input_ids.shape:
            shape = (tuple(qfusion_attention_mask.shape) if isinstance(qfusion_attention_mask, Tensor)
                     else type(qfusion_attention_mask).__name__)
            raise ValueError(
                f"qfusion_attention_mask: expected shape {tuple(qfusion_input_ids.shape)} like "
                f"qfusion_input_ids, got {shape}"
            )
        if not bool(((qfusion_attention_mask == 0) | (qfusion_attention_mask == 1)).all()):
            raise ValueError("qfusion_attention_mask: expected only 0 and 1")
        mask = qfusion_attention_mask.bool()
    present = mask.any(-1).cpu()  # (B, G_max)
    questions = []
    for b in range(batch_size):
        count = int(present[b].sum())
        if count == 0:
            raise ValueError(f"qfusion_attention_mask: sample {b} has no question (every row of its mask is zero)")
        if not bool(present[b, :count].all()):
            raise ValueError(
                f"qfusion_attention_mask: sample {b} has an empty question slot before a filled one; "
                "a sample's questions must fill its first slots"
            )
        questions.append([qfusion_input_ids[b, g][mask[b, g]] for g in range(count)])
    return questions


def placeholder_runs(ids: Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in a 1-D id tensor, in order."""
    is_token = (ids == token_id).cpu().tolist()
    runs, length = [], 0
    for flag in is_token + [False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def check_placeholders(input_ids: Tensor, token_id: int, expected: list[list[int]], m: int, n: int,
                       prefix: int = 0) -> None:
    """Every sample's image placeholders form exactly the runs ``expected[b]`` (one run per question)."""
    for b, want in enumerate(expected):
        found = placeholder_runs(input_ids[b], token_id)
        if found != want:
            extra = f"{prefix} host query tokens + " if prefix else ""
            raise ValueError(
                f"input_ids: sample {b} has image placeholder runs {found} (total {sum(found)}), expected "
                f"{want} (total {sum(want)}): {extra}m={m} before its first question and n={n} before each "
                f"of its {len(want) - 1} later question(s); build the inputs with qfusion.QFusionProcessor"
            )


class _SaveExclusion:
    """The keys a host's ``save_pretrained`` skips: its own list plus everything under the plugin's modules.

    Computed at save time, so it follows the modules (also when peft wraps them). It holds the model
    itself (not a weak reference) so that ``copy.deepcopy`` of the host points the copy at the copy.
    """

    def __init__(self, model: nn.Module, original, names: tuple[str, ...]):
        self._model = model
        self._original = set(original or ())
        self._names = names

    def _keys(self) -> set[str]:
        keys = set(self._original)
        for name in self._names:
            module = self._model._modules.get(name)
            if module is not None:
                keys.update(f"{name}.{k}" for k in module.state_dict())
        return keys

    def __iter__(self):
        return iter(sorted(self._keys()))

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key) -> bool:
        return key in self._keys()


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_int_pair(value, name: str) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name}: expected (rows, cols), two positive integers, got {value!r}")
    return tuple(value)


class HostAdapter:
    """Base of the per-family adapters: fusion placement, patching, freezing, saving.

    Subclasses say where the host keeps its parts (``llm_name``, ``_module_groups``), what width the
    fusion reads and writes (``feature_dim``, ``fusion_output_dim``) and provide the patched
    ``forward``/``generate`` (``_patched_methods``). Users get an instance from :func:`qfusion.attach`
    (or :func:`qfusion.adapters.get_adapter` later): ``adapter.fusion``, ``adapter.save_pretrained(dir)``.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    modes: ClassVar[tuple[str, ...]] = ("replace",)
    vision_sources: ClassVar[tuple[str, ...]] = ("tower",)
    supports_hd: ClassVar[bool] = False

    def __init__(self, model: nn.Module, settings: AdapterSettings):
        self.model = model
        self.settings = settings
        self._saved_attributes: dict[str, Any] = {}
        self._saved_requires_grad: dict[str, bool] = {}
        self._check_host()

    # ------------------------------------------------------------------ host facts (per family)

    llm_name: ClassVar[str]
    """Dotted name of the language model inside the host (for freezing and LoRA targeting)."""

    def _check_host(self) -> None:
        """Raise for hosts this adapter cannot serve (called before anything is changed)."""

    @property
    def feature_dim(self) -> int:
        """Width of the host vision features the fusion (or the HD front-end) reads."""
        raise NotImplementedError

    @property
    def fusion_output_dim(self) -> int:
        """Width of the fused tokens the host expects."""
        raise NotImplementedError

    @property
    def llm_vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_prefix(self) -> int:
        """Host tokens placed before the first question's fused tokens (BLIP ``augment``: the Q-Former's)."""
        return 0

    def _module_groups(self) -> dict[str, list[str]]:
        """Dotted names of the host's parts: "vision_tower", "projector", "llm"."""
        raise NotImplementedError

    def _patched_methods(self) -> dict[str, Callable]:
        """name -> function(self_model, ...) replacing that method on the instance."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the plugin modules

    @property
    def fusion(self) -> QuestionFusion:
        """The fusion module that runs now (peft's trainable copy when peft wraps ``model.qfusion``)."""
        return active_module(getattr(self.model, FUSION_MODULE))

    @property
    def hd(self) -> HDFrontEnd | None:
        module = self.model._modules.get(HD_MODULE)
        return None if module is None else active_module(module)

    @property
    def m(self) -> int:
        return self.fusion.config.m

    @property
    def n(self) -> int:
        return self.fusion.config.n

    def group_sizes(self, num_questions: int) -> list[int]:
        """Placeholder runs for a sample with ``num_questions`` questions: [prefix + m, n, n, ...]."""
        return [self.image_prefix + self.m] + [self.n] * (num_questions - 1)

    def fused_tokens(self, encode: Callable[[], tuple[list[Tensor], Any]], pixel_values: Tensor | None,
                     questions: list[list[Tensor]], cache: FusionCache | None, context: Tensor | None = None):
        """(per sample, per question, the (k, output_dim) fused tokens in the fusion's dtype; host outputs).

        encode: () -> (B host feature tensors (V_b, vision_dim), other host outputs the caller needs);
            the features are cast here to the fusion's dtype and device.
        cache: a FusionCache to reuse the vision prefix of earlier turns, or None.
        context: other inputs the images are encoded with (a change invalidates the cache).
        """
        fusion = self.fusion
        device = fusion.device
        questions = [[q.to(device) for q in sample] for sample in questions]

        def vision():
            features, host = encode()
            return [v.to(device=device, dtype=fusion.dtype) for v in features], host

        if cache is None:
            features, host = vision()
            return fusion(features, questions).tokens, host
        if not isinstance(cache, FusionCache):
            raise TypeError(f"qfusion_cache: expected a qfusion.adapters.FusionCache, got {type(cache).__name__}")
        return cache.fuse(fusion, vision, pixel_values, questions, context)

    def _questions(self, qfusion_input_ids, qfusion_attention_mask, input_ids) -> list[list[Tensor]]:
        """Validated questions of a call with images; the placeholders in input_ids must fit them."""
        if qfusion_input_ids is None:
            raise ValueError(
                "qfusion_input_ids: required with images on a model with a qfusion plugin attached (the "
                "questions, (batch, max_questions, max_question_length)); build them with "
                "qfusion.QFusionProcessor, or qfusion.detach(model) to use the host alone"
            )
        if input_ids is None:
            raise ValueError(
                "input_ids: required with qfusion_input_ids (the image placeholders are found in them; "
                "inputs_embeds alone are not supported)"
            )
        questions = split_questions(qfusion_input_ids, qfusion_attention_mask, input_ids.shape[0])
        check_placeholders(input_ids, self.image_token_id, [self.group_sizes(len(q)) for q in questions],
                           self.m, self.n, self.image_prefix)
        return questions

    @staticmethod
    def _check_images(pixel_values, batch_size: int) -> None:
        if pixel_values is not None and pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"pixel_values: expected one image per sample ({batch_size} rows in input_ids), got "
                f"{pixel_values.shape[0]} images"
            )

    # ------------------------------------------------------------------ attach / detach

    def install(self, fusion: QuestionFusion, hd: HDFrontEnd | None, *, train_vision_tower: bool,
                train_projector: bool, train_llm: bool) -> None:
        model = self.model
        for name in (FUSION_MODULE, HD_MODULE, _HANDLE):
            if name in model.__dict__ or name in model._modules:
                raise ValueError(f"model: already has {name!r}; qfusion.detach(model) first")
        self._saved_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        trainable = {"vision_tower": train_vision_tower, "projector": train_projector, "llm": train_llm}
        model.requires_grad_(False)
        for group, names in self._module_groups().items():
            for name in names:
                part = model.get_submodule(name) if _is_module(model, name) else model.get_parameter(name)
                part.requires_grad_(trainable[group])
        model.add_module(FUSION_MODULE, fusion)
        if hd is not None:
            model.add_module(HD_MODULE, hd)
        self._saved_attributes["_keys_to_ignore_on_save"] = model.__dict__.get("_keys_to_ignore_on_save", _MISSING)
        model._keys_to_ignore_on_save = _SaveExclusion(
            model, getattr(model, "_keys_to_ignore_on_save", None), (FUSION_MODULE, HD_MODULE)
        )
        for name, function in self._patched_methods().items():
            self._saved_attributes[name] = model.__dict__.get(name, _MISSING)
            function._qfusion_patch = True  # lets detach tell its own patch from a later one
            setattr(model, name, MethodType(function, model))
        model.__dict__[_HANDLE] = self

    def uninstall(self) -> QuestionFusion:
        model = self.model
        for name in self._patched_methods_names():
            current = model.__dict__.get(name)
            if not (getattr(current, "__self__", None) is model
                    and getattr(getattr(current, "__func__", None), "_qfusion_patch", False)):
                raise RuntimeError(
                    f"model.{name}: was replaced after qfusion.attach (e.g. by another library); undo that first"
                )
        module = model._modules[FUSION_MODULE]
        if active_module(module) is not module:
            raise RuntimeError(
                "model.qfusion: is wrapped by peft; unload the peft model (merge_and_unload() or unload()) "
                "before qfusion.detach"
            )
        for name, value in self._saved_attributes.items():
            if value is _MISSING:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = value
        del model._modules[FUSION_MODULE]
        model._modules.pop(HD_MODULE, None)
        for name, p in model.named_parameters():
            if name in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[name])
        del model.__dict__[_HANDLE]
        return module

    @staticmethod
    def of(model: nn.Module) -> "HostAdapter":
        """The adapter attached to a host (looked up at call time, so a deep copy uses its own)."""
        return model.__dict__[_HANDLE]

    def host_method(self, name: str) -> Callable:
        """The host's own ``name`` method, bound, as it was before attach."""
        saved = self._saved_attributes.get(name, _MISSING)
        return getattr(type(self.model), name).__get__(self.model) if saved is _MISSING else saved

    def _patched_methods_names(self) -> list[str]:
        return [name for name in self._saved_attributes if name != "_keys_to_ignore_on_save"]

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the plugin only: the fusion (config.json, model.safetensors), the adapter settings
        (qfusion_adapter.json) and, with the HD front-end, its weights. ``qfusion.attach(host, dir)``
        restores it. Returns the directory."""
        os.makedirs(save_directory, exist_ok=True)
        self.fusion.save_pretrained(save_directory)
        self.settings.save(save_directory)
        hd = self.hd
        if hd is not None:
            save_model(hd, os.path.join(save_directory, HD_WEIGHTS_NAME))
        return os.fspath(save_directory)

    def __repr__(self) -> str:
        cfg = self.fusion.config
        return (f"{type(self).__name__}(model_type={self.settings.model_type!r}, mode={self.settings.mode!r}, "
                f"vision_source={self.settings.vision_source!r}, hd_grid={self.settings.hd_grid}, "
                f"m={cfg.m}, n={cfg.n}, vision_dim={cfg.vision_dim}, output_dim={cfg.output_dim})")


# ---------------------------------------------------------------------- building the plugin modules


def resolve_settings(adapter_cls: type[HostAdapter], model_type: str, saved: AdapterSettings | None,
                     mode: str | None, vision_source: str | None, hd) -> AdapterSettings:
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
    for name, value in (("mode", mode), ("vision_source", vision_source), ("hd_grid", grid)):
        if value is None:
            continue
        if saved is not None and getattr(saved, name) != value:
            raise ValueError(
                f"{name}: the plugin was trained with {name}={getattr(saved, name)!r}, got {value!r}"
            )
        setattr(settings, name, value)
    if merge is not None:
        settings.hd_merge = merge
    return dataclasses.replace(settings, model_type=model_type)


def _default(name: str):
    return next(f.default for f in fields(FusionConfig) if f.name == name)


def fit_config(config: FusionConfig, vision_dim: int, output_dim: int, text_vocab_size: int) -> FusionConfig:
    """Fit a config to the host: vision_dim / output_dim left at the dataclass default are filled from the
    host, other values must match; a default text_vocab_size becomes the host LLM's vocabulary size (the
    questions are tokenized with the host tokenizer by default)."""
    updates = {}
    for name, host in (("vision_dim", vision_dim), ("output_dim", output_dim)):
        value = getattr(config, name)
        if value == host:
            continue
        if value == _default(name):
            updates[name] = host
        else:
            raise ValueError(f"fusion: {name}={value} does not fit the host, which needs {name}={host}")
    if config.text_vocab_size == _default("text_vocab_size"):
        updates["text_vocab_size"] = text_vocab_size
    return dataclasses.replace(config, **updates) if updates else config


def check_fit(fusion: QuestionFusion, vision_dim: int, output_dim: int, source: str) -> None:
    for name, host in (("vision_dim", vision_dim), ("output_dim", output_dim)):
        value = getattr(fusion.config, name)
        if value != host:
            raise ValueError(f"fusion: {source} has {name}={value}, this host needs {name}={host}")


def load_plugin(directory: str | os.PathLike) -> tuple[QuestionFusion, AdapterSettings | None]:
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(f"fusion: no {CONFIG_NAME} in {os.fspath(directory)!r}; not a saved qfusion plugin")
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise FileNotFoundError(f"fusion: no {WEIGHTS_NAME} in {os.fspath(directory)!r}; not a saved qfusion plugin")
    return QuestionFusion.from_pretrained(os.fspath(directory)), AdapterSettings.load(directory)


def load_hd(directory: str | os.PathLike, hd: HDFrontEnd) -> None:
    path = os.path.join(directory, HD_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fusion: the plugin's settings use an HD front-end but {path!r} is missing")
    load_model(hd, path, strict=True, device=str(hd.device))
