"""qfusion.inputs: the placeholder protocol and the question tensors, encoded and decoded by one owner."""

import pytest
import torch

from qfusion import Budget
from qfusion.inputs import (check_left_padded, check_placeholders, decode_call, decode_questions,
                            encode_questions, placeholder_counts, placeholder_runs)


def test_encode_then_decode_round_trips_ragged_questions():
    ids = [[[5, 6], [7], [8, 9, 10]], [[11]], [[12, 13, 14, 15], [16]]]
    input_ids, mask = encode_questions(ids)
    assert input_ids.shape == mask.shape == (3, 3, 4)
    decoded = decode_questions(input_ids, mask, 3)
    assert [[q.tolist() for q in sample] for sample in decoded] == ids


def test_decode_reads_slots_until_the_first_empty_row():
    ids = torch.tensor([[[5, 6, 0], [7, 0, 0], [0, 0, 0]], [[8, 9, 10], [0, 0, 0], [0, 0, 0]]])
    questions = decode_questions(ids, (ids > 0).long(), 2)
    assert [[q.tolist() for q in sample] for sample in questions] == [[[5, 6], [7]], [[8, 9, 10]]]
    assert [len(s) for s in decode_questions(ids, None, 2)] == [3, 3]  # no mask: every slot, every token
    with pytest.raises(ValueError, match="sample 1 has no question"):
        decode_questions(ids, torch.stack([(ids[0] > 0).long(), torch.zeros(3, 3, dtype=torch.long)]), 2)
    gap = (ids > 0).long()
    gap[0, 0] = 0
    with pytest.raises(ValueError, match="empty question slot before a filled one"):
        decode_questions(ids, gap, 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        decode_questions(ids, (ids > 0).long() * 2, 2)
    with pytest.raises(TypeError, match="integer token ids"):
        decode_questions(ids.float(), None, 2)
    with pytest.raises(ValueError, match="qfusion_attention_mask: expected shape"):
        decode_questions(ids, torch.ones(2, 3), 2)
    with pytest.raises(ValueError, match="one row per sample"):
        decode_questions(ids, None, 3)


def test_encode_refuses_empty_samples_and_questions():
    with pytest.raises(ValueError, match=r"ids\[1\]: expected at least one question"):
        encode_questions([[[1]], []])
    with pytest.raises(ValueError, match=r"ids\[0\]\[1\]: expected at least one token"):
        encode_questions([[[1], []]])


def test_placeholder_counts_runs_and_check_under_a_budget():
    assert placeholder_counts(3, Budget(4, 2)) == [4, 2, 2]
    assert placeholder_counts(1, Budget(4, 2), prefix=32) == [36]
    ids = torch.tensor([[1, 4, 4, 4, 9, 4, 9, 4, 4], [4, 4, 4, 9, 9, 9, 9, 9, 9]])
    assert placeholder_runs(ids[0], 4) == [3, 1, 2]
    with pytest.raises(ValueError, match=r"sample 0 has image placeholder runs \[3, 1, 2\] \(total 6\), "
                                         r"expected \[3, 1, 1\]"):
        check_placeholders(ids, 4, [3, 1], Budget(3, 1))
    with pytest.raises(ValueError, match="2 host query tokens"):
        check_placeholders(ids, 4, [2, 1], Budget(3, 1), prefix=2)
    check_placeholders(ids[1:], 4, [1], Budget(3, 1))


def test_right_padded_generation_inputs_are_refused():
    check_left_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"samples \[1\] are right-padded"):
        check_left_padded(torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_a_call_is_decoded_once_with_its_image_layout_checked():
    questions, mask = encode_questions([[[5, 6], [7]]])
    ids = torch.tensor([[4, 4, 4, 9, 4, 9]])
    decoded, counts = decode_call(ids, questions, mask, None, token_id=4, budget=Budget(3, 1))
    assert [q.tolist() for q in decoded[0]] == [[5, 6], [7]] and counts is None
    two_images = torch.tensor([[2, 0]])
    with pytest.raises(ValueError, match="'blip-2' host takes one image per prompt"):
        decode_call(ids, questions, mask, two_images, token_id=4, budget=Budget(3, 1), multi_image=False, host="blip-2")
    with pytest.raises(ValueError, match=r"expected \[6, 2\]"):  # two images: 2 x m, then n per image
        decode_call(ids, questions, mask, two_images, token_id=4, budget=Budget(3, 1))
    with pytest.raises(ValueError, match="qfusion_input_ids: required"):
        decode_call(ids, None, None, None, token_id=4, budget=Budget(3, 1))
