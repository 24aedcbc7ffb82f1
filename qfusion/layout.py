"""Packing of [vision | question 1 + m queries | question 2 + n queries | ...] into one varlen batch.

Every sample of a batch becomes one contiguous run of the packed sequence (no padding); per-token
metadata says what each token is (``kind``), which question group it belongs to (``group``), where it
stands in its sample (``order``) and which rotary position it takes (``position``). The metadata and
the mask rule on it are the attention op's contract (:mod:`qfusion.ops.meta`); this module is the one
place that decides kinds, orders, groups and positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from qfusion.budget import Budget

# The attention contract (kinds, metadata, mask rule) belongs to the kernel, in ops/; layout builds
# the metadata. Its names stay importable from here (``qfusion.layout.AttentionMeta``, ``mask_rule``).
from qfusion.ops.meta import NO_GROUP, POLICIES, QUERY, TEXT, VISION, AttentionMeta
from qfusion.ops.meta import dense_mask as dense_mask
from qfusion.ops.meta import mask_rule as mask_rule


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Where every token of a packed multi-question batch comes from and what it may see.

    Tokens are packed sample after sample; within a sample: its V vision tokens, then for each
    question group g its question tokens (omitted when questions are not used) followed by k slots
    (k = m for g = 0, n after). The last slot of every group is the shared ⟨eos⟩.

    meta: the attention metadata (kind, group, order, cu_seqlens) of the packed sequence.
    position: (T,) rotary position of every token.
    sample: (T,) the sample each token belongs to.
    vision_index: (sum V_b,) packed index of every vision token, samples in order.
    text_index: (sum question lengths,) packed index of every question token, in batch order.
    query_index: (Q,) packed index of every slot, groups in batch order.
    slot: (Q,) slot number of each query token within its group (0 .. k - 1; k - 1 is ⟨eos⟩).
    query_cu: (K + 1,) offsets of each group's slots in ``query_index``.
    eos_index: (K,) packed index of each group's ⟨eos⟩ slot.
    group_sample: (K,) sample of each group; group_number: (K,) its index within the sample.
    """

    meta: AttentionMeta
    position: Tensor
    sample: Tensor
    vision_index: Tensor
    text_index: Tensor
    query_index: Tensor
    slot: Tensor
    query_cu: Tensor
    eos_index: Tensor
    group_sample: Tensor
    group_number: Tensor

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    @property
    def num_groups(self) -> int:
        return self.eos_index.numel()

    def group_sizes(self) -> list[int]:
        """Number of slots (m or n) of every group, in batch order."""
        return (self.query_cu[1:] - self.query_cu[:-1]).tolist()

    def is_eos_slot(self) -> Tensor:
        """(Q,) True at the ⟨eos⟩ slot of each group."""
        sizes = self.query_cu[1:] - self.query_cu[:-1]
        return self.slot == torch.repeat_interleave(sizes, sizes) - 1


def group_first_position(policy: str, group: int, cursor: int, group0_end: int | None) -> int:
    """Rotary position of the first token of question group ``group`` of a sample.

    cursor: the position right after the sample's last token so far; group0_end: right after group 0.
    Under ``grouped`` every later group restarts right after group 0 (it cannot see the groups
    between), otherwise positions run on.
    """
    return group0_end if policy == "grouped" and group > 0 else cursor


def pack(
    vision_lengths: Sequence[int],
    question_lengths: Sequence[Sequence[int]],
    *,
    budget: Budget | tuple[int, int],
    policy: str = "causal",
    device: torch.device | str | None = None,
) -> PackedLayout:
    """Build the packed layout of a batch.

    vision_lengths: V_b for each of the B samples.
    question_lengths: for each sample, the token count of each of its questions (G_b >= 1 entries;
        use 0 for the paper's "no question" ablation, where a group holds only its slots).
    budget: (m, n), the slots of the first group / of every later group of a sample.
    policy: the mask policy; it decides rotary positions (``grouped`` restarts every group g >= 1
        right after group 0, so a group never depends on groups it cannot see).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    budget = Budget.of(budget, name="budget")
    if len(vision_lengths) != len(question_lengths):
        raise ValueError(
            f"question_lengths: expected one list per sample ({len(vision_lengths)} samples), "
            f"got {len(question_lengths)}"
        )
    if len(vision_lengths) == 0:
        raise ValueError("vision_lengths: expected at least one sample, got none")

    kind, group, order, position, sample, slot = [], [], [], [], [], []
    vision_index, text_index, query_index, eos_index = [], [], [], []
    query_cu, group_sample, group_number = [0], [], []
    cu_seqlens = [0]
    for b, (num_vision, lengths) in enumerate(zip(vision_lengths, question_lengths)):
        if num_vision < 0:
            raise ValueError(f"vision_lengths[{b}]: expected >= 0, got {num_vision}")
        if len(lengths) == 0:
            raise ValueError(f"question_lengths[{b}]: expected at least one question, got none")
        start = cu_seqlens[-1]
        kind += [VISION] * num_vision
        group += [NO_GROUP] * num_vision
        position += list(range(num_vision))
        vision_index += range(start, start + num_vision)
        cursor, group0_end = num_vision, None
        for g, text_len in enumerate(lengths):
            if text_len < 0:
                raise ValueError(f"question_lengths[{b}][{g}]: expected >= 0, got {text_len}")
            k = budget.slots(g)
            group_len = text_len + k
            first_position = group_first_position(policy, g, cursor, group0_end)
            kind += [TEXT] * text_len + [QUERY] * k
            group += [g] * group_len
            position += range(first_position, first_position + group_len)
            text_index += range(start + cursor, start + cursor + text_len)
            query_index += range(start + cursor + text_len, start + cursor + group_len)
            slot += range(k)
            eos_index.append(start + cursor + group_len - 1)
            query_cu.append(query_cu[-1] + k)
            group_sample.append(b)
            group_number.append(g)
            cursor += group_len
            if g == 0:
                group0_end = cursor
        order += range(cursor)
        sample += [b] * cursor
        cu_seqlens.append(start + cursor)

    def idx(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    lengths = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    meta = AttentionMeta.from_lists(kind, group, order, lengths, device)
    return PackedLayout(
        meta=meta,
        position=idx(position),
        sample=idx(sample),
        vision_index=idx(vision_index),
        text_index=idx(text_index),
        query_index=idx(query_index),
        slot=idx(slot),
        query_cu=idx(query_cu),
        eos_index=idx(eos_index),
        group_sample=idx(group_sample),
        group_number=idx(group_number),
    )


# ---------------------------------------------------------------------- incremental packing (start / ask)


@dataclass(frozen=True)
class StepCursor:
    """Where each sample of an incremental session stands: groups asked, next order and position.

    groups, next_order, next_position: per sample; group0_end: per sample, the position right after
    group 0 (None before it is asked).
    """

    groups: tuple[int, ...]
    next_order: tuple[int, ...]
    next_position: tuple[int, ...]
    group0_end: tuple[int | None, ...]


@dataclass(frozen=True, eq=False)
class PackedStep:
    """The packed layout of one incremental step: one new question group for some samples.

    meta: metadata of the new tokens (samples without a question have zero tokens).
    position: (T,) their rotary positions. text_index / query_index: (·,) indices of the question
    tokens / slots among them; slot: (Q,) slot numbers; is_eos: (Q,) True at each group's ⟨eos⟩.
    asked: the samples that got a group, in order; group_sizes: their slot counts (m or n).
    cursor: the cursor after this step.
    """

    meta: AttentionMeta
    position: Tensor
    text_index: Tensor
    query_index: Tensor
    slot: Tensor
    is_eos: Tensor
    asked: list[int]
    group_sizes: list[int]
    cursor: StepCursor


def pack_vision(vision_lengths: Sequence[int], device=None) -> tuple[AttentionMeta, Tensor, StepCursor]:
    """The vision prefix of an incremental session: its metadata, (T,) positions and the start cursor."""
    lengths = list(vision_lengths)
    order = [i for length in lengths for i in range(length)]
    meta = AttentionMeta.from_lists([VISION] * len(order), [NO_GROUP] * len(order), order, lengths, device)
    cursor = StepCursor((0,) * len(lengths), tuple(lengths), tuple(lengths), (None,) * len(lengths))
    return meta, torch.tensor(order, dtype=torch.long, device=device), cursor


def pack_step(cursor: StepCursor, text_lengths: Sequence[int | None], *, budget: Budget, policy: str,
              device=None) -> PackedStep:
    """Lay out one new question group per sample after ``cursor`` (the same rules as :func:`pack`).

    text_lengths: per sample, the new question's token count (0 for "no question" groups), or None
        for a sample that asks nothing this step.
    budget: the session's (m, n), as its ``start`` validated it.
    """
    kind, group, order, position, slot, is_eos, lengths, text_local = [], [], [], [], [], [], [], []
    groups, next_order = list(cursor.groups), list(cursor.next_order)
    next_position, group0_end = list(cursor.next_position), list(cursor.group0_end)
    asked, sizes = [], []
    for b, text_len in enumerate(text_lengths):
        if text_len is None:
            lengths.append(0)
            continue
        g = groups[b]
        k = budget.slots(g)
        first = group_first_position(policy, g, next_position[b], group0_end[b])
        start = len(kind)
        kind += [TEXT] * text_len + [QUERY] * k
        group += [g] * (text_len + k)
        order += range(next_order[b], next_order[b] + text_len + k)
        position += range(first, first + text_len + k)
        text_local += range(start, start + text_len)
        slot += range(k)
        is_eos += [False] * (k - 1) + [True]
        lengths.append(text_len + k)
        asked.append(b)
        sizes.append(k)
        groups[b] = g + 1
        next_order[b] += text_len + k
        next_position[b] = first + text_len + k
        if g == 0:
            group0_end[b] = next_position[b]
    meta = AttentionMeta.from_lists(kind, group, order, lengths, device)
    is_text = torch.zeros(len(kind), dtype=torch.bool, device=device)
    text_index = torch.tensor(text_local, dtype=torch.long, device=device)
    is_text[text_index] = True

    def idx(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return PackedStep(meta, idx(position), text_index, (~is_text).nonzero().squeeze(-1), idx(slot),
                      idx(is_eos, torch.bool), asked, sizes,
                      StepCursor(tuple(groups), tuple(next_order), tuple(next_position), tuple(group0_end)))


def merge_keys(cached: AttentionMeta, new: AttentionMeta) -> tuple[AttentionMeta, Tensor, Tensor]:
    """Per sample [cached keys | new tokens]: their metadata, the gather index into cat([cached, new])
    that builds it, and (T,) which merged keys are new."""
    len_c, len_n = cached.seqlens().long(), new.seqlens().long()
    cu = torch.zeros(len_c.numel() + 1, dtype=torch.long, device=len_c.device)
    cu[1:] = (len_c + len_n).cumsum(0)
    sample_c, sample_n = cached.sample_ids(), new.sample_ids()
    dest_c = cu[sample_c] + torch.arange(cached.num_tokens, device=cu.device) - cached.cu_seqlens.long()[sample_c]
    dest_n = (cu[sample_n] + len_c[sample_n] + torch.arange(new.num_tokens, device=cu.device)
              - new.cu_seqlens.long()[sample_n])
    merge = torch.argsort(torch.cat([dest_c, dest_n]))
    from_new = merge >= cached.num_tokens

    def merged(a, b):
        return torch.cat([a, b])[merge]

    meta = AttentionMeta(merged(cached.kind, new.kind), merged(cached.group, new.group),
                         merged(cached.order, new.order), cu.to(torch.int32), int((len_c + len_n).max()))
    return meta, merge, from_new


def keys_to_keep(policy: str, meta_k: AttentionMeta, from_new: Tensor, cursor: StepCursor) -> tuple[Tensor, AttentionMeta]:
    """Which merged keys later steps can see, and their metadata: all of them, except under
    ``grouped``, where a group after group 0 is seen by no later group."""
    keep_new = [policy != "grouped" or g == 1 for g in cursor.groups]
    sample_k = meta_k.sample_ids()
    keep = ~from_new | torch.tensor(keep_new, device=from_new.device)[sample_k]
    batch = len(cursor.groups)
    kept_lengths = torch.bincount(sample_k[keep], minlength=batch)
    kept_cu = torch.zeros(batch + 1, dtype=torch.int32, device=from_new.device)
    kept_cu[1:] = kept_lengths.cumsum(0)
    meta = AttentionMeta(meta_k.kind[keep], meta_k.group[keep], meta_k.order[keep], kept_cu, int(kept_lengths.max()))
    return keep, meta
