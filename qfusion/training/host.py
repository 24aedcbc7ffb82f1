"""The host of a run: loaded, its plugin attached (new or saved, + the LLM's LoRA), and what a stage
needs around it (its budgets, the answer encoder of stage 1)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

import qfusion
from qfusion.adapters import HostAdapter, get_adapter, unwrap_model
from qfusion.budget import Budget
from qfusion.config import RUNTIME_FIELDS, FusionConfig
from qfusion.processor import QFusionProcessor
from qfusion.training.config import TrainConfig

LORA_DIR = "lora"
"""Folder inside a plugin directory for the LLM's LoRA (peft's format), when a run trained one."""

RECONFIGURABLE = ("m", "n", "use_question")
"""Fusion settings a run may change on a loaded plugin (they change no weight)."""


def on_cpu() -> bool:
    """Whether this machine has no accelerator: then every process of a run computes on the CPU (several
    processes, e.g. under ``torchrun``, talk through gloo)."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def process_state():
    """accelerate's ``PartialState`` of this process, set up as the Trainer sets it up (CPU runs included)."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu())


def precision(config: TrainConfig) -> str:
    """The run's mixed precision: 'no', 'bf16' or 'fp16' ('auto': bf16 on a GPU that has it)."""
    chosen = config.optim.mixed_precision
    if chosen == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return chosen


def new_fusion_config(fusion: dict) -> FusionConfig:
    """The FusionConfig of a new plugin from the ``fusion`` settings; an m (n) left out defaults to
    FusionConfig's default capped at codebook_size (m), so a small codebook needs no budget of its own."""
    defaults = {f.name: f.default for f in fields(FusionConfig)}
    architecture = {k: v for k, v in fusion.items() if k not in RUNTIME_FIELDS}
    codebook = architecture.get("codebook_size", defaults["codebook_size"])
    if isinstance(codebook, int):
        architecture.setdefault("m", min(defaults["m"], codebook))
        if isinstance(architecture["m"], int):
            architecture.setdefault("n", min(defaults["n"], architecture["m"]))
    try:
        return FusionConfig(**architecture)
    except (TypeError, ValueError) as error:
        raise type(error)(f"fusion.{error}") from None


def plugin_changes(config: TrainConfig) -> tuple[dict, dict]:
    """(reconfigurable changes, runtime choices) of ``config.fusion`` for its loaded plugin; any other
    setting must equal the plugin's, else an error naming it."""
    saved = FusionConfig.from_pretrained(config.plugin).to_dict()
    changes, runtime = {}, {}
    for key, value in config.fusion.items():
        if key in RUNTIME_FIELDS:
            runtime[key] = value
        elif key in RECONFIGURABLE:
            changes[key] = value
        elif saved[key] is not None and value != saved[key]:
            raise ValueError(
                f"fusion.{key}: the plugin {config.plugin!r} was built with {key}={saved[key]!r}, the config asks "
                f"for {value!r}; drop the setting or train a new plugin (only {list(RECONFIGURABLE)} may change)"
            )
    return changes, runtime


@dataclass
class Host:
    """A loaded host with its plugin: ``model`` (a peft model when it carries the LLM's LoRA), its
    ``adapter``, the host's processor and the ``processor`` building the plugin's inputs."""

    model: nn.Module
    adapter: HostAdapter
    host_processor: object
    processor: QFusionProcessor


def load_host(config: TrainConfig, host: nn.Module | None = None, host_processor=None, *,
              train_lora: bool = False) -> Host:
    """The host of ``config.model`` (or ``host``, a model not attached yet) with ``config.plugin`` (or a
    new plugin from ``config.fusion``) attached, the plugin's LoRA loaded (trainable with
    ``train_lora``), or a new LoRA when ``train_lora`` and ``lora.enabled`` and the plugin has none.

    With bf16 / fp16 mixed precision the host is loaded in that dtype and the plugin kept in float32
    (its master weights). host_processor: the host's processor (default: ``AutoProcessor`` of the
    checkpoint).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    mixed = precision(config)
    if host is None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
        host = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype)
    if host_processor is None:
        host_processor = AutoProcessor.from_pretrained(config.model)
    wiring = config.adapter
    attach = {"mode": wiring.mode, "vision_source": wiring.vision_source,
              "hd": None if wiring.hd_grid is None else tuple(wiring.hd_grid)}
    if config.plugin:
        changes, runtime = plugin_changes(config)
        adapter = qfusion.attach(host, config.plugin, **attach, **runtime)
        if changes:  # e.g. a sweep's budget: the plugin of this run is saved with it
            adapter.fusion.configure(**changes)
    else:
        runtime = {k: v for k, v in config.fusion.items() if k in RUNTIME_FIELDS}
        adapter = qfusion.attach(host, new_fusion_config(config.fusion), **attach, **runtime)
    if config.optim.gradient_checkpointing:
        adapter.fusion.gradient_checkpointing = True
    if mixed != "no":
        for module in (adapter.fusion, adapter.hd):
            if module is not None:
                module.float()
    model = host
    saved_lora = Path(config.plugin) / LORA_DIR if config.plugin else None
    if saved_lora is not None and saved_lora.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(host, saved_lora, is_trainable=train_lora and config.lora.enabled)
    elif train_lora and config.lora.enabled:
        from peft import get_peft_model

        lora = config.lora
        model = get_peft_model(host, qfusion.lora_config(host, r=lora.r, lora_alpha=lora.alpha,
                                                         lora_dropout=lora.dropout,
                                                         target_modules=lora.target_modules,
                                                         train_vision_tower=lora.vision_tower))
    processor = QFusionProcessor(host_processor, model)
    return Host(model, get_adapter(model), host_processor, processor)


def checkpoint_llm(model: nn.Module) -> None:
    """Recompute the host's layers in backward (transformers' activation checkpointing, non-reentrant)."""
    host = unwrap_model(model)
    if hasattr(host, "activation_checkpointing_enable"):
        host.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers releases before the rename
        host.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def takes_text_only(model: nn.Module) -> bool:
    """Whether the host runs a conversation without any image (BLIP hosts' forward requires pixel_values)."""
    import inspect

    parameter = inspect.signature(type(unwrap_model(model)).forward).parameters.get("pixel_values")
    return parameter is None or parameter.default is not inspect.Parameter.empty


def refuse_text_only(model: nn.Module, where: str) -> None:
    """An error naming ``where`` (a record) for a text-only conversation on a host that cannot run one."""
    if not takes_text_only(model):
        raise ValueError(f"{where}: has no image or video, and a {unwrap_model(model).config.model_type!r} host "
                         "cannot run a conversation without one (its forward requires pixel_values); leave such "
                         "records out of its data")


def is_peft(model: nn.Module) -> bool:
    """Whether the host is wrapped by peft (it carries the LLM's LoRA)."""
    return unwrap_model(model) is not model


def powers_up_to(base: int, limit: int) -> list[int]:
    """1, base, base², ... up to limit, and limit itself."""
    values = [1]
    while values[-1] * base <= limit:
        values.append(values[-1] * base)
    return values + ([limit] if values[-1] != limit else [])


def parse_budgets(values, name: str, codebook_size: int, default_n: int) -> list[Budget]:
    """Budgets from ``[m, ...]`` or ``[[m, n], ...]``: an m alone takes n = min(default_n, m)."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name}: expected a non-empty list of m or [m, n], got {values!r}")
    budgets = []
    for i, value in enumerate(values):
        pair = (value, min(default_n, value)) if isinstance(value, int) and not isinstance(value, bool) else value
        budgets.append(Budget.of(pair, name=f"{name}[{i}]", codebook_size=codebook_size))
    return budgets


def stage_budgets(config: TrainConfig, adapter: HostAdapter) -> list[Budget]:
    """The budgets a training stage draws from: elastic, every (m, n <= m) of ``elastic.budgets``
    (default the powers of 4 up to the plugin's m); otherwise the plugin's own (m, n)."""
    if config.stage != "elastic":
        return [adapter.budget]
    fusion = adapter.fusion.config
    values = config.elastic.budgets if config.elastic.budgets is not None else powers_up_to(4, fusion.m)
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
        raise ValueError(f"elastic.budgets: expected a non-empty list of positive integers, got {values!r}")
    too_large = sorted(b for b in values if b > fusion.codebook_size)
    if too_large:
        raise ValueError(f"elastic.budgets: {too_large} exceed the plugin's codebook_size={fusion.codebook_size}")
    return [Budget(m, n) for m, n in sorted({(m, n) for m in values for n in values if n <= m})]


def answer_encoder(config: TrainConfig, host: Host):
    """Stage 1's answer encoder: (an AnswerEncoder, the tokenizer of the answers, whether it adds its
    special tokens). ``align.text_encoder`` names a transformers text model; none: the host LLM's
    own input embeddings, mean-pooled and frozen (only the projection trains)."""
    from transformers import AutoModel, AutoTokenizer

    from qfusion.answer_encoder import AnswerEncoder

    contrastive_dim = host.adapter.fusion.config.contrastive_dim
    if config.align.text_encoder:
        text_model = AutoModel.from_pretrained(config.align.text_encoder)
        if not hasattr(text_model.config, "hidden_size"):  # a dual encoder (CLIP): keep its text tower
            text_model = text_model.text_model
        encoder = AnswerEncoder(text_model, contrastive_dim, pooling=config.align.text_pooling)
        return encoder, AutoTokenizer.from_pretrained(config.align.text_encoder), True
    embeddings = host.model.get_input_embeddings()
    encoder = AnswerEncoder.from_input_embeddings(embeddings, contrastive_dim).to(embeddings.weight.device)
    # the host's own <s> in front of every mean-pooled answer would shift them all alike
    return encoder, host.host_processor.tokenizer, False
