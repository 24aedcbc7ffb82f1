"""The demo's task: 3×3 grids of real handwritten digits and questions about one cell or a region.

Digits come from scikit-learn's ``load_digits`` (1,797 8×8 images). They are split once, by a fixed
seed, into a training pool (1,197) and a test pool (600): training grids are drawn from the first,
test grids from the second, so test handwriting is never seen in training.

Three question types; every question is five words and its answer is the digits of the cells it
names, in reading order, followed by <eos>:

* ``cell``: "what digit is in row 2, column 3" → "7" (one digit);
* ``line``: "what digits are in row 2" (or "column 3") → "7 1 4" (three digits);
* ``block``: "what digits are in top-left block" → "7 1 0 2" (the four digits of a 2×2 block).

A cell question needs one token's worth of the image, a block question four: only the region types
can show accuracy rising with the number of fused tokens N.
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
QUESTION_TYPES = ("cell", "line", "block")
TYPE_PROBS = (1 / 3, 1 / 3, 1 / 3)
QUESTION_LEN = 5  # every question, in words
ANSWER_LEN = 4  # the longest answer, in digits (a block)

PAD, EOS = "<pad>", "<eos>"
DIGITS = tuple(str(d) for d in range(10))
# One word per place: "row 2, column 3" is a single token, and so are "row 2", "column 3" and
# "top-left block" (the reader embeds cells, rows and columns with its cells' own position tables).
PLACES = tuple(f"row {r + 1}, column {c + 1}" for r in range(GRID) for c in range(GRID))
ROWS = tuple(f"row {r + 1}" for r in range(GRID))
COLUMNS = tuple(f"column {c + 1}" for c in range(GRID))
BLOCKS = ("top-left block", "top-right block", "bottom-left block", "bottom-right block")
WORDS = (PAD, EOS, "what", "digit", "digits", "is", "are", "in", *DIGITS, *PLACES, *ROWS, *COLUMNS, *BLOCKS)
VOCAB = {word: i for i, word in enumerate(WORDS)}
DIGIT_IDS = tuple(VOCAB[d] for d in DIGITS)

_BLOCK_CELLS = tuple(tuple(GRID * (r + i) + c + j for i in (0, 1) for j in (0, 1)) for r in (0, 1) for c in (0, 1))
# Every region a question can name, as (type, place word, its cells in reading order).
REGIONS = (
    *(("cell", PLACES[i], (i,)) for i in range(CELLS)),
    *(("line", ROWS[r], tuple(range(GRID * r, GRID * r + GRID))) for r in range(GRID)),
    *(("line", COLUMNS[c], tuple(range(c, CELLS, GRID))) for c in range(GRID)),
    *(("block", BLOCKS[b], _BLOCK_CELLS[b]) for b in range(len(BLOCKS))),
)


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


def question_words(region: int) -> list[str]:
    """The five words of the question about REGIONS[region]."""
    kind, place, _ = REGIONS[region]
    return ["what", "digit", "is", "in", place] if kind == "cell" else ["what", "digits", "are", "in", place]


@dataclass
class GridBatch:
    """B grids with G questions each.

    cells: (B, 9) indices into the pool's images, row-major; labels: (B, 9) their digits.
    questions: (B, G, QUESTION_LEN) word ids. kinds: (B, G) index into QUESTION_TYPES.
    answer_cells: (B, G, ANSWER_LEN) the cells each answer reads, in order, -1 past its length.
    answers: (B, G, ANSWER_LEN) the answer digits' word ids, <pad> past the answer's length.
    """

    cells: Tensor
    labels: Tensor
    questions: Tensor
    kinds: Tensor
    answer_cells: Tensor
    answers: Tensor

    def __len__(self) -> int:
        return self.cells.shape[0]

    @property
    def evidence(self) -> Tensor:
        """(B, G, 9) bool: the cells each question is about."""
        hits = self.answer_cells[..., None] == torch.arange(CELLS)  # (B, G, ANSWER_LEN, 9)
        return hits.any(-2)

    @property
    def answer_mask(self) -> Tensor:
        """(B, G, ANSWER_LEN) bool: which answer positions hold a digit."""
        return self.answer_cells >= 0

    def slice(self, start: int, stop: int) -> "GridBatch":
        """Grids start..stop-1 of this batch."""
        return GridBatch(self.cells[start:stop], self.labels[start:stop], self.questions[start:stop],
                         self.kinds[start:stop], self.answer_cells[start:stop], self.answers[start:stop])

    def question_list(self) -> list[list[Tensor]]:
        """The questions as B lists of G 1-D id tensors (the input QuestionFusion takes)."""
        return [list(qs) for qs in self.questions]


def sample_grids(labels: np.ndarray, num_grids: int, questions_per_grid: int,
                 rng: np.random.Generator) -> GridBatch:
    """num_grids random grids over a pool with labels (P,), each with questions_per_grid questions.

    A question's type is drawn with TYPE_PROBS, then its region uniformly among that type's.
    """
    by_type = [[i for i, (kind, _, _) in enumerate(REGIONS) if kind == t] for t in QUESTION_TYPES]
    cells = rng.integers(len(labels), size=(num_grids, CELLS))
    digits = labels[cells]  # (B, 9)
    kinds = rng.choice(len(QUESTION_TYPES), size=(num_grids, questions_per_grid), p=TYPE_PROBS)
    questions = np.zeros((num_grids, questions_per_grid, QUESTION_LEN), dtype=np.int64)
    answer_cells = np.full((num_grids, questions_per_grid, ANSWER_LEN), -1, dtype=np.int64)
    for b in range(num_grids):
        for g in range(questions_per_grid):
            choices = by_type[kinds[b, g]]
            region = choices[rng.integers(len(choices))]
            questions[b, g] = [VOCAB[w] for w in question_words(region)]
            read = REGIONS[region][2]
            answer_cells[b, g, :len(read)] = read
    answer_digits = np.take_along_axis(digits[:, None, :], np.maximum(answer_cells, 0), axis=-1)
    answers = np.where(answer_cells >= 0, np.asarray(DIGIT_IDS)[answer_digits], VOCAB[PAD])
    return GridBatch(torch.from_numpy(cells), torch.from_numpy(digits), torch.from_numpy(questions),
                     torch.from_numpy(kinds), torch.from_numpy(answer_cells), torch.from_numpy(answers))
