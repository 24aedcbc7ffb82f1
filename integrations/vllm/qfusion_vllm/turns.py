"""Which fused tokens a prompt needs: its user turns, their questions, and one item per question group.

vLLM keeps no state between the requests of a conversation: a follow-up request carries the whole
history as one prompt, the image once (in the turn that brought it). The transformers path gives
every later question about an image n fused tokens of its own, computed with that question, right
before it (:mod:`qfusion.inputs`). Here the same layout is built inside vLLM's rules, one
multimodal item per (question, visual input it is about):

* the item of a visual input's first question stands at the placeholder the prompt already has
  and is fused into m tokens;
* for every later question about it a placeholder run is inserted right before that question's
  text and becomes an item of its own: the same image, fused with all its questions so far, of
  which it embeds the last group's n tokens.

Each item is known at prompt-processing time (its placeholder count is m or n), its multimodal
hash covers the image and its questions so far, and items of earlier turns keep their hash in a
later request of the conversation; so the prefix cache reuses a follow-up's shared history and the
encoder cache its earlier groups, and only the new question's group is computed.

User turns are found with token markers read once from the host's chat template
(:meth:`TurnMarkers.from_chat_template`). A question is its turn's text without the placeholders;
a turn is about the visual inputs of the latest turn that brought any (:func:`qfusion.inputs.question_images`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qfusion.inputs import question_images


def find(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of ``pattern`` in ``ids`` at or after ``start``, or -1."""
    width = len(pattern)
    first = pattern[0]
    for i in range(start, len(ids) - width + 1):
        if ids[i] == first and list(ids[i: i + width]) == list(pattern):
            return i
    return -1


def _runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(start, stop) of every run of ``token`` in ``ids``."""
    runs, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _strip(ids: list[int], is_space: Callable[[int], bool]) -> list[int]:
    while ids and is_space(ids[0]):
        ids = ids[1:]
    while ids and is_space(ids[-1]):
        ids = ids[:-1]
    return ids


@dataclass(frozen=True)
class TurnMarkers:
    """Token ids that delimit the user turns of a prompt rendered with the host's chat template.

    opening: the ids that precede the text of every user turn (None: the prompt is one user turn).
    end: the ids that follow it (None: a turn runs to the next opening or the prompt's end).
    """

    opening: tuple[int, ...] | None
    end: tuple[int, ...] | None

    @classmethod
    def from_chat_template(cls, tokenizer, template: str | None, placeholder: str,
                           end_text: str | None = None) -> "TurnMarkers":
        """Read the markers from a chat template by rendering a probe conversation.

        The probe's user, assistant and user contents are 1, 2 and 3 copies of ``placeholder`` (a
        special token of the tokenizer, so nothing merges with it): the ids between the first and
        second run end a user turn, and the ids that both precede the first run and lie between the
        second and third (their common suffix) open one. Whitespace-only tokens at the edges are
        dropped (they may merge with the text in a real prompt). end_text: the text that ends a user
        turn, instead of the template's (the host-config field ``qfusion_question_end``).
        """
        end = None if end_text is None else tuple(tokenizer.encode(end_text, add_special_tokens=False))
        if not template:
            return cls(None, end)
        messages = [{"role": "user", "content": placeholder}, {"role": "assistant", "content": placeholder * 2},
                    {"role": "user", "content": placeholder * 3}]
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer.encode(rendered, add_special_tokens=False)
        token = tokenizer.convert_tokens_to_ids(placeholder)
        runs = _runs(ids, token)
        if [stop - start for start, stop in runs] != [1, 2, 3]:
            raise ValueError(
                f"chat template: rendering a user, an assistant and a user turn did not keep their texts apart "
                f"(runs of {placeholder!r}: {[stop - start for start, stop in runs]}); qfusion cannot find the "
                "user turns of a prompt"
            )
        def is_space(i: int) -> bool:
            return not tokenizer.decode([i]).strip()

        head = _strip(ids[: runs[0][0]], is_space)
        between = _strip(ids[runs[1][1]: runs[2][0]], is_space)
        common = 0
        while common < min(len(head), len(between)) and head[-1 - common] == between[-1 - common]:
            common += 1
        if common == 0:
            raise ValueError(
                f"chat template: the text before the first user turn ({tokenizer.decode(head)!r}) and before a "
                f"later one ({tokenizer.decode(between)!r}) share no ending; qfusion cannot find where user turns start"
            )
        if end is None:
            end = tuple(_strip(ids[runs[0][1]: runs[1][0]], is_space)) or None
        return cls(tuple(between[-common:]), end)

    def user_turns(self, prompt: Sequence[int]) -> list[tuple[int, int]]:
        """(start, stop) of the text of every user turn of ``prompt``, in order; a prompt without the
        template's turn openings (a raw prompt) is one user turn."""
        starts, at = [], -1 if self.opening is None else find(prompt, self.opening)
        while at >= 0:
            starts.append(at + len(self.opening))
            at = find(prompt, self.opening, starts[-1])
        starts = starts or [0]
        turns = []
        for i, start in enumerate(starts):
            limit = starts[i + 1] - len(self.opening) if i + 1 < len(starts) else len(prompt)
            stop = -1 if self.end is None else find(prompt[:limit], self.end, start)
            turns.append((start, limit if stop < 0 else stop))
        return turns


@dataclass(frozen=True)
class Item:
    """One multimodal item: a visual input fused with the questions about it so far (it embeds the
    fused tokens of the last one: m for a first question, n after)."""

    visual: int
    questions: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Plan:
    """A prompt with a placeholder run before every follow-up question, and its items in prompt order.

    items: per modality, the items in the order of their placeholders (``Item.visual`` indexes the
        request's data items of that modality).
    """

    prompt: list[int]
    items: dict[str, list[Item]]


def plan(prompt: Sequence[int], markers: TurnMarkers, placeholders: dict[int, str], run: Callable[[int], list[int]],
         skip: set[int], question_ids: Callable[[list[list[int]]], list[int]],
         is_space: Callable[[int], bool]) -> Plan:
    """The items and prompt of a request (see the module docstring).

    placeholders: placeholder token id -> its modality ("image", "video"); one token per visual input.
    run: placeholder id -> the ids of one placeholder to insert (with the host's markers around it).
    skip: ids that are not question text (placeholders, the host's vision markers).
    question_ids: the question's ids, from the host ids of a turn's text pieces (between placeholders).
    is_space: whether a host token is whitespace only (skipped before an inserted placeholder).
    """
    turns = markers.user_turns(prompt)
    visuals = [(i, placeholders[t]) for i, t in enumerate(prompt) if t in placeholders]
    counts = [sum(start <= i < stop for i, _ in visuals) for start, stop in turns]
    if sum(counts) != len(visuals):
        raise ValueError(
            "prompt: a placeholder of an image or video stands outside the user turns; qfusion fuses every "
            "visual input with the user text of its turn"
        )
    if not visuals:
        return Plan(list(prompt), {})
    first = next(i for i, c in enumerate(counts) if c)
    turns, counts = turns[first:], counts[first:]
    kinds = [kind for _, kind in visuals]
    index_of = [kinds[:v].count(kind) for v, kind in enumerate(kinds)]  # per visual input, its index in its modality
    asked: dict[int, list[tuple[int, ...]]] = {}
    items: dict[str, list[Item]] = {}
    out, cursor = [], 0
    for turn, ((start, stop), about) in enumerate(zip(turns, question_images(counts))):
        question = _question(prompt[start:stop], skip, question_ids)
        if not question:
            raise ValueError(
                f"prompt: user turn {turn} about an image has no question text; the qfusion plugin compresses "
                "each image for the question of its turn"
            )
        if not counts[turn]:  # a follow-up: its placeholders go right before its text
            at = start
            while at < stop and is_space(prompt[at]):
                at += 1
            out += prompt[cursor:at]
            for v in about:
                out += run(next(t for t, kind in placeholders.items() if kind == kinds[v]))
            cursor = at
        for v in about:
            asked.setdefault(v, []).append(tuple(question))
            items.setdefault(kinds[v], []).append(Item(index_of[v], tuple(asked[v])))
    return Plan(out + list(prompt[cursor:]), items)


def _question(ids: Sequence[int], skip: set[int], question_ids: Callable[[list[list[int]]], list[int]]) -> list[int]:
    """The question ids of a turn's host ids: its text pieces between placeholders, joined."""
    pieces, piece = [], []
    for t in [*ids, None]:
        if t is None or t in skip:
            if piece:
                pieces.append(piece)
            piece = []
        else:
            piece.append(t)
    return question_ids(pieces)
