"""HostAdapter: one attached host, run through transformers' ``mm_encoder_outputs`` seam.

Data flow of a patched call, the same for every family (:class:`qfusion.adapters.HostFamily` holds
what differs)::

    pixel_values / pixel_values_videos ─ the family's vision source (by default the host's own
    get_image_features / get_video_features) ─> (V_i, d) per visual input, in prompt order ─
    QuestionFusion(questions) ─> m + (G−1)·n fused tokens per visual input ─ mm_encoder_outputs ─>
    the host's own forward / generate, which scatters them into the placeholder tokens

The placeholders, the questions and the budget are read back with :mod:`qfusion.inputs`; the
host's code runs unchanged after the seam. The fusion is the submodule ``model.qfusion``, looked
up at every call (peft's ``modules_to_save`` swaps in a copy).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from qfusion.adapters.cache import FusionCache
from qfusion.adapters.family import TOKEN_TYPES, VISUAL_INPUTS, HostFamily, HostTokens
from qfusion.adapters.patching import InstancePatch, QFusionArguments, active_module, unwrap_model
from qfusion.budget import Budget
from qfusion.inputs import (VisualPlan, check_left_padded, decode_call, in_prompt_order, placeholder_runs, visual_blocks,
                            visual_kinds)
from qfusion.model import QuestionFusion
from qfusion.plugin import AdapterSettings, save_plugin
from qfusion.vision import HDFrontEnd

FUSION_MODULE = "qfusion"
"""Name of the fusion submodule on an attached host (and of peft's ``modules_to_save`` entry)."""

HD_MODULE = "qfusion_hd"
"""Name of the optional high-resolution front-end submodule on an attached host."""

HANDLE = "_qfusion_adapter"
"""Instance attribute of an attached host that holds its adapter."""

SEAM = "mm_encoder_outputs"
"""The host forward's parameter for precomputed visual embeddings, through which fused tokens enter."""


class HostAdapter:
    """The handle of a host with a qfusion plugin attached; users get one from :func:`qfusion.attach`.

    ``adapter.fusion`` is the module that runs, ``adapter.budget`` its default (m, n),
    ``adapter.family`` the host's :class:`~qfusion.adapters.HostFamily`, ``adapter.tokens`` the
    host's placeholder and marker ids, ``adapter.save_pretrained(dir)`` writes the plugin only.
    """

    def __init__(self, model: nn.Module, family: HostFamily, settings: AdapterSettings):
        self.model = model
        self.family = family
        self.settings = settings
        self.patch: InstancePatch | None = None
        if SEAM not in inspect.signature(type(model).forward).parameters:
            import transformers

            raise TypeError(
                f"model: {type(model).__name__}.forward has no {SEAM!r} parameter in transformers "
                f"{transformers.__version__}; the fused tokens could not reach its LLM (upgrade transformers)"
            )
        for group, names in (("vision_tower", family.vision_tower), ("llm", family.llm)):
            if not _has_part(model, names[0]):
                raise TypeError(
                    f"model: expected a transformers {settings.model_type} model with {names[0]} (the "
                    f"{family.name!r} family's {group}), got {type(model).__name__}"
                )
        self.source = family.source(settings.vision_source)
        if settings.mode not in family.modes:
            raise ValueError(f"mode: expected one of {family.modes} for a {settings.model_type!r} host, got "
                             f"{settings.mode!r}")
        if family.check is not None:
            family.check(model, settings)
        self.tokens: HostTokens = family.tokens(model.config)
        parameters = inspect.signature(type(model).forward).parameters
        self._required_visual_inputs = {name for name in VISUAL_INPUTS.values()
                                        if name in parameters and parameters[name].default is inspect.Parameter.empty}

    # ------------------------------------------------------------------ host facts

    @property
    def feature_dim(self) -> int:
        """Width of the host vision features the fusion (or the HD front-end) reads."""
        return self.source.dim(self.model.config, self.settings)

    @property
    def fusion_output_dim(self) -> int:
        """Width of the fused tokens the host expects."""
        hook = self.family.output_dim
        return hook(self.model.config, self.settings) if hook is not None else self.model.config.get_text_config().hidden_size

    @property
    def llm_vocab_size(self) -> int:
        return self.model.config.get_text_config().vocab_size

    @property
    def image_token_id(self) -> int:
        return self.tokens.image

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """The placeholder token ids the fused tokens fill (images; with video, its placeholder too)."""
        return tuple(self.tokens.placeholders().values())

    @property
    def image_prefix(self) -> int:
        """Host tokens placed before the first question's fused tokens (BLIP ``augment``: the Q-Former's)."""
        hook = self.family.prefix
        return hook(self.model.config, self.settings) if hook is not None else 0

    @property
    def llm_name(self) -> str:
        """Dotted name of the language model inside the host (for LoRA targeting)."""
        return self.family.llm_name

    def module_groups(self) -> dict[str, list[str]]:
        """Dotted names of the host's parts this host has: "vision_tower", "projector", "llm"."""
        family = self.family
        return {group: [name for name in names if _has_part(self.model, name)]
                for group, names in (("vision_tower", family.vision_tower), ("projector", family.projector),
                                     ("llm", family.llm))}

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

    def version(self) -> tuple:
        """What the fused tokens depend on beside the inputs: the fusion's and the HD front-end's
        weights and settings (a FusionCache filled under another version is refilled)."""
        hd = self.hd
        return self.fusion.version(), None if hd is None else tuple((id(p), p._version) for p in hd.parameters())

    # ------------------------------------------------------------------ the fused-token step

    def kinds_of(self, args: dict) -> dict[str, Tensor]:
        """The visual inputs of a call by kind ("image", "video"); a kind the host takes not is an error."""
        given = {kind: args[name] for kind, name in VISUAL_INPUTS.items() if args.get(name) is not None}
        placeholders = self.tokens.placeholders()
        for kind in given:
            if kind not in placeholders:
                raise ValueError(
                    f"{VISUAL_INPUTS[kind]}: this {self.settings.model_type!r} host takes no {kind} "
                    f"(it takes {sorted(placeholders)})"
                )
        return given

    def blocks(self, input_ids: Tensor, questions, image_counts, budget: Budget) -> list[list[tuple[int, int, int]]]:
        """Per sample, its placeholder blocks in prompt order as (visual input, placeholder id, length).

        With markers every visual input's block is its own run between them; the processor writes
        them so (:class:`qfusion.QFusionProcessor`).
        """
        out = []
        for b, sample in enumerate(questions):
            counts = None if image_counts is None else image_counts[b]
            blocks = visual_blocks(input_ids[b], self.placeholder_ids, len(sample), budget, self.image_prefix, counts)
            if self.tokens.start is not None or self.tokens.end is not None:
                found = placeholder_runs(input_ids[b], self.placeholder_ids)
                if found != [length for _, _, length in blocks]:
                    raise ValueError(
                        f"input_ids: sample {b} has placeholder runs {found}, expected one run per image/video per "
                        f"question, {[length for _, _, length in blocks]}, each between the host's vision markers; "
                        "build the inputs with qfusion.QFusionProcessor"
                    )
            out.append(blocks)
        return out

    def feature_inputs(self, args: dict) -> dict[str, Any]:
        """The host inputs the vision features are computed from (what a FusionCache compares)."""
        names = set(VISUAL_INPUTS.values()) | set(self.family.drop_inputs)
        for kind in ("image", "video"):
            method = getattr(self.model, f"get_{kind}_features", None)
            if method is not None:
                names.update(inspect.signature(method).parameters)
        return {name: args[name] for name in sorted(names) if args.get(name) is not None}

    def _plan(self, args: dict, qfusion: QFusionArguments):
        """(budget, questions, image counts, placeholder blocks, per visual input its placeholder id) of a call."""
        input_ids = args.get("input_ids", args.get("inputs"))
        budget = self.call_budget(qfusion)
        questions, image_counts = self.questions(qfusion, input_ids, budget)
        blocks = self.blocks(input_ids, questions, image_counts, budget)
        kinds = [token for sample in blocks for token in visual_kinds(sample)]
        return budget, questions, image_counts, blocks, kinds

    def _encoder(self, args: dict, kinds: list[int]) -> Callable[[], tuple[list[Tensor], dict]]:
        """() -> (the vision features of every visual input of the call in prompt order, per kind the
        host outputs its source returned)."""
        given = self.kinds_of(args)
        placeholders = self.tokens.placeholders()

        def encode():
            features, host = {token: [] for token in placeholders.values()}, {}
            for kind in given:
                features[placeholders[kind]], host[kind] = self.source.read(self, kind, args)
            names = {token: VISUAL_INPUTS[kind] for kind, token in placeholders.items()}
            return in_prompt_order(kinds, features, names), host

        return encode

    def encode(self, inputs: dict) -> list[Tensor]:
        """The vision tokens the fusion reads for every visual input of a batch, in prompt order.

        inputs: what :class:`qfusion.QFusionProcessor` returns (the host inputs with their visual
            inputs, placeholders and questions). The tokens come from the plugin's vision source
            (and HD front-end), as in a patched call; the fusion does not run (e.g. for an alignment
            stage that trains the fusion on its own).
        """
        args = {k: v for k, v in inputs.items() if not k.startswith("qfusion_")}
        qfusion = QFusionArguments(inputs.get("qfusion_input_ids"), inputs.get("qfusion_attention_mask"),
                                   None, inputs.get("qfusion_budget"), inputs.get("qfusion_image_counts"))
        if not self.kinds_of(args):
            raise ValueError("inputs: hold no pixel_values or pixel_values_videos to encode")
        *_, kinds = self._plan(args, qfusion)
        features, _ = self._encoder(args, kinds)()
        return features

    def with_fused_tokens(self, args: dict, qfusion: QFusionArguments) -> dict:
        """The host arguments of one call with the fused tokens as ``mm_encoder_outputs`` instead of
        its visual inputs (and the family's position inputs)."""
        budget, questions, image_counts, blocks, kinds = self._plan(args, qfusion)
        encode = self._encoder(args, kinds)
        inputs = self.feature_inputs(args) if self.kinds_of(args) else None
        tokens, host = self.fused_tokens(encode, inputs, questions, qfusion.cache, budget, image_counts)
        make_outputs = self.family.outputs or seam_outputs
        input_ids = args.get("input_ids", args.get("inputs"))
        # the visual inputs leave the call (as None where the host's forward requires the parameter)
        required = self._required_visual_inputs
        args = {k: None if k in required else v for k, v in args.items()
                if k not in self.family.drop_inputs and (k in required or k not in VISUAL_INPUTS.values())}
        args[SEAM] = make_outputs(self, blocks, tokens, host)
        if self.family.token_types is not None:
            args[self.family.token_types] = self.token_types(input_ids)
        if self.family.prepare is not None:
            args = self.family.prepare(self, args, blocks)
        return args

    def token_types(self, input_ids: Tensor) -> Tensor:
        """Token types of input_ids: 0 text, 1 image placeholder, 2 video placeholder."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        for kind, token in self.tokens.placeholders().items():
            types[input_ids == token] = TOKEN_TYPES[kind]
        return types

    def questions(self, qfusion: QFusionArguments, input_ids, budget: Budget):
        """(validated questions, per sample per question the new images it brings or None) of a call
        with visual inputs; the placeholders in input_ids must fit them."""
        return decode_call(input_ids, qfusion.input_ids, qfusion.attention_mask, qfusion.image_counts,
                           token_id=self.placeholder_ids, budget=budget, prefix=self.image_prefix,
                           multi_image=self.family.multi_image, host=self.settings.model_type)

    def fused_tokens(self, encode: Callable[[], tuple[list[Tensor], Any]], inputs: dict | None,
                     questions: list[list[Tensor]], cache: FusionCache | None, budget: Budget,
                     image_counts: list[list[int]] | None = None):
        """(per sample, per question, the (k, output_dim) fused tokens in placeholder order, in the
        fusion's dtype; the host outputs of ``encode``). Every visual input is fused with the questions
        about it (:class:`qfusion.inputs.VisualPlan`).

        encode: () -> (one host feature tensor (V_i, vision_dim) per visual input of the batch, in
            prompt order; other host outputs the family needs); cast here to the fusion's dtype and device.
        inputs: the host inputs the features come from (None when the call carries none: then a
            filled cache must hold them).
        cache: a FusionCache to reuse the vision prefix of earlier turns, or None.
        image_counts: per sample, per question, the new visual inputs it brings (None: one per sample).
        """
        plan = VisualPlan.of(questions, image_counts)
        fusion = self.fusion
        device = fusion.device
        plan_questions = [[q.to(device) for q in sample] for sample in plan.questions]

        def vision():
            features, host = encode()
            if len(features) != plan.num_visuals:
                raise ValueError(
                    f"pixel_values: expected {plan.num_visuals} visual inputs (one per sample, or as "
                    f"qfusion_image_counts says), got {len(features)}"
                )
            return [v.to(device=device, dtype=fusion.dtype) for v in features], host

        if cache is None:
            if inputs is None:
                raise ValueError("pixel_values: required with qfusion_input_ids (or pixel_values_videos)")
            features, host = vision()
            per_visual = fusion(features, plan_questions, budget=budget).tokens
        else:
            if not isinstance(cache, FusionCache):
                raise TypeError(f"qfusion_cache: expected a qfusion.adapters.FusionCache, got {type(cache).__name__}")
            per_visual, host = cache.fuse(fusion, vision, inputs, plan_questions, budget, self.version())
        return plan.in_placeholder_order(per_visual), host

    # ------------------------------------------------------------------ the patched calls

    def is_visual_call(self, args: dict, qfusion: QFusionArguments) -> bool:
        """Whether a call has visual inputs or questions to fuse (else, e.g. a decoding step, it goes to the
        host unchanged); raises for inputs the plugin cannot take."""
        given = [args.get(name) is not None for name in VISUAL_INPUTS.values()]
        if not any(given) and not qfusion.given:
            return False
        if args.get(SEAM) is not None:
            raise ValueError(
                f"{SEAM}: pass either precomputed image embeddings or pixel_values with qfusion_input_ids, not both"
            )
        if args.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds: not supported with qfusion inputs; pass input_ids")
        if not any(given) and (qfusion.cache is None or qfusion.cache.is_empty):
            raise ValueError(
                "pixel_values: required with qfusion_input_ids (or pixel_values_videos; unless a filled "
                "qfusion_cache holds the visual inputs)"
            )
        return True

    def patched_forward(self, args: dict, qfusion: QFusionArguments):
        """The host's forward with the visual inputs compressed by the plugin."""
        self.call_budget(qfusion)  # a bad budget is refused even where nothing is fused
        if self.is_visual_call(args, qfusion):
            args = self.with_fused_tokens(args, qfusion)
        return self.host_method("forward")(**args)

    def patched_generate(self, args: dict, qfusion: QFusionArguments):
        """The host's generate with the visual inputs compressed by the plugin."""
        self.call_budget(qfusion)
        input_ids = args.get("input_ids", args.get("inputs"))
        if input_ids is not None and input_ids.shape[0] > 1:  # batched generation appends after the last column
            check_left_padded(args.get("attention_mask"))
        if not self.is_visual_call(args, qfusion):
            return self.host_method("generate")(**args)
        with torch.no_grad():
            args = self.with_fused_tokens(args, qfusion)
        if self.family.generate is not None:
            return self.family.generate(self, args)
        return self.host_method("generate")(**args)

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
        for name in ("forward", "generate"):
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

    def save_pretrained(self, save_directory: str | os.PathLike, *, processor=None, card: str | None = None) -> str:
        """Write the plugin only (atomically, :func:`qfusion.plugin.save_plugin`): the fusion
        (config.json, model.safetensors), the adapter settings (qfusion_adapter.json), with the HD
        front-end its weights, with ``processor`` (a QFusionProcessor) its question settings, with
        ``card`` a model card. ``qfusion.attach(host, dir)`` restores it. Returns the directory."""
        extra = {}
        if processor is not None:
            extra = dict(processor=processor.settings(), question_tokenizer=processor.question_tokenizer)
        return save_plugin(save_directory, self.fusion, self.settings, self.hd, card=card, **extra)

    def __repr__(self) -> str:
        cfg, settings = self.fusion.config, self.settings
        return (f"HostAdapter(family={self.family.name!r}, model_type={settings.model_type!r}, mode={settings.mode!r}, "
                f"vision_source={settings.vision_source!r}, hd_grid={settings.hd_grid}, m={cfg.m}, n={cfg.n}, "
                f"vision_dim={cfg.vision_dim}, output_dim={cfg.output_dim})")


def _has_part(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        try:
            model.get_parameter(name)
        except AttributeError:
            return False
    return True


def host_features(adapter: HostAdapter, kind: str, args: dict) -> tuple[list[Tensor], None]:
    """The host's own ``get_image_features`` / ``get_video_features`` on a call's inputs: one
    (V_i, d) tensor per visual input of that kind (the default vision source of most families).

    The call's arguments that the host method takes (grids, sizes, feature layers, ...) go with the
    pixels; a host that returns one tensor for all inputs is split along its first axis.
    """
    method = getattr(adapter.model, f"get_{kind}_features")
    parameters = list(inspect.signature(method).parameters)
    pixels = args[VISUAL_INPUTS[kind]]
    kwargs = {name: args[name] for name in parameters[1:] if args.get(name) is not None}
    features = method(pixels, **kwargs, return_dict=True).pooler_output
    return (list(features.unbind(0)) if isinstance(features, Tensor) else list(features)), None


def seam_outputs(adapter: HostAdapter, blocks: list, tokens: list[list[Tensor]], host) -> dict:
    """``mm_encoder_outputs``: per placeholder kind, every fused row of that kind in prompt order —
    as a list of one (rows, d) tensor for hosts that concatenate a list, or as one (1, rows, d)
    tensor for the kinds the family lists as ``stacked``.

    blocks: per sample its placeholder blocks as (visual input, token id, length); tokens: per sample,
        per question, the fused tokens (:meth:`HostAdapter.fused_tokens`).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embed = adapter.model.get_input_embeddings().weight
    kind_of = {token: kind for kind, token in adapter.tokens.placeholders().items()}
    per_kind: dict[str, list[Tensor]] = {}
    for sample_blocks, groups in zip(blocks, tokens):
        rows = torch.cat(groups).to(device=embed.device, dtype=embed.dtype)
        for (_, token, _), piece in zip(sample_blocks, rows.split([length for _, _, length in sample_blocks])):
            per_kind.setdefault(kind_of[token], []).append(piece)
    stacked = adapter.family.stacked
    return {kind: BaseModelOutputWithPooling(pooler_output=torch.cat(pieces)[None] if kind in stacked
                                             else [torch.cat(pieces)])
            for kind, pieces in per_kind.items()}


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
