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

from qfusion.model import FusionState, QuestionFusion


@dataclass
class _Entry:
    owner: "weakref.ref[QuestionFusion]"
    pixel_values: Tensor
    context: Tensor | None  # other host inputs the images were encoded with (InstructBLIP's Q-Former text)
    host: Any  # what the adapter's encoder returned beside the vision tokens
    questions: list[list[Tensor]]  # per sample, the question ids asked so far
    tokens: list[list[Tensor]]  # per sample, per question, (k, output_dim) fused tokens
    state: FusionState


class FusionCache:
    """Keeps the fusion's vision prefix for follow-up questions about the same images.

    Pass one cache as ``qfusion_cache`` to every turn's ``generate`` (or ``forward``) of an attached
    host, with ``qfusion_input_ids`` holding *all* the conversation's questions so far, as
    :class:`qfusion.QFusionProcessor` builds them. When the images equal the cached ones (or
    ``pixel_values`` is left out) and the earlier questions match, only the new questions run through
    the fusion: the vision tower and the vision prefix are not recomputed. Anything else (other
    images, edited questions, another batch size, another budget (m, n)) refills the cache. The outputs
    are the same as without a cache.

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

    def _reusable(self, fusion: QuestionFusion, pixel_values: Tensor | None, context: Tensor | None,
                  questions: list[list[Tensor]], budget: tuple[int, int]) -> bool:
        entry = self._entry
        if entry is None or entry.owner() is not fusion or len(entry.questions) != len(questions):
            return False
        if entry.state.budget != tuple(budget):
            return False
        if pixel_values is not None and not _same(pixel_values, entry.pixel_values):
            return False
        if pixel_values is not None and not _same(context, entry.context):
            return False
        for asked, now in zip(entry.questions, questions):
            if len(asked) > len(now) or not all(_same(a, b) for a, b in zip(asked, now)):
                return False
        return True

    def fuse(self, fusion: QuestionFusion, encode: Callable[[], tuple[list[Tensor], Any]],
             pixel_values: Tensor | None, questions: list[list[Tensor]], budget: tuple[int, int],
             context: Tensor | None = None):
        """(fused tokens per sample, per question; the host outputs of ``encode``), asking the fusion
        only what the cache lacks.

        encode: () -> (B (V_b, vision_dim) tensors in the fusion's dtype and device, host outputs the
            adapter needs again on later turns); called only when the cache is refilled.
        budget: the (m, n) of this call; a cache filled under another budget is refilled.
        context: other inputs the images are encoded with; a change refills the cache.
        """
        if self._reusable(fusion, pixel_values, context, questions, budget):
            self.hits += 1
            entry = self._entry
        else:
            if pixel_values is None:
                raise ValueError(
                    "pixel_values: required, the qfusion_cache holds no images matching these questions "
                    "(pass the images again, or the same questions as the turns before plus new ones)"
                )
            self.misses += 1
            vision, host = encode()
            entry = _Entry(weakref.ref(fusion), pixel_values.detach().clone(),
                           None if context is None else context.detach().clone(), host,
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


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a.to(b.device), b)
