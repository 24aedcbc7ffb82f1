"""Branch divergence of a causal LM (SPEC.md §7): how its last hidden states drift apart along two
answers to one prompt.

:func:`branch_divergence` runs the model over (prompt, chosen, rejected) pairs; :func:`divergence_statistics`
is its arithmetic on per-pair difference arrays, giving a :class:`DivergenceResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qfusion.scaling.checks import count, positive


@dataclass(frozen=True, eq=False)
class DivergenceResult:
    """Branch-divergence statistics at N = 1, 2, ..., T_max answer steps (SPEC.md §7).

    n: (K,) the numbers of answer steps N = 1..K.
    energy: (K,) E(N) = mean over pairs of (wᵀ Σ_{t≤N} d_t)², w = 1/√D.
    rho: (K,) ρ(N), the mean cosine of d_i, d_j over i ≠ j ≤ N (0 where no two nonzero steps exist).
    bound: (K,) σ·√(N + N(N−1)·ρ(N)) (clipped at 0 inside the root).
    pairs_at_n: (K,) how many pairs have at least N answer steps (those that count at N).
    sigma: √E(1). threshold_ratio: smallest N with r(N) = 1/((N−1)ρ(N)) < r_star and ρ(N) > 0, or
    None. threshold_plateau: smallest N with |ρ(N+1) − ρ(N)| < eps, or None. num_pairs: pairs used.
    """

    n: np.ndarray
    energy: np.ndarray
    rho: np.ndarray
    bound: np.ndarray
    pairs_at_n: np.ndarray
    sigma: float
    threshold_ratio: int | None
    threshold_plateau: int | None
    num_pairs: int
    r_star: float
    eps: float

    def to_dict(self) -> dict:
        """The result as plain JSON-ready values."""
        return {"n": self.n.tolist(), "energy": self.energy.tolist(), "rho": self.rho.tolist(),
                "bound": self.bound.tolist(), "pairs_at_n": self.pairs_at_n.tolist(), "sigma": self.sigma,
                "threshold_ratio": self.threshold_ratio, "threshold_plateau": self.threshold_plateau,
                "num_pairs": self.num_pairs, "r_star": self.r_star, "eps": self.eps}


def divergence_statistics(differences: Sequence, *, r_star: float = 1.0, eps: float = 1e-3) -> DivergenceResult:
    """E(N), ρ(N), the bound and both thresholds from per-pair hidden-state differences d_t.

    differences: one array (T_i, D) per pair, row t−1 = d_t = f(x_≤t) − f(y_≤t). Statistics at N use
        the pairs with T_i ≥ N answer steps. Rows that are exactly zero (answers still sharing their
        first tokens) are skipped in the cosines; ρ(N) pools the cosines of all pairs' (i, j), i ≠ j.
    r_star: threshold 1 is the smallest N with 1/((N−1)ρ(N)) < r_star, only where ρ(N) > 0.
    eps: threshold 2 is the smallest N with |ρ(N+1) − ρ(N)| < eps, where ρ is defined at both.

    >>> d = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # one pair, D = 2
    >>> result = divergence_statistics([d])
    >>> result.energy.round(6).tolist(), round(result.sigma**2, 6)  # (wᵀ Σ_{t≤N} d_t)², w = (1/√2, 1/√2)
    ([2.0, 4.5, 8.0], 2.0)
    >>> result.rho.round(4).tolist()  # cos(d1, d2) = cos(d1, d3) = 1/√2, cos(d2, d3) = 0
    [0.0, 0.7071, 0.4714]
    """
    if not isinstance(differences, Sequence):
        raise TypeError(f"differences: expected a sequence of (T, D) arrays, one per pair, got "
                        f"{type(differences).__name__}")
    if not differences:
        raise ValueError("differences: expected at least one (T, D) array, got none")
    arrays = [np.asarray(d) for d in differences]
    for i, array in enumerate(arrays):
        if array.dtype.kind not in "iuf":
            raise TypeError(f"differences[{i}]: expected a (T, D) array of numbers, got dtype {array.dtype}")
    arrays = [array.astype(np.float64) for array in arrays]
    if any(a.ndim != 2 for a in arrays) or len({a.shape[1] for a in arrays}) != 1:
        raise ValueError(f"differences: expected (T_i, D) arrays with one D, got shapes {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("differences: expected finite values")
    r_star, eps = positive(r_star, "r_star"), positive(eps, "eps")
    t_max = max(len(a) for a in arrays)
    if t_max == 0:
        raise ValueError("differences: every array has 0 steps")

    energy_sum, pairs_at_n = np.zeros(t_max), np.zeros(t_max, dtype=np.int64)
    cosine_sum, cosine_count = np.zeros(t_max), np.zeros(t_max)
    for d in arrays:  # d: (T, D)
        steps, hidden = d.shape
        projected = np.cumsum(d.sum(axis=1)) / math.sqrt(hidden)  # (T,) wᵀ Σ_{t≤N} d_t
        energy_sum[:steps] += projected**2
        pairs_at_n[:steps] += 1
        norms = np.linalg.norm(d, axis=1)  # (T,)
        nonzero = norms > 0
        units = np.divide(d, norms[:, None], out=np.zeros_like(d), where=nonzero[:, None])  # (T, D)
        # Σ_{i≠j≤N} cos(d_i, d_j) = |Σ_{t≤N} u_t|² − k(N), with k(N) unit vectors among the first N.
        k = np.cumsum(nonzero)
        cosine_sum[:steps] += np.sum(np.cumsum(units, axis=0) ** 2, axis=1) - k
        cosine_count[:steps] += k * (k - 1)

    n = np.arange(1, t_max + 1)
    energy = energy_sum / pairs_at_n
    defined = cosine_count > 0
    rho = np.clip(np.divide(cosine_sum, cosine_count, out=np.zeros(t_max), where=defined), -1.0, 1.0)
    sigma = math.sqrt(energy[0])
    bound = sigma * np.sqrt(np.maximum(n + n * (n - 1) * rho, 0.0))

    with np.errstate(divide="ignore"):
        ratio = 1.0 / ((n - 1) * rho)  # r(N); only read where ρ > 0
    below = np.flatnonzero((rho > 0) & (ratio < r_star))
    flat = np.flatnonzero(defined[:-1] & defined[1:] & (np.abs(np.diff(rho)) < eps))
    return DivergenceResult(
        n=n, energy=energy, rho=rho, bound=bound, pairs_at_n=pairs_at_n, sigma=sigma,
        threshold_ratio=int(n[below[0]]) if len(below) else None,
        threshold_plateau=int(n[flat[0]]) if len(flat) else None,
        num_pairs=len(arrays), r_star=float(r_star), eps=float(eps),
    )


def _pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token, else 0 (masked out anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _check_pairs(pairs) -> None:
    """Raise unless pairs is a non-empty sequence of (prompt, chosen, rejected) strings."""
    if not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"pairs: expected a non-empty sequence of (prompt, chosen, rejected) triples, got {pairs!r}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 3 and all(isinstance(s, str) for s in pair)):
            raise TypeError(f"pairs[{i}]: expected a (prompt, chosen, rejected) triple of strings, got {pair!r}")


def _pair_differences(model, sequences: list[tuple[list[int], list[int], list[int]]], pad_id: int,
                      device: torch.device) -> list[np.ndarray]:
    """d_t for a batch of tokenized (prompt, chosen[:T], rejected[:T]): one (T, D) array per pair."""
    rows = [prompt + answer for prompt, chosen, rejected in sequences for answer in (chosen, rejected)]
    length = max(len(row) for row in rows)
    # Right padding: real tokens keep positions 0..L−1 and never attend to the padding.
    input_ids = torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], device=device)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], device=device)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    hidden = hidden.float().cpu()  # (2B, L, D)
    differences = []
    for b, (prompt, chosen, rejected) in enumerate(sequences):
        start, steps = len(prompt), len(chosen)
        # The state after answer token t sits at position len(prompt) + t − 1.
        d = (hidden[2 * b, start:start + steps] - hidden[2 * b + 1, start:start + steps]).double().numpy()
        shared = next((t for t in range(steps) if chosen[t] != rejected[t]), steps)
        d[:shared] = 0.0  # identical prefixes: zero by definition, whatever the batched arithmetic gives
        differences.append(d)
    return differences


def branch_divergence(model, tokenizer, pairs: Sequence[tuple[str, str, str]], max_len: int = 64,
                      batch_size: int = 8, progress: bool = True, *, r_star: float = 1.0,
                      eps: float = 1e-3) -> DivergenceResult:
    """Measure how a causal LM's last hidden states drift apart along chosen vs rejected answers.

    model: a transformers causal LM (``AutoModelForCausalLM``); f(x_≤t) is its last-layer hidden
        state (``hidden_states[-1]``, before the output head) at the last token of prompt + answer[:t].
    tokenizer: its tokenizer; prompt and answers are tokenized separately (the answers without
        special tokens) and concatenated, so answer positions are exact.
    pairs: (prompt, chosen, rejected) strings. Pair i contributes T_i = min(len(chosen), len(rejected),
        max_len) answer steps d_t = f(prompt + chosen_≤t) − f(prompt + rejected_≤t); statistics at N
        use the pairs with T_i ≥ N. Pairs with an empty answer are dropped; steps where the answers
        still share their tokens are d_t = 0 and skipped in the cosines.
    max_len: cap on answer steps. batch_size: pairs per forward (2·batch_size sequences).
    progress: show a tqdm bar. r_star, eps: the thresholds, as in :func:`divergence_statistics`.

    Runs under ``torch.no_grad()`` in eval mode (the model's mode is restored), on the model's device.
    """
    _check_pairs(pairs)
    max_len, batch_size = count(max_len, "max_len", minimum=1), count(batch_size, "batch_size", minimum=1)
    r_star, eps = positive(r_star, "r_star"), positive(eps, "eps")  # before the model runs, not after

    sequences = []
    for prompt, chosen, rejected in pairs:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        chosen_ids = list(tokenizer(chosen, add_special_tokens=False)["input_ids"])
        rejected_ids = list(tokenizer(rejected, add_special_tokens=False)["input_ids"])
        steps = min(len(chosen_ids), len(rejected_ids), max_len)
        if steps > 0:
            sequences.append((prompt_ids, chosen_ids[:steps], rejected_ids[:steps]))
    if not sequences:
        raise ValueError("pairs: every pair has an empty chosen or rejected answer after tokenization")

    pad_id, device = _pad_id(tokenizer), next(model.parameters()).device
    was_training = model.training
    model.eval()
    differences: list[np.ndarray] = []
    try:
        with torch.no_grad(), tqdm(total=len(sequences), desc="branch divergence", unit="pair",
                                   disable=not progress) as bar:
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                differences.extend(_pair_differences(model, batch, pad_id, device))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return divergence_statistics(differences, r_star=r_star, eps=eps)
