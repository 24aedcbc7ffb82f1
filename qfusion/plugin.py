"""The plugin directory: its one reader and its one writer, and the fit of a plugin to a host.

A plugin directory holds what qfusion adds to a host, and nothing of the host:

* ``config.json`` + ``model.safetensors``: the fusion (:class:`qfusion.QuestionFusion`);
* ``qfusion_adapter.json``: how it is wired into its host (:class:`AdapterSettings`: family, model
  type, mode, vision source, HD grid, the host's placeholder token ids);
* ``hd_front_end.safetensors``: the high-resolution front-end's weights, when the plugin has one;
* ``qfusion_processor.json`` (+ ``question_tokenizer/``): how questions are tokenized, when a
  :class:`qfusion.QFusionProcessor` was saved with it;
* ``README.md``: a model card, when the writer gives one.

:func:`save_plugin` writes every file into a temporary folder beside the target and then renames
them into place, ``qfusion_adapter.json`` last, so an interrupted save never leaves a directory
that attaches; :func:`read_plugin` refuses a directory that lacks a file the plugin needs, naming
the file. The budget (m, n) lives in ``config.json`` only.

Fitting a config to a host (:func:`fit_config`, :func:`check_fit`): ``vision_dim``, ``output_dim``
and ``text_vocab_size`` left at ``None`` are filled from the host; an explicit value that disagrees
with the host is an error naming both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from typing import Any

from safetensors.torch import load_model, save_model

from qfusion.config import CONFIG_NAME, FusionConfig
from qfusion.files import write_json
from qfusion.model import WEIGHTS_NAME, QuestionFusion
from qfusion.vision import HDFrontEnd

ADAPTER_CONFIG_NAME = "qfusion_adapter.json"
"""The adapter settings in a plugin directory."""

HD_WEIGHTS_NAME = "hd_front_end.safetensors"
"""Weights of the optional high-resolution front-end in a plugin directory."""

PROCESSOR_CONFIG_NAME = "qfusion_processor.json"
"""How the processor tokenizes questions, in a plugin directory."""

QUESTION_TOKENIZER_DIR = "question_tokenizer"
"""A separate question tokenizer, in a plugin directory."""

CARD_NAME = "README.md"
"""The plugin's model card."""

ADAPTER_FORMAT_VERSION = 2
"""Version of ``qfusion_adapter.json``: 2 adds the host's placeholder token ids (``tokens``)."""


@dataclass(frozen=True)
class AdapterSettings:
    """How a fusion is wired into a host; saved with the plugin as ``qfusion_adapter.json``.

    family: the host family's name in the registry (:func:`qfusion.register_family`).
    model_type: the host's ``config.model_type`` the plugin was attached to.
    mode: "replace" (fused tokens instead of the host's vision tokens) or, for the BLIP family,
        "augment" (after the Q-Former's query outputs).
    vision_source: where the fusion reads the host's vision features (the family's sources, e.g.
        "projector" or "tower" for LLaVA, "merger" or "tower" for Qwen-VL).
    hd_grid: (rows, cols) of the high-resolution front-end's local views, or None (LLaVA only).
    hd_merge: whether that front-end applies its local merge.
    tokens: the host's token ids the inputs are built with ("image", and where the host has them
        "video", "start", "end": the markers around every placeholder run), or None in plugins
        saved by format 1 (the processor then needs the attached model).
    """

    family: str
    model_type: str
    mode: str = "replace"
    vision_source: str = "projector"
    hd_grid: tuple[int, int] | None = None
    hd_merge: bool = True
    tokens: dict[str, int] | None = None
    format_version: int = ADAPTER_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.hd_grid is not None:
            object.__setattr__(self, "hd_grid", check_int_pair(self.hd_grid, "hd_grid"))
        if self.format_version not in (1, ADAPTER_FORMAT_VERSION):
            raise ValueError(
                f"format_version: this qfusion reads adapter formats 1 and {ADAPTER_FORMAT_VERSION}, "
                f"got {self.format_version}"
            )

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), format_version=ADAPTER_FORMAT_VERSION)

    @classmethod
    def from_json(cls, data: dict, source: str) -> "AdapterSettings":
        """Settings from a ``qfusion_adapter.json`` dict; unknown or (in format 2) missing keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown adapter settings {unknown}")
        version = data.get("format_version")
        required = known if version == ADAPTER_FORMAT_VERSION else known - {"tokens"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: missing adapter settings {missing} (format_version {version})")
        return cls(**data)


def check_int_pair(value, name: str) -> tuple[int, int]:
    """(rows, cols): two positive integers; anything else is an error naming ``name``."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name}: expected (rows, cols), two positive integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Plugin:
    """A plugin directory as read by :func:`read_plugin` (nothing loaded onto a device yet).

    directory: where it lies. config: the fusion's config. settings: the adapter settings.
    processor: the processor's settings (``qfusion_processor.json``), or None when none were saved.
    """

    directory: str
    config: FusionConfig
    settings: AdapterSettings
    processor: dict[str, Any] | None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def load_fusion(self, *, attn_impl: str = "auto", gradient_checkpointing: bool = False) -> QuestionFusion:
        """The fusion module with its saved weights (on the CPU, in the file's dtype)."""
        return QuestionFusion.from_pretrained(self.directory, attn_impl=attn_impl,
                                              gradient_checkpointing=gradient_checkpointing)

    def load_hd(self, feature_dim: int, device=None, dtype=None) -> HDFrontEnd | None:
        """The saved high-resolution front-end, for host features of width ``feature_dim``; None without one."""
        settings = self.settings
        if settings.hd_grid is None:
            return None
        front = HDFrontEnd(feature_dim, settings.hd_grid, merge=settings.hd_merge, out_dim=self.config.vision_dim)
        front = front.to(device=device, dtype=dtype)
        load_model(front, self.path(HD_WEIGHTS_NAME), strict=True, device=str(front.device))
        return front

    def question_tokenizer(self):
        """The separate question tokenizer saved with the processor, or None (questions use the host's)."""
        return _question_tokenizer(self.directory, self.processor)


def _question_tokenizer(directory: str, settings: dict | None):
    name = (settings or {}).get("question_tokenizer")
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(directory, name))


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the file is damaged") from None


def read_plugin(directory: str | os.PathLike) -> Plugin:
    """Read a plugin directory written by :func:`save_plugin`, refusing one that lacks a needed file.

    Raises FileNotFoundError naming the directory or the missing file, ValueError for a damaged or
    unknown file.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"fusion: {directory!r} is not a directory holding a saved qfusion plugin")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG_NAME)
               if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        hint = ("; a bare QuestionFusion.save_pretrained directory attaches as "
                "qfusion.attach(model, QuestionFusion.from_pretrained(directory))"
                if missing == [ADAPTER_CONFIG_NAME] else "")
        raise FileNotFoundError(
            f"fusion: {directory!r} lacks {missing[0]}; not a complete qfusion plugin (written by "
            f"adapter.save_pretrained, an interrupted save leaves none){hint}"
        )
    config = FusionConfig.from_pretrained(directory)
    adapter_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    settings = AdapterSettings.from_json(_read_json(adapter_path), adapter_path)
    if settings.hd_grid is not None and not os.path.isfile(os.path.join(directory, HD_WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"fusion: {directory!r} lacks {HD_WEIGHTS_NAME}; its settings use an HD front-end (grid {settings.hd_grid})"
        )
    processor = _processor_settings(directory) if os.path.isfile(os.path.join(directory, PROCESSOR_CONFIG_NAME)) else None
    return Plugin(directory, config, settings, processor)


def read_processor_settings(directory: str | os.PathLike) -> tuple[dict, Any]:
    """(the processor settings, the separate question tokenizer or None) saved in a directory by
    :meth:`qfusion.QFusionProcessor.save_pretrained`."""
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, PROCESSOR_CONFIG_NAME)):
        raise FileNotFoundError(f"directory: no {PROCESSOR_CONFIG_NAME} in {directory!r}")
    settings = _processor_settings(directory)
    return settings, _question_tokenizer(directory, settings)


PROCESSOR_FIELDS = ("question_special_tokens", "max_question_length", "question_tokenizer")
"""The keys of ``qfusion_processor.json``."""


def _processor_settings(directory: str) -> dict:
    path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
    settings = _read_json(path)
    if not isinstance(settings, dict) or set(settings) != set(PROCESSOR_FIELDS):
        keys = sorted(settings) if isinstance(settings, dict) else type(settings).__name__
        raise ValueError(f"{path}: expected the keys {sorted(PROCESSOR_FIELDS)}, got {keys}")
    name = settings["question_tokenizer"]
    if name is not None and not os.path.isdir(os.path.join(directory, name)):
        raise FileNotFoundError(f"fusion: {directory!r} lacks {name}/, the question tokenizer its processor names")
    return settings


def save_plugin(directory: str | os.PathLike, fusion: QuestionFusion, settings: AdapterSettings,
                hd: HDFrontEnd | None = None, *, processor: dict | None = None, question_tokenizer=None,
                card: str | None = None) -> str:
    """Write a plugin directory (see the module docstring); returns it.

    processor / question_tokenizer: the processor's settings and separate question tokenizer
        (:meth:`qfusion.QFusionProcessor.save_pretrained` writes them); when None, those of a
        plugin already at ``directory`` are kept.
    card: the model card's text (``README.md``); None keeps an existing card (or writes a plain one).

    Every file is written into a staging folder beside ``directory`` first. Then the old
    ``qfusion_adapter.json`` is removed, the other files are renamed into place, and the new
    ``qfusion_adapter.json`` comes last: a save interrupted at any point leaves a directory that
    :func:`read_plugin` refuses (naming the missing file), never a mix of two saves that attaches.
    Other files in ``directory`` (a training run's logs) are left alone.
    """
    owned = [CONFIG_NAME, WEIGHTS_NAME, HD_WEIGHTS_NAME]
    if processor is not None:
        owned += [PROCESSOR_CONFIG_NAME, QUESTION_TOKENIZER_DIR]
    if card is not None or not os.path.isfile(os.path.join(directory, CARD_NAME)):
        owned.append(CARD_NAME)
    with _staged(directory, owned, marker=ADAPTER_CONFIG_NAME) as staging:
        fusion.save_pretrained(staging)
        write_json(settings.to_json(), os.path.join(staging, ADAPTER_CONFIG_NAME), sort_keys=True)
        if hd is not None:
            save_model(hd, os.path.join(staging, HD_WEIGHTS_NAME))
        if processor is not None:
            _write_processor(staging, processor, question_tokenizer)
        if card is not None:
            with open(os.path.join(staging, CARD_NAME), "w") as f:
                f.write(card)
    return os.fspath(directory)


def save_processor_settings(directory: str | os.PathLike, settings: dict, question_tokenizer=None) -> str:
    """Write the processor's settings (and separate question tokenizer) into a directory: beside the
    files of a plugin already there, or into a folder of their own. ``qfusion_processor.json`` is
    renamed into place last, so an interrupted save leaves none (or the old one with its tokenizer)."""
    if not isinstance(settings, dict) or set(settings) != set(PROCESSOR_FIELDS):
        raise ValueError(f"settings: expected the keys {sorted(PROCESSOR_FIELDS)}, got {settings!r}")
    with _staged(directory, [QUESTION_TOKENIZER_DIR], marker=PROCESSOR_CONFIG_NAME) as staging:
        _write_processor(staging, settings, question_tokenizer)
    return os.fspath(directory)


def _write_processor(staging: str, settings: dict, question_tokenizer) -> None:
    if question_tokenizer is not None:
        question_tokenizer.save_pretrained(os.path.join(staging, QUESTION_TOKENIZER_DIR))
    write_json(settings, os.path.join(staging, PROCESSOR_CONFIG_NAME), sort_keys=True)


@contextlib.contextmanager
def _staged(directory: str | os.PathLike, owned: list[str], marker: str):
    """A staging folder beside ``directory``; on success its entries replace ``owned`` + ``marker``
    there, the marker removed first and renamed into place last. The staging folder is always removed."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_directory: {directory!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.", dir=parent)
    try:
        yield staging
        os.makedirs(directory, exist_ok=True)
        _remove(os.path.join(directory, marker))  # from here on the directory reads as incomplete
        for name in owned:
            _remove(os.path.join(directory, name))
            if os.path.exists(os.path.join(staging, name)):
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        os.replace(os.path.join(staging, marker), os.path.join(directory, marker))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


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


def check_fit(config: FusionConfig, host: dict[str, int], source: str) -> None:
    """Raise unless a built fusion's widths are the host's (``vision_dim``, ``output_dim``), naming both."""
    for name in ("vision_dim", "output_dim"):
        value = getattr(config, name)
        if value != host[name]:
            raise ValueError(f"fusion: {source} has {name}={value}, this host needs {name}={host[name]}")


def check_tokens(settings: AdapterSettings, tokens: dict, source: str) -> None:
    """Raise unless a plugin saved with its host's token ids (``settings.tokens``; format 1 saved none)
    was saved for these ``tokens``, naming both."""
    if settings.tokens is not None and settings.tokens != tokens:
        raise ValueError(f"fusion: {source} was saved for a host with token ids {settings.tokens}, this host has "
                         f"{tokens}")


def push_plugin(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                folders: tuple[str, ...] = (), commit_message: str = "Upload qfusion plugin") -> str:
    """Upload a complete plugin directory to the Hugging Face Hub; returns the commit's URL.

    Only the plugin's own files go up (config, weights, adapter and processor settings, question
    tokenizer, model card) and the sub-folders named in ``folders`` (e.g. a LoRA saved beside it);
    whatever else shares the folder (checkpoints, training logs) stays. An incomplete plugin is
    refused as :func:`read_plugin` refuses it. token: default the one of ``hf auth login`` / HF_TOKEN.
    """
    from huggingface_hub import HfApi

    read_plugin(directory)
    names = [CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG_NAME, HD_WEIGHTS_NAME, PROCESSOR_CONFIG_NAME, CARD_NAME]
    patterns = names + [f"{folder}/**" for folder in (QUESTION_TOKENIZER_DIR, *folders)]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(directory), allow_patterns=patterns,
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
