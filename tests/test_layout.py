import pytest
import torch

from qfusion.layout import NO_GROUP, QUERY, TEXT, VISION, dense_mask, pack

# v v | t q e | t e | t e : vision 2, group 0 (1 text + m=2), groups 1 and 2 (1 text + n=1)
SMALL = dict(vision_lengths=[2], question_lengths=[[1, 1, 1]], budget=(2, 1))

EXPECTED = {
    "causal": [
        "1........",
        "11.......",
        "111......",
        "1111.....",
        "11111....",
        "111111...",
        "1111111..",
        "11111111.",
        "111111111",
    ],
    "prefix": [
        "11.......",
        "11.......",
        "111......",
        "1111.....",
        "11111....",
        "111111...",
        "1111111..",
        "11111111.",
        "111111111",
    ],
    "grouped": [
        "11.......",
        "11.......",
        "111......",
        "1111.....",
        "11111....",
        "111111...",
        "1111111..",
        "11111..1.",
        "11111..11",
    ],
}


def as_bool(rows):
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_pack_small_metadata():
    layout = pack(**SMALL)
    meta = layout.meta
    assert meta.kind.tolist() == [VISION, VISION, TEXT, QUERY, QUERY, TEXT, QUERY, TEXT, QUERY]
    assert meta.group.tolist() == [NO_GROUP, NO_GROUP, 0, 0, 0, 1, 1, 2, 2]
    assert meta.order.tolist() == list(range(9))
    assert layout.query_index.tolist() == [3, 4, 6, 8]
    assert layout.eos_index.tolist() == [4, 6, 8]
    assert layout.slot.tolist() == [0, 1, 0, 0]
    assert layout.is_eos_slot().tolist() == [False, True, True, True]
    assert layout.group_sizes() == [2, 1, 1]


@pytest.mark.parametrize("policy", ["causal", "prefix", "grouped"])
def test_mask_rule_matches_hand_built_mask(policy):
    layout = pack(**SMALL, policy=policy)
    mask = dense_mask(policy, layout.meta, layout.meta, 0)
    assert torch.equal(mask, as_bool(EXPECTED[policy]))


def test_grouped_positions_restart_after_group0_and_others_run_on():
    causal = pack(**SMALL, policy="causal").position.tolist()
    grouped = pack(**SMALL, policy="grouped").position.tolist()
    assert causal == list(range(9))
    # group 0 ends at position 5; groups 1 and 2 both start there
    assert grouped == [0, 1, 2, 3, 4, 5, 6, 5, 6]


def test_mixed_batch_counts_and_offsets():
    vision = [5, 9, 3, 0]
    questions = [[2, 4], [3], [1, 1, 2, 3], [7]]
    m, n = 4, 2
    layout = pack(vision, questions, budget=(m, n), policy="prefix")
    lengths = [v + sum(q) + m + (len(q) - 1) * n for v, q in zip(vision, questions)]
    assert lengths == [17, 16, 20, 11]
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    assert layout.meta.cu_seqlens.tolist() == cu
    assert layout.meta.max_seqlen == 20
    assert layout.num_tokens == sum(lengths)
    assert layout.num_groups == sum(len(q) for q in questions)
    assert layout.group_sizes() == [m, n, m, m, n, n, n, m]
    assert layout.group_sample.tolist() == [0, 0, 1, 2, 2, 2, 2, 3]
    assert layout.group_number.tolist() == [0, 1, 0, 0, 1, 2, 3, 0]
    assert layout.vision_index.numel() == sum(vision)
    assert layout.text_index.numel() == sum(sum(q) for q in questions)
    assert layout.query_index.numel() == sum(layout.group_sizes())
    kind = layout.meta.kind
    assert (kind[layout.vision_index] == VISION).all()
    assert (kind[layout.text_index] == TEXT).all()
    assert (kind[layout.query_index] == QUERY).all()
    # every token is exactly one of vision / text / query
    everything = torch.cat([layout.vision_index, layout.text_index, layout.query_index]).sort().values
    assert torch.equal(everything, torch.arange(layout.num_tokens))
    # the eos slot closes each group; orders restart per sample
    assert torch.equal(layout.query_index[layout.is_eos_slot()], layout.eos_index)
    for b, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        assert layout.meta.order[start:end].tolist() == list(range(end - start))
        assert (layout.sample[start:end] == b).all()


def test_no_question_ablation_groups_hold_only_slots():
    layout = pack([3], [[0, 0]], budget=(3, 2))
    assert layout.meta.kind.tolist() == [VISION] * 3 + [QUERY] * 5
    assert layout.text_index.numel() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vision_lengths=[2], question_lengths=[[1]], budget=(0, 1)), "budget: m, n: expected 1 <= n <= m"),
        (dict(vision_lengths=[2], question_lengths=[[1]], budget=(2, 3)), "budget: m, n: expected 1 <= n <= m"),
        (dict(vision_lengths=[2, 3], question_lengths=[[1]], budget=(2, 1)), "question_lengths: expected one list"),
        (dict(vision_lengths=[2], question_lengths=[[]], budget=(2, 1)), r"question_lengths\[0\]"),
        (dict(vision_lengths=[2], question_lengths=[[1]], budget=(2, 1), policy="full"), "policy"),
        (dict(vision_lengths=[], question_lengths=[], budget=(2, 1)), "at least one sample"),
    ],
)
def test_pack_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack(**kwargs)
