"""The demo's task: 3×3 grids of real handwritten digits and word-level questions about them.

Digits come from scikit-learn's ``load_digits`` (1,797 8×8 images). They are split once, by a fixed
seed, into a training pool (1,197) and a test pool (600): training grids are drawn from the first,
test grids from the second, so test handwriting is never seen in training.

Three question types, each answered by one word:

* ``cell``: "what digit is in row 2, column 3?" → "7" (chance 10 %);
* ``count``: "how many 7s are there?" → "0" .. "9";
* ``exists``: "is there a 4?" → "yes" / "no".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GRID = 3
CELLS = GRID * GRID
TRAIN_POOL = 1197
SPLIT_SEED = 0
QUESTION_TYPES = ("cell", "count", "exists")
TYPE_PROBS = (0.5, 0.25, 0.25)

PAD, EOS = "<pad>", "<eos>"
DIGITS = tuple(str(d) for d in range(10))
PLURALS = tuple(f"{d}s" for d in DIGITS)
# One word per cell: "row 2, column 3" is a single token (the LM embeds it with the cells' own
# row and column tables).
PLACES = tuple(f"row {r + 1}, column {c + 1}" for r in range(GRID) for c in range(GRID))
WORDS = (PAD, EOS, "what", "digit", "is", "in", "how", "many", "there", "a", *DIGITS, *PLURALS,
         "yes", "no", *PLACES)
VOCAB = {word: i for i, word in enumerate(WORDS)}
PLACE_IDS = tuple(VOCAB[w] for w in PLACES)
ANSWER_WORDS = (*DIGITS, "yes", "no")
QUESTION_LEN = 5  # the longest question, in words


def require(module: str):
    """Import one of the demo's optional dependencies, or say how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the qfusion demo needs {module!r}, which is not installed: pip install 'qfusion[demo]'"
        ) from error


def load_pools() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split into disjoint pools: (train_images (1197, 64), train_labels, test_images (600, 64), test_labels).

    Pixels are scaled to [0, 1]. The split is fixed (it does not depend on the training seed).
    """
    datasets = require("sklearn.datasets")
    digits = datasets.load_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(digits.target))
    images = (digits.data / 16.0).astype(np.float32)[order]
    labels = digits.target.astype(np.int64)[order]
    return images[:TRAIN_POOL], labels[:TRAIN_POOL], images[TRAIN_POOL:], labels[TRAIN_POOL:]


def question_words(kind: str, digits: np.ndarray, cell: int,
                   rng: np.random.Generator) -> tuple[list[str], str, np.ndarray]:
    """One question of a type about a grid with cell labels digits: (9,).

    cell: the cell a ``cell`` question asks about (row-major); the other types draw their digit from rng.
    Returns (words, answer, evidence): evidence (9,) bool marks the cells the question is about
    (the asked cell; the cells holding the asked digit, none if it is absent).
    """
    if kind == "cell":
        return ["what", "digit", "is", "in", PLACES[cell]], DIGITS[digits[cell]], np.arange(CELLS) == cell
    # Half the time a digit of the grid, else one absent from it: "yes" and "no" come equally often.
    absent = np.setdiff1d(np.arange(10), digits)
    pool = digits if rng.random() < 0.5 or len(absent) == 0 else absent
    digit = int(pool[rng.integers(len(pool))])
    evidence = digits == digit
    if kind == "count":
        return ["how", "many", PLURALS[digit]], DIGITS[evidence.sum()], evidence
    return ["is", "there", "a", DIGITS[digit]], "yes" if evidence.any() else "no", evidence


@dataclass
class GridBatch:
    """B grids with G questions each.

    cells: (B, 9) indices into the pool's images, row-major.
    questions: (B, G, QUESTION_LEN) word ids, right-padded with <pad>; lengths: (B, G) their lengths.
    answers: (B, G) the answer's word id; kinds: (B, G) index into QUESTION_TYPES.
    evidence: (B, G, 9) bool, the cells each question is about.
    """

    cells: Tensor
    questions: Tensor
    lengths: Tensor
    answers: Tensor
    kinds: Tensor
    evidence: Tensor

    def __len__(self) -> int:
        return self.cells.shape[0]

    def slice(self, start: int, stop: int) -> "GridBatch":
        """Grids start..stop-1 of this batch."""
        return GridBatch(self.cells[start:stop], self.questions[start:stop], self.lengths[start:stop],
                         self.answers[start:stop], self.kinds[start:stop], self.evidence[start:stop])

    def question_list(self) -> list[list[Tensor]]:
        """The questions as B lists of G 1-D id tensors (the input QuestionFusion takes)."""
        return [[q[:n] for q, n in zip(qs, ns)] for qs, ns in zip(self.questions, self.lengths.tolist())]


def sample_grids(labels: np.ndarray, num_grids: int, questions_per_grid: int,
                 rng: np.random.Generator) -> GridBatch:
    """num_grids random grids over a pool with labels (P,), each with questions_per_grid questions.

    Cell questions of one grid ask about distinct cells when there are few enough of them.
    """
    cells = rng.integers(len(labels), size=(num_grids, CELLS))
    questions = np.full((num_grids, questions_per_grid, QUESTION_LEN), VOCAB[PAD], dtype=np.int64)
    lengths = np.zeros((num_grids, questions_per_grid), dtype=np.int64)
    answers = np.zeros((num_grids, questions_per_grid), dtype=np.int64)
    kinds = rng.choice(len(QUESTION_TYPES), size=(num_grids, questions_per_grid), p=TYPE_PROBS)
    evidence = np.zeros((num_grids, questions_per_grid, CELLS), dtype=bool)
    for b in range(num_grids):
        digits = labels[cells[b]]
        asked = rng.permutation(CELLS)
        for g in range(questions_per_grid):
            words, answer, evidence[b, g] = question_words(QUESTION_TYPES[kinds[b, g]], digits,
                                                            int(asked[g % CELLS]), rng)
            questions[b, g, :len(words)] = [VOCAB[w] for w in words]
            lengths[b, g] = len(words)
            answers[b, g] = VOCAB[answer]
    return GridBatch(torch.from_numpy(cells), torch.from_numpy(questions), torch.from_numpy(lengths),
                     torch.from_numpy(answers), torch.from_numpy(kinds), torch.from_numpy(evidence))
