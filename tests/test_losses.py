import math

import pytest
import torch

from qfusion.losses import contrastive_loss, generation_loss, identity_loss

EYE2 = torch.eye(2, dtype=torch.float64)


def test_contrastive_loss_hand_computed():
    # logits = 2·I: each direction's CE per row is log(1 + e^-2)
    loss = contrastive_loss(EYE2, EYE2, torch.tensor(math.log(2.0), dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-12)


def test_contrastive_loss_normalises_inputs():
    loss = contrastive_loss(3 * EYE2, 0.5 * EYE2, torch.tensor(math.log(2.0), dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-12)


def test_contrastive_loss_clamps_the_temperature_at_100():
    loss = contrastive_loss(EYE2, EYE2, torch.tensor(10.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-100)), abs=1e-40)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    contrastive_loss(EYE2, EYE2, scale).backward()
    assert scale.grad.item() == 0.0  # above the clamp: no gradient


def test_identical_answers_are_positives_not_negatives():
    ids = [torch.tensor([4, 2]), torch.tensor([4, 2])]
    loss = contrastive_loss(EYE2, EYE2, torch.tensor(math.log(2.0), dtype=torch.float64), answer_ids=ids)
    # each row's target is (½, ½) over logits (2, 0): ½·log(1+e^-2) + ½·(2 + log(1+e^-2))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)) + 1.0, rel=1e-12)
    different = [torch.tensor([4, 2]), torch.tensor([4])]
    plain = contrastive_loss(EYE2, EYE2, torch.tensor(math.log(2.0), dtype=torch.float64), answer_ids=different)
    assert plain.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-12)


def test_contrastive_gradients_are_finite_and_shapes_checked():
    e = torch.randn(5, 8, requires_grad=True)
    a = torch.randn(5, 8, requires_grad=True)
    s = torch.tensor(2.659, requires_grad=True)
    contrastive_loss(e, a, s).backward()
    assert all(torch.isfinite(x.grad).all() for x in (e, a, s))
    with pytest.raises(ValueError, match="answer_embed"):
        contrastive_loss(e, a[:4], s)
    with pytest.raises(ValueError, match="answer_ids: expected one answer per group"):
        contrastive_loss(e, a, s, answer_ids=[torch.tensor([1])])


def test_identity_loss_group_scope_hand_computed():
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]], dtype=torch.float64)  # last row is <eos>
    parallel = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    single = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # one non-eos row: skipped
    assert identity_loss([orthogonal]).item() == pytest.approx(0.0, abs=1e-15)
    assert identity_loss([parallel]).item() == pytest.approx(0.5, rel=1e-12)  # off-diagonals 1,1 over 4 entries
    assert identity_loss([orthogonal, parallel, single]).item() == pytest.approx(0.25, rel=1e-12)
    assert identity_loss([single]).item() == 0.0


def test_identity_loss_batch_scope_includes_eos():
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # Q Qᵀ = all ones; (Q Qᵀ − I)² has two ones in four entries
    assert identity_loss([rows], scope="batch").item() == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="scope"):
        identity_loss([rows], scope="sample")


def test_identity_loss_gradients_are_finite():
    states = [torch.randn(6, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)]
    identity_loss(states).backward()
    assert all(torch.isfinite(s.grad).all() for s in states)
    assert states[0].grad[-1].abs().sum() == 0  # <eos> row is excluded in group scope


def test_generation_loss_hand_computed_and_shifted():
    logits = torch.zeros(1, 4, 3, dtype=torch.float64)
    logits[0, 1, 1] = math.log(3.0)  # predicts label at position 2
    logits[0, 2, 2] = math.log(2.0)  # predicts label at position 3
    labels = torch.tensor([[-100, -100, 1, 2]])
    expected = (-math.log(3 / 5) - math.log(2 / 4)) / 2
    assert generation_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    # gradient accumulation: divide by the global number of scored tokens instead
    assert generation_loss(logits, labels, num_items_in_batch=8).item() == pytest.approx(expected * 2 / 8, rel=1e-12)


def test_generation_loss_ignores_prompt_positions_and_validates_shapes():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 4
    loss = generation_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    scored = logits.grad.abs().sum(-1)
    assert scored[0, 2] > 0 and scored.sum() == scored[0, 2]
    with pytest.raises(ValueError, match="labels: expected shape"):
        generation_loss(logits, labels[:, :4])
    with pytest.raises(ValueError, match="num_items_in_batch"):
        generation_loss(logits, labels, num_items_in_batch=0)
