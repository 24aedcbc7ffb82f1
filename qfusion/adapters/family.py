"""A host family: what qfusion must know of a kind of host, as a record, plus the registry of families.

transformers' VLMs share one seam: ``forward(..., mm_encoder_outputs=...)`` takes precomputed
visual embeddings, which the host scatters into its placeholder tokens, and
``get_image_features`` / ``get_video_features`` compute them. :class:`qfusion.adapters.HostAdapter`
runs every family through that seam; a :class:`HostFamily` only states the facts that differ —
where its parts live, which config attributes hold its placeholder and marker tokens, which
token-type input it reads, its vision sources — and, where a family truly behaves differently,
a few short hook functions (how features are read, how positions are given, a generate quirk).

Adding a host is one record, registered with :func:`register_family` (the built-in families use
the same call)::

    import qfusion
    from qfusion.adapters import HostFamily, VisionSource, host_features, text_width

    qfusion.register_family(HostFamily(
        name="my_vlm", model_types=("my_vlm",),
        sources=(VisionSource("projector", text_width, host_features),),
        vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    ))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

VISUAL_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}
"""The host argument that carries each visual kind."""

TOKEN_TYPES = {"image": 1, "video": 2}
"""Token-type values of the placeholder kinds (0 is text), as the hosts that read token types use them."""


def text_width(config, settings=None) -> int:
    """Width of the host LLM's hidden states (its text config's ``hidden_size``)."""
    return config.get_text_config().hidden_size


@dataclass(frozen=True)
class VisionSource:
    """Where the fusion reads a host's vision features.

    name: as ``attach(..., vision_source=name)`` selects it (a family's first source is its default).
    dim: (host config, adapter settings) -> the features' width.
    read: (adapter, kind, host arguments) -> (one (V_i, dim) tensor per visual input of that kind in
        the call, in the order the host's inputs hold them; host outputs a family's ``outputs`` hook
        needs, else None). :func:`qfusion.adapters.host_features` reads the host's own
        ``get_image_features`` / ``get_video_features``.
    doc: one line for the supported-hosts table.
    """

    name: str
    dim: Callable[..., int]
    read: Callable[..., tuple[list[Tensor], Any]]
    doc: str = ""


@dataclass(frozen=True)
class HostTokens:
    """The token ids of one host that its inputs are built with (resolved from its config).

    image / video: the placeholder ids the fused tokens fill (video None where the host takes none).
    start / end: the markers around every placeholder run, or None.
    """

    image: int
    video: int | None = None
    start: int | None = None
    end: int | None = None

    def placeholders(self) -> dict[str, int]:
        """Visual kind -> its placeholder id, for the kinds this host takes."""
        return {kind: token for kind, token in (("image", self.image), ("video", self.video)) if token is not None}

    def to_json(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "HostTokens":
        return cls(**data)


@dataclass(frozen=True)
class HostFamily:
    """The facts of one host family, and its hooks where it differs from the shared seam.

    name: the family's name (saved with its plugins). model_types: the ``config.model_type`` values
        it serves.
    sources: where the fusion may read vision features; the first is the default.
    vision_tower, projector, llm: dotted module names of the host's parts (the first of
        ``vision_tower`` and of ``llm`` must exist; others only where the host has them), frozen
        unless ``attach(train_vision_tower=, train_projector=, train_llm=)`` says otherwise.
    llm_name: the LLM inside the host, the anchor of ``qfusion.lora_config``'s targets.
    image_token, video_token: config attributes holding the placeholder ids (the first present wins;
        no video attribute: the host takes no video).
    markers: config attributes of the (start, end) tokens the processor writes around every
        placeholder run (None for a side without a marker), or None.
    processor_markers: where the host's config has no ids for them, the host processor's attributes
        holding the (start, end) marker tokens (None for a side without a marker).
    token_types: the host input holding token types (1 image, 2 video placeholders), or None.
    drop_inputs: host inputs that describe the real visual inputs and leave the call with them.
    stacked: the visual kinds whose ``mm_encoder_outputs`` the host reads as one tensor (its rows
        scattered into the placeholders); the other kinds it reads as a list of tensors it concatenates.
    multi_image: whether a prompt may carry several images or videos.
    modes: "replace" (fused tokens instead of the host's vision tokens), and where offered "augment".
    hd: whether the high-resolution front-end is offered.
    min_transformers: the oldest transformers release with this family's classes, where newer than
        qfusion's own floor.
    position_rule: one line for the supported-hosts table: how fused tokens get their positions.
    notes: what the family does not support and why (the hosts table).

    Hooks (None: the shared behaviour):
    check(model, settings): raise for hosts or settings the family cannot serve.
    output_dim(config, settings): width of the fused tokens (default: the LLM's hidden size).
    prefix(config, settings): host tokens before the first question's fused tokens (default 0).
    outputs(adapter, blocks, tokens, host): the ``mm_encoder_outputs`` of a call from the fused tokens.
    prepare(adapter, args, blocks): the host arguments after the fused tokens are in (positions).
    generate(adapter, args): a generate that replaces the host's (its own re-reads the pixels).
    image_inputs(image_processor, images): the host image processor's outputs for the batch's images in
        prompt order, one visual input each (default: the processor called on the list).
    processor_inputs(host_processor, kinds, questions, data): the processor outputs to add or replace
        (None: to drop) for this host — inputs it needs beside the pixels, or image-processor outputs
        it does not take.
    """

    name: str
    model_types: tuple[str, ...]
    sources: tuple[VisionSource, ...]
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...] = ()
    llm: tuple[str, ...] = ("model.language_model", "lm_head")
    llm_name: str = "model.language_model"
    image_token: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token: tuple[str, ...] = ()
    markers: tuple[str, str] | None = None
    processor_markers: tuple[str, str] | None = None
    token_types: str | None = None
    drop_inputs: tuple[str, ...] = ()
    stacked: tuple[str, ...] = ()
    multi_image: bool = True
    modes: tuple[str, ...] = ("replace",)
    hd: bool = False
    min_transformers: str | None = None
    position_rule: str = "the host's 1-D positions"
    notes: str = ""
    check: Callable | None = None
    output_dim: Callable | None = None
    prefix: Callable | None = None
    outputs: Callable | None = None
    prepare: Callable | None = None
    generate: Callable | None = None
    image_inputs: Callable | None = None
    processor_inputs: Callable | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        for field in ("model_types", "sources", "vision_tower", "llm", "image_token"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not value:
                raise ValueError(f"{field}: expected a non-empty tuple, got {value!r}")
        if not all(isinstance(s, VisionSource) for s in self.sources):
            raise TypeError(f"sources: expected VisionSource records, got {self.sources!r}")
        if len({s.name for s in self.sources}) != len(self.sources):
            raise ValueError(f"sources: names must differ, got {[s.name for s in self.sources]}")
        for name in ("markers", "processor_markers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, tuple) or len(value) != 2 or value == (None, None)):
                raise ValueError(f"{name}: expected (start, end) attribute names (one may be None), got {value!r}")
        if self.markers is not None and self.processor_markers is not None:
            raise ValueError("markers, processor_markers: name the markers one way")
        unknown = [m for m in self.modes if m not in ("replace", "augment")]
        if not self.modes or unknown:
            raise ValueError(f"modes: expected 'replace' and/or 'augment', got {self.modes!r}")

    def source(self, name: str | None) -> VisionSource:
        """The vision source called ``name`` (None: the default)."""
        if name is None:
            return self.sources[0]
        for source in self.sources:
            if source.name == name:
                return source
        raise ValueError(
            f"vision_source: expected one of {tuple(s.name for s in self.sources)} for a {self.name!r} host, "
            f"got {name!r}"
        )

    def tokens(self, config) -> HostTokens:
        """The token ids of a host of this family, read from its config."""
        image = _first_attribute(config, self.image_token)
        if image is None:
            raise ValueError(
                f"model.config: has none of {list(self.image_token)}; qfusion needs the host's image placeholder "
                "token id (set it to the tokenizer's image token id)"
            )
        video = _first_attribute(config, self.video_token) if self.video_token else None
        start = end = None
        if self.markers is not None:
            start, end = (None if name is None else _first_attribute(config, (name,)) for name in self.markers)
            if any(name is not None and value is None for name, value in zip(self.markers, (start, end))):
                raise ValueError(f"model.config: expected the marker token ids {list(self.markers)}")
        return HostTokens(int(image), None if video is None else int(video), start, end)


def _first_attribute(config, names) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


FAMILIES: dict[str, HostFamily] = {}
"""Registered families by name."""

MODEL_TYPES: dict[str, HostFamily] = {}
"""Registered families by the ``config.model_type`` they serve."""

UNSUPPORTED: dict[str, str] = {
    "mllama": "its images enter the LLM through cross-attention layers, not as placeholder tokens",
    "pix2struct": "an encoder-decoder model: its images feed the encoder, not placeholder tokens",
    "udop": "an encoder-decoder model: its images feed the encoder, not placeholder tokens",
}
"""Model types qfusion refuses, with the reason (families that have no placeholder-token seam)."""


def register_family(family: HostFamily, *, replace: bool = False) -> HostFamily:
    """Add a host family to the registry, so that ``qfusion.attach`` serves its model types.

    replace: allow a family of the same name to be replaced, and model types another family serves
        to be taken over; otherwise either is an error naming the clash. Returns the family.
    """
    if not isinstance(family, HostFamily):
        raise TypeError(f"family: expected a qfusion.adapters.HostFamily, got {type(family).__name__}")
    clashes = sorted({t for t in family.model_types if t in MODEL_TYPES and MODEL_TYPES[t].name != family.name})
    if not replace:
        if family.name in FAMILIES:
            raise ValueError(f"family: a family named {family.name!r} is registered; pass replace=True to replace it")
        if clashes:
            raise ValueError(
                f"family: model types {clashes} are served by {sorted({MODEL_TYPES[t].name for t in clashes})}; "
                "pass replace=True to take them over"
            )
    old = FAMILIES.pop(family.name, None)
    if old is not None:
        for model_type in old.model_types:
            MODEL_TYPES.pop(model_type, None)
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        MODEL_TYPES[model_type] = family
    return family


def hosts_table(families: list[HostFamily]) -> str:
    """The supported-hosts table (markdown) of some families: model types, what each takes, how fused
    tokens are placed, the vision sources and the transformers release each needs."""
    from qfusion._versions import declared_requirements

    floor = declared_requirements().get("transformers")
    floor = str(floor.specifier).removeprefix(">=") if floor is not None else "qfusion's floor"
    rows = ["| family | model types | images | several images | video | positions | vision sources | "
            "transformers | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for family in families:
        sources = ", ".join(f"`{s.name}`" + (" (default)" if i == 0 and len(family.sources) > 1 else "")
                            for i, s in enumerate(family.sources))
        rows.append(" | ".join([
            f"| `{family.name}`", ", ".join(f"`{t}`" for t in family.model_types), "yes",
            "yes" if family.multi_image else "no", "yes" if family.video_token else "no", family.position_rule,
            sources, f">= {family.min_transformers or floor}", (family.notes or "") + " |",
        ]))
    return "\n".join(rows) + "\n"


def family_for(model) -> HostFamily:
    """The registered family serving a host model or host config (by its ``model_type``), or an error
    saying why none does."""
    config = model if hasattr(model, "model_type") else getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = MODEL_TYPES.get(model_type)
    if family is not None:
        return family
    reason = UNSUPPORTED.get(model_type)
    if reason is None and config is not None and getattr(config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model: its images feed the encoder, not placeholder tokens"
    if reason is not None:
        raise NotImplementedError(f"model: qfusion cannot attach to {model_type!r} ({type(model).__name__}): {reason}")
    raise ValueError(
        f"model: qfusion has no host family for model_type {model_type!r} ({type(model).__name__}); "
        f"supported: {sorted(MODEL_TYPES)}; a host with transformers' mm_encoder_outputs seam can be added "
        "with qfusion.register_family"
    )
