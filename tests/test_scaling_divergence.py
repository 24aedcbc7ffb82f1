"""qfusion.scaling.divergence: the statistics on difference arrays, a real causal LM, and `qfusion divergence`."""

import json
import math

import numpy as np
import pytest
import torch

from qfusion.cli import main
from qfusion.scaling import DivergenceResult, branch_divergence, divergence_statistics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def brute_force_rho(differences, n):
    """ρ(N) by explicit loops over the pairs with ≥ N steps and their nonzero steps i ≠ j ≤ N."""
    cosines = []
    for d in differences:
        if len(d) < n:
            continue
        steps = [v for v in d[:n] if np.linalg.norm(v) > 0]
        for i, u in enumerate(steps):
            for j, v in enumerate(steps):
                if i != j:
                    cosines.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.mean(cosines)) if cosines else 0.0


def test_divergence_statistics_hand_computed():
    # D = 2, w = (1/√2, 1/√2). Pair A: wᵀd = √2, √2. Pair B: wᵀd = √2, √2, −1/√2.
    pair_a = np.array([[2.0, 0.0], [0.0, 2.0]])
    pair_b = np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    result = divergence_statistics([pair_a, pair_b])
    assert result.n.tolist() == [1, 2, 3]
    assert result.pairs_at_n.tolist() == [2, 2, 1]
    # E(1) = (2 + 2)/2; E(2) = ((2√2)² + (2√2)²)/2; E(3) = (2√2 − 1/√2)² = 4.5, pair B alone.
    np.testing.assert_allclose(result.energy, [2.0, 8.0, 4.5], rtol=1e-12)
    assert result.sigma == pytest.approx(math.sqrt(2.0), rel=1e-12)
    assert result.energy[0] == pytest.approx(result.sigma**2, rel=1e-12)
    # ρ(2) pools cos = 0 (A, twice) and cos = 1 (B, twice); ρ(3): B's cosines 1, −1/√2, −1/√2.
    np.testing.assert_allclose(result.rho, [0.0, 0.5, (1 - math.sqrt(2)) / 3], atol=1e-12)
    expected_bound = [math.sqrt(2), math.sqrt(2) * math.sqrt(3), math.sqrt(2) * math.sqrt(5 - 2 * math.sqrt(2))]
    np.testing.assert_allclose(result.bound, expected_bound, rtol=1e-12)
    assert result.threshold_ratio is None  # r(2) = 1/(1·0.5) = 2, and ρ(3) < 0
    assert result.threshold_plateau is None  # |ρ(3) − ρ(2)| ≈ 0.64
    assert result.num_pairs == 2
    assert isinstance(result, DivergenceResult)
    assert json.loads(json.dumps(result.to_dict()))["energy"] == pytest.approx([2.0, 8.0, 4.5])


def test_zero_steps_are_skipped_in_the_cosines():
    shared_first_token = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    result = divergence_statistics([shared_first_token])
    # Counting the zero step as cos = 0 would give ρ(3) = (2/√2)/6 instead.
    np.testing.assert_allclose(result.rho, [0.0, 0.0, 1 / math.sqrt(2)], atol=1e-12)
    assert result.sigma == 0.0 and result.energy[0] == 0.0
    assert result.threshold_plateau is None  # ρ(2) has no two nonzero steps: not a plateau
    np.testing.assert_allclose(result.energy, [0.0, 0.5, 4.5], rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_rho_is_a_mean_cosine_within_minus_one_one(seed):
    rng = np.random.default_rng(seed)
    differences = [rng.normal(size=(int(rng.integers(1, 9)), 6)) for _ in range(5)]
    differences[0][:2] = 0.0  # a pair whose answers share two tokens
    differences[1] = np.outer((-1.0) ** np.arange(1, 8), rng.normal(size=6))  # alternating: cos = ±1
    result = divergence_statistics(differences)
    assert np.all(result.rho >= -1.0) and np.all(result.rho <= 1.0)
    expected = [brute_force_rho(differences, n) for n in result.n]
    np.testing.assert_allclose(result.rho, expected, atol=1e-12)
    assert result.energy[0] == pytest.approx(result.sigma**2, rel=1e-12)
    assert len(result.n) == max(len(d) for d in differences)


def constant_rho_steps(rho, steps):
    """d_t = a·e_0 + b·e_t with a² = ρ, b² = 1 − ρ: unit vectors with cos(d_i, d_j) = ρ for all i ≠ j."""
    d = np.zeros((steps, steps + 1))
    d[:, 0] = math.sqrt(rho)
    d[np.arange(steps), np.arange(1, steps + 1)] = math.sqrt(1 - rho)
    return d


@pytest.mark.parametrize("rho, r_star, expected", [
    (0.3, 1.0, 5),  # N − 1 > 1/0.3 = 3.33 → N = 5
    (0.5, 0.7, 4),  # N − 1 > 1/0.35 = 2.86 → N = 4
    (0.15, 0.5, 15),  # N − 1 > 1/0.075 = 13.33 → N = 15
])
def test_ratio_threshold_for_a_constant_rho(rho, r_star, expected):
    result = divergence_statistics([constant_rho_steps(rho, 30)], r_star=r_star)
    np.testing.assert_allclose(result.rho[1:], rho, rtol=1e-12)
    assert result.threshold_ratio == expected
    assert result.threshold_plateau == 2  # ρ is flat from N = 2 on


def test_thresholds_are_none_where_rho_is_not_positive():
    # d_t = (−1)^t·e: cos(d_i, d_j) = (−1)^(i+j), so ρ = 0 (N = 1), −1, −1/3, −1/3, −1/5.
    alternating = np.outer((-1.0) ** np.arange(1, 6), [1.0, 0.0])
    result = divergence_statistics([alternating])
    np.testing.assert_allclose(result.rho, [0.0, -1.0, -1 / 3, -1 / 3, -0.2], atol=1e-12)
    np.testing.assert_allclose(result.energy, [0.5, 0.0, 0.5, 0.0, 0.5], atol=1e-12)  # wᵀd_t = ∓1/√2
    np.testing.assert_allclose(result.bound[:2], [math.sqrt(0.5), 0.0], atol=1e-12)
    assert result.threshold_ratio is None
    assert result.threshold_plateau == 3
    orthogonal = divergence_statistics([np.eye(4)])
    np.testing.assert_allclose(orthogonal.rho, 0.0, atol=1e-12)
    assert orthogonal.threshold_ratio is None
    assert divergence_statistics([alternating[:3]]).threshold_plateau is None


def test_divergence_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="differences: expected at least one"):
        divergence_statistics([])
    with pytest.raises(ValueError, match="differences: expected .* with one D"):
        divergence_statistics([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match="differences: every array has 0 steps"):
        divergence_statistics([np.ones((0, 3))])
    with pytest.raises(ValueError, match="r_star: expected a finite number > 0, got 0"):
        divergence_statistics([np.ones((2, 3))], r_star=0)
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got -1.0"):
        divergence_statistics([np.ones((2, 3))], eps=-1.0)
    # NaN would silently never meet the plateau test, and infinity always meet the ratio test.
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got nan"):
        divergence_statistics([np.ones((2, 3))], eps=float("nan"))
    with pytest.raises(ValueError, match="r_star: expected a finite number > 0, got inf"):
        divergence_statistics([np.ones((2, 3))], r_star=float("inf"))
    with pytest.raises(TypeError, match="r_star: expected a number, got '1'"):
        divergence_statistics([np.ones((2, 3))], r_star="1")
    with pytest.raises(TypeError, match="differences: expected a sequence of .* arrays, one per pair, got ndarray"):
        divergence_statistics(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"differences\[1\]: expected a \(T, D\) array of numbers, got dtype <U1"):
        divergence_statistics([np.ones((2, 3)), [["a", "b", "c"]]])


# ---------------------------------------------------------------- divergence of a real causal LM

WORDS = ("what is the color of sky sea grass today it was blue green red deep dark light and very "
         "bright cold warm morning night").split()
PAIRS = [
    ("what is the color of the sky", "the sky is blue and bright today", "the sky is dark red"),
    ("what is the color of the sea", "deep blue", "green and cold at night"),
    ("what is the color of grass", "it is green", "it was red and very dark"),
]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A random 2-layer Llama and a word-level tokenizer without a pad token, saved to one directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny_lm")
    vocab = {token: i for i, token in enumerate(["[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(directory)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert tokenizer.pad_token_id is None  # exercises the eos fallback for padding
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tokenizer


def prefix_state(model, ids):
    """f(x): the last-layer hidden state at the last token of ids, run alone (no batch, no padding)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].double().numpy()


def test_branch_divergence_matches_prefixes_run_one_by_one(tiny_lm):
    model, tokenizer = tiny_lm
    differences = []
    for prompt, chosen, rejected in PAIRS:
        p = tokenizer(prompt)["input_ids"]
        x = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        y = tokenizer(rejected, add_special_tokens=False)["input_ids"]
        d = np.stack([prefix_state(model, p + x[:t]) - prefix_state(model, p + y[:t])
                      for t in range(1, min(len(x), len(y)) + 1)])
        differences.append(d)
    # Pair 0 shares "the sky is": its first three steps are the same prefix on both sides.
    np.testing.assert_allclose(differences[0][:3], 0.0, atol=1e-5)
    assert np.linalg.norm(differences[0][3]) > 1e-3
    expected = divergence_statistics(differences)

    result = branch_divergence(model, tokenizer, PAIRS, batch_size=2, progress=False)
    assert result.n.tolist() == [1, 2, 3, 4, 5]
    assert result.pairs_at_n.tolist() == [3, 3, 2, 1, 1]  # T = 5, 2, 3 answer steps
    assert result.energy.shape == result.rho.shape == result.bound.shape == (5,)
    np.testing.assert_allclose(result.energy, expected.energy, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(result.rho, expected.rho, atol=1e-4)
    assert np.all(np.abs(result.rho) <= 1.0)
    assert result.energy[0] == pytest.approx(result.sigma**2, rel=1e-12)
    assert result.bound[0] == pytest.approx(result.sigma, rel=1e-12)
    assert result.num_pairs == 3


def test_branch_divergence_does_not_depend_on_batching_and_caps_steps(tiny_lm):
    model, tokenizer = tiny_lm
    one_by_one = branch_divergence(model, tokenizer, PAIRS, batch_size=1, progress=False)
    together = branch_divergence(model, tokenizer, PAIRS, batch_size=3, progress=False)
    np.testing.assert_allclose(one_by_one.energy, together.energy, rtol=1e-5)
    np.testing.assert_allclose(one_by_one.rho, together.rho, atol=1e-6)
    capped = branch_divergence(model, tokenizer, PAIRS, max_len=2, progress=False)
    assert capped.n.tolist() == [1, 2]
    np.testing.assert_allclose(capped.energy, together.energy[:2], rtol=1e-5)
    model.train()
    branch_divergence(model, tokenizer, PAIRS[:1], progress=False)
    assert model.training  # the caller's mode is restored
    model.eval()


def test_branch_divergence_rejects_bad_pairs(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="pairs: expected a non-empty sequence"):
        branch_divergence(model, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match=r"pairs\[1\]: expected a \(prompt, chosen, rejected\) triple"):
        branch_divergence(model, tokenizer, [PAIRS[0], ("prompt", "only one answer")], progress=False)
    with pytest.raises(ValueError, match="pairs: every pair has an empty chosen or rejected answer"):
        branch_divergence(model, tokenizer, [("what is it", "", "blue")], progress=False)
    with pytest.raises(ValueError, match="max_len: expected >= 1, got 0"):
        branch_divergence(model, tokenizer, PAIRS, max_len=0, progress=False)
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        branch_divergence(model, tokenizer, PAIRS, batch_size=0, progress=False)
    with pytest.raises(TypeError, match=r"max_len: expected an integer >= 1, got 8.5"):
        branch_divergence(model, tokenizer, PAIRS, max_len=8.5, progress=False)
    # The thresholds are checked before anything runs: here neither model nor tokenizer is usable.
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got 0"):
        branch_divergence(None, None, PAIRS, eps=0, progress=False)


def test_cli_divergence_prints_statistics_and_writes_plot_and_json(tiny_lm_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), p))) for p in PAIRS) + "\n\n")
    code = main(["divergence", "--model", str(tiny_lm_dir), "--pairs", str(pairs), "--max-len", "8",
                 "--batch-size", "2", "--no-progress", "--plot", str(tmp_path / "div.png"),
                 "--json", str(tmp_path / "div.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("pairs: 3  sigma: ")
    rows = {int(line.split()[0]): line.split() for line in out.splitlines() if line.split()[0].isdigit()}
    assert sorted(rows) == [1, 2, 4, 5]  # powers of two, then the last N
    assert rows[1][1] == "3" and rows[4][1] == "1"
    assert float(rows[1][4]) == pytest.approx(float(rows[1][3]), rel=1e-3)  # bound(1) = σ = √E(1)
    assert "threshold 1, smallest N with r(N) < 1:" in out
    assert "threshold 2, smallest N with |rho(N+1) - rho(N)| < 0.001:" in out
    saved = json.loads((tmp_path / "div.json").read_text())
    assert saved["num_pairs"] == 3 and len(saved["rho"]) == 5
    assert all(-1.0 <= r <= 1.0 for r in saved["rho"])
    assert saved["energy"][0] == pytest.approx(saved["sigma"] ** 2, rel=1e-12)
    assert (tmp_path / "div.png").read_bytes().startswith(PNG_SIGNATURE)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "what", "chosen": "blue"}\n')
    assert main(["divergence", "--model", str(tiny_lm_dir), "--pairs", str(bad)]) == 1
    assert "--pairs: line 1 of" in capsys.readouterr().err
