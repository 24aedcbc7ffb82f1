"""FusionCache: the fusion's vision prefix kept between the turns of a conversation about the same images.

A follow-up question needs n new fused tokens, not a new pass over the image: the cache holds the
fusion's ``start`` state (per-layer keys/values of the vision tokens and of the questions asked so
far) and the fused tokens already produced, so a later turn only ``ask``s the new questions. The
result equals recomputing everything (SPEC §3: ``start``/``ask`` equals the packed forward).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from qfusion.budget import Budget
from qfusion.model import FusionState, QuestionFusion


@dataclass
class _Entry:
    owner: "weakref.ref[QuestionFusion]"
    inputs: dict[str, Any]  # the host inputs the vision features came from (pixels, grids, sizes, ...)
    version: Any  # what else the fused tokens depend on (weights, settings), as the adapter reports it
    host: Any  # what the adapter's encoder returned beside the vision tokens
    questions: list[list[Tensor]]  # per visual input, the question ids asked so far
    tokens: list[list[Tensor]]  # per visual input, per question, (k, output_dim) fused tokens
    state: FusionState


class FusionCache:
    """Keeps the fusion's vision prefix for follow-up questions about the same images.

    Pass one cache as ``qfusion_cache`` to every turn's ``generate`` (or ``forward``) of an attached
    host, with ``qfusion_input_ids`` holding *all* the conversation's questions so far, as
    :class:`qfusion.QFusionProcessor` builds them. When the visual inputs equal the cached ones (or
    are left out) and the earlier questions match, only the new questions run through the fusion:
    the vision tower and the vision prefix are not recomputed. Anything else — other images or
    other inputs they are encoded with, edited questions, another batch size, another budget, or a
    plugin whose weights or settings changed since (an optimizer step, ``configure``, a dtype
    change) — refills the cache. The outputs are the same as without a cache.

    ``hits`` / ``misses`` count the calls that reused / refilled it. Meant for inference: under
    autograd the cached tensors keep the graph of the call that made them.

    >>> cache = FusionCache()
    >>> cache.hits, cache.misses, cache.is_empty
    (0, 0, True)
    """

    def __init__(self) -> None:
        self._entry: _Entry | None = None
        self.hits = 0
        self.misses = 0

    @property
    def is_empty(self) -> bool:
        return self._entry is None

    def clear(self) -> None:
        """Forget the cached images and questions."""
        self._entry = None

    def _reusable(self, fusion: QuestionFusion, inputs: dict | None, questions: list[list[Tensor]],
                  budget: Budget, version) -> bool:
        entry = self._entry
        if entry is None or entry.owner() is not fusion or len(entry.questions) != len(questions):
            return False
        if entry.state.budget != budget or entry.version != version:
            return False
        if inputs is not None and not _same_inputs(inputs, entry.inputs):
            return False
        for asked, now in zip(entry.questions, questions):
            if len(asked) > len(now) or not all(_same(a, b) for a, b in zip(asked, now)):
                return False
        return True

    def fuse(self, fusion: QuestionFusion, encode: Callable[[], tuple[list[Tensor], Any]],
             inputs: dict[str, Any] | None, questions: list[list[Tensor]], budget: Budget, version=None):
        """(fused tokens per visual input, per question; the host outputs of ``encode``), asking the
        fusion only what the cache lacks.

        encode: () -> (one (V, vision_dim) tensor per visual input, in the fusion's dtype and device;
            host outputs the adapter needs again on later turns); called only when the cache is refilled.
        inputs: the host inputs the visual features come from (a change refills the cache), or None
            when the call carries none (the cached ones are meant).
        budget: the (m, n) of this call; a cache filled under another budget is refilled.
        version: what else the fused tokens depend on (:meth:`qfusion.adapters.HostAdapter.version`);
            a change refills the cache. The fusion's own weights and settings are always checked.
        """
        version = (fusion.version(), version)
        if self._reusable(fusion, inputs, questions, budget, version):
            self.hits += 1
            entry = self._entry
        else:
            if inputs is None:
                raise ValueError(
                    "pixel_values: required, the qfusion_cache holds no images matching these questions "
                    "(pass the images again, or the same questions as the turns before plus new ones)"
                )
            self.misses += 1
            vision, host = encode()
            entry = _Entry(weakref.ref(fusion), {k: _detached(v) for k, v in inputs.items()}, version, host,
                           [[] for _ in questions], [[] for _ in questions], fusion.start(vision, budget=budget))
        pending = [sample[len(asked):] for sample, asked in zip(questions, entry.questions)]
        for step in range(max((len(p) for p in pending), default=0)):
            ask = [p[step] if step < len(p) else None for p in pending]
            tokens, entry.state = fusion.ask(entry.state, ask)
            for b, (q, t) in enumerate(zip(ask, tokens)):
                if q is not None:
                    entry.questions[b].append(q)
                    entry.tokens[b].append(t)
        self._entry = entry
        return [list(sample) for sample in entry.tokens], entry.host


def _detached(value):
    return value.detach().clone() if isinstance(value, Tensor) else value


def _same_inputs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and torch.equal(a.to(b.device), b))
    return a == b
