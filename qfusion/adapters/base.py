"""HostAdapter: what a host family must tell qfusion, and the fused-token step every family shares.

A family's adapter (``llava.py``, ``blip2.py``, ...) states host facts: where its parts live, what
width the fusion reads and writes, and its patched calls; patching, plugin files and the input
protocol live in ``patching.py``, ``plugin.py`` and :mod:`qfusion.inputs`. The fusion is the
submodule ``model.qfusion``, looked up at every call (peft's ``modules_to_save`` swaps in a copy).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from qfusion.adapters.cache import FusionCache
from qfusion.adapters.lora import active_module, unwrap_model
from qfusion.adapters.patching import InstancePatch, QFusionArguments
from qfusion.adapters.plugin import AdapterSettings, save_plugin
from qfusion.budget import Budget
from qfusion.inputs import VisualPlan, check_left_padded, decode_call
from qfusion.model import QuestionFusion
from qfusion.vision import HDFrontEnd

FUSION_MODULE = "qfusion"
"""Name of the fusion submodule on an attached host (and of peft's ``modules_to_save`` entry)."""

HD_MODULE = "qfusion_hd"
"""Name of the optional high-resolution front-end submodule on an attached host."""

HANDLE = "_qfusion_adapter"
"""Instance attribute of an attached host that holds its adapter."""


class HostAdapter:
    """Base of the per-family adapters; users get one from :func:`qfusion.attach`.

    ``adapter.fusion`` is the module that runs, ``adapter.budget`` the default (m, n),
    ``adapter.save_pretrained(dir)`` writes the plugin only.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    modes: ClassVar[tuple[str, ...]] = ("replace",)
    vision_sources: ClassVar[tuple[str, ...]] = ("tower",)
    supports_hd: ClassVar[bool] = False
    supports_multi_image: ClassVar[bool] = False
    llm_name: ClassVar[str]
    """Dotted name of the language model inside the host (for LoRA targeting)."""

    seam: ClassVar[str] = "mm_encoder_outputs"
    """The host forward's parameter for precomputed image embeddings, through which fused tokens enter."""

    def __init__(self, model: nn.Module, settings: AdapterSettings):
        self.model = model
        self.settings = settings
        self.patch: InstancePatch | None = None
        if self.seam not in inspect.signature(type(model).forward).parameters:
            import transformers

            raise TypeError(
                f"model: {type(model).__name__}.forward has no {self.seam!r} parameter in transformers "
                f"{transformers.__version__}; the fused tokens could not reach its LLM (upgrade transformers)"
            )
        self.check_host()

    def check_host(self) -> None:
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
    def placeholder_ids(self) -> tuple[int, ...]:
        """The placeholder token ids the fused tokens fill (images; with video, its placeholder too)."""
        return (self.image_token_id,)

    @property
    def image_prefix(self) -> int:
        """Host tokens placed before the first question's fused tokens (BLIP ``augment``: the Q-Former's)."""
        return 0

    def module_groups(self) -> dict[str, list[str]]:
        """Dotted names of the host's parts: "vision_tower", "projector", "llm"."""
        raise NotImplementedError

    patched: ClassVar[tuple[str, ...]] = ("forward", "generate")
    """The host methods replaced on the instance; ``patched_<name>(args, qfusion)`` runs each call."""

    @property
    def fusion(self) -> QuestionFusion:
        """The fusion module that runs now (peft's trainable copy when peft wraps ``model.qfusion``)."""
        return active_module(getattr(self.model, FUSION_MODULE))

    @property
    def hd(self) -> HDFrontEnd | None:
        module = self.model._modules.get(HD_MODULE)
        return None if module is None else active_module(module)

    @property
    def budget(self) -> Budget:
        """The plugin's configured default (m, n)."""
        return self.fusion.config.budget

    def call_budget(self, qfusion: QFusionArguments) -> Budget:
        """The (m, n) of one call: its ``qfusion_budget`` or the configured default."""
        if qfusion.budget is None:
            return self.budget
        return Budget.of(qfusion.budget, codebook_size=self.fusion.config.codebook_size)

    # ------------------------------------------------------------------ the shared fused-token step

    def questions(self, qfusion: QFusionArguments, input_ids, budget: tuple[int, int]):
        """(validated questions, per sample per question the new images it brings or None) of a call
        with images; the placeholders in input_ids must fit them."""
        return decode_call(input_ids, qfusion.input_ids, qfusion.attention_mask, qfusion.image_counts,
                           token_id=self.placeholder_ids, budget=budget, prefix=self.image_prefix,
                           multi_image=self.supports_multi_image, host=self.settings.model_type)

    @staticmethod
    def check_generation_inputs(input_ids, attention_mask) -> None:
        """Batched generation appends after the last column: refuse right padding."""
        if input_ids is not None and input_ids.shape[0] > 1:
            check_left_padded(attention_mask)

    def fused_tokens(self, encode: Callable[[], tuple[list[Tensor], Any]], pixel_values: Tensor | None,
                     questions: list[list[Tensor]], cache: FusionCache | None, budget: tuple[int, int],
                     context: Tensor | None = None, image_counts: list[list[int]] | None = None,
                     num_images: int | None = None):
        """(per sample, per question, the (k, output_dim) fused tokens in placeholder order, in the
        fusion's dtype; the host outputs of ``encode``). Every visual input is fused with the questions
        about it (:class:`qfusion.inputs.VisualPlan`).

        encode: () -> (one host feature tensor (V_i, vision_dim) per visual input of the batch, in
            prompt order; other host outputs the caller needs); cast here to the fusion's dtype and device.
        cache: a FusionCache to reuse the vision prefix of earlier turns, or None.
        context: other inputs the images are encoded with (a change invalidates the cache).
        image_counts: per sample, per question, the new visual inputs it brings (None: one per sample).
        num_images: the visual inputs this call carries (checked against the questions' layout), or None.
        """
        plan = VisualPlan.of(questions, image_counts)
        if pixel_values is not None and num_images is not None and num_images != plan.num_visuals:
            raise ValueError(
                f"pixel_values: expected {plan.num_visuals} images (one per sample, or as qfusion_image_counts "
                f"says), got {num_images}"
            )
        per_visual, host = self._fuse(encode, pixel_values, plan.questions, cache, budget, context)
        return plan.in_placeholder_order(per_visual), host

    def _fuse(self, encode, pixel_values, questions, cache, budget, context):
        """(per visual input, per question about it, fused tokens; host outputs)."""
        fusion = self.fusion
        device = fusion.device
        questions = [[q.to(device) for q in sample] for sample in questions]

        def vision():
            features, host = encode()
            return [v.to(device=device, dtype=fusion.dtype) for v in features], host

        if cache is None:
            features, host = vision()
            return fusion(features, questions, budget=budget).tokens, host
        if not isinstance(cache, FusionCache):
            raise TypeError(f"qfusion_cache: expected a qfusion.adapters.FusionCache, got {type(cache).__name__}")
        return cache.fuse(fusion, vision, pixel_values, questions, budget, context)

    # ------------------------------------------------------------------ attach / detach

    def install(self, fusion: QuestionFusion, hd: HDFrontEnd | None, trainable: dict[str, bool]) -> None:
        """Patch the host instance: plugin submodules, requires_grad flags, save rules, methods."""
        model = self.model
        if HANDLE in model.__dict__:
            raise ValueError("model: already has a qfusion plugin attached; qfusion.detach(model) first")
        patch = InstancePatch(model)
        patch.set_requires_grad({name: trainable[group] for group, names in self.module_groups().items()
                                 for name in names})
        patch.add_module(FUSION_MODULE, fusion)
        if hd is not None:
            patch.add_module(HD_MODULE, hd)
        patch.exclude_from_save((FUSION_MODULE, HD_MODULE))
        for name in self.patched:
            patch.patch_method(name, functools.partial(_dispatch, name))
        self.patch = patch
        patch.set_attribute(HANDLE, self)

    def uninstall(self) -> QuestionFusion:
        module = self.model._modules[FUSION_MODULE]
        self.patch.check_revertible()
        if active_module(module) is not module:
            raise RuntimeError(
                "model.qfusion: is wrapped by peft; unload the peft model (merge_and_unload() or unload()) "
                "before qfusion.detach"
            )
        self.patch.revert()
        return module

    @staticmethod
    def of(model: nn.Module) -> "HostAdapter":
        """The adapter attached to a host (looked up at call time, so a deep copy uses its own)."""
        return model.__dict__[HANDLE]

    def host_method(self, name: str) -> Callable:
        """The host's own ``name`` method, bound, as it was before attach."""
        return self.patch.host_method(name)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the plugin only: the fusion (config.json, model.safetensors), the adapter settings
        (qfusion_adapter.json) and, with the HD front-end, its weights. ``qfusion.attach(host, dir)``
        restores it. Returns the directory."""
        return save_plugin(save_directory, self.fusion, self.settings, self.hd)

    def __repr__(self) -> str:
        cfg, settings = self.fusion.config, self.settings
        return (f"{type(self).__name__}(model_type={settings.model_type!r}, mode={settings.mode!r}, vision_source="
                f"{settings.vision_source!r}, hd_grid={settings.hd_grid}, m={cfg.m}, n={cfg.n}, "
                f"vision_dim={cfg.vision_dim}, output_dim={cfg.output_dim})")


def get_adapter(model: nn.Module) -> HostAdapter:
    """The adapter handle of a model with a qfusion plugin attached (also through a peft wrapper)."""
    host = unwrap_model(model)
    adapter = host.__dict__.get(HANDLE)
    if adapter is None:
        raise ValueError(f"model: no qfusion plugin attached to this {type(host).__name__}; call qfusion.attach first")
    return adapter


def _dispatch(name: str, model: nn.Module, args: dict, qfusion: QFusionArguments):
    """Run a patched call on the adapter the model holds now (a deep copy holds its own)."""
    return getattr(HostAdapter.of(model), f"patched_{name}")(args, qfusion)

