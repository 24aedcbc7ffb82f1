"""Training-free compressors: the cell tokens average-pooled to N, or N of them kept at random.

Benchmarks of vision-token compression find that these two plain baselines beat many trained
methods, so the demo runs them through the same frozen reader as the trained compressors. Neither
sees the question: one set of N tokens serves every question about a grid. A pooling cannot make
more tokens than it is given, and nine cells hold no tenth, so at N >= 9 both keep the nine cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from qfusion.demo.data import CELLS, GRID


def pool_shape(budget: int) -> tuple[int, int]:
    """The (rows, columns) grid of pooled tokens for a budget of N < 9: N = rows · columns, as square as it
    can be (N = 1, 2, 3, 4, 6 → 1×1, 1×2, 1×3, 2×2, 2×3)."""
    if not isinstance(budget, int) or not 1 <= budget < CELLS:
        raise ValueError(f"budget: expected an integer 1 <= N < {CELLS} (at N >= {CELLS} nothing is pooled), "
                         f"got {budget!r}")
    rows = max(d for d in range(1, math.isqrt(budget) + 1) if budget % d == 0)
    return rows, budget // rows


def pool_cells(cells: Tensor, budget: int) -> Tensor:
    """The grids' cell tokens average-pooled to N tokens (a fixed spatial pooling, as a VLM pools its patch grid).

    cells: (B, 9, d) row-major → (B, min(N, 9), d). The 3×3 grid is pooled adaptively to the
    :func:`pool_shape` grid (N = 3 averages each column; N = 4 the four overlapping 2×2 blocks);
    at N >= 9 the cells are returned as they are.
    """
    if budget >= CELLS:
        return cells
    grid = rearrange(cells, "b (r c) d -> b d r c", r=GRID)
    pooled = F.adaptive_avg_pool2d(grid, pool_shape(budget))
    return rearrange(pooled, "b d r c -> b (r c) d")


def random_cells(cells: Tensor, budget: int, generator: torch.Generator) -> Tensor:
    """N distinct cell tokens of each grid, drawn uniformly at random (in random order).

    cells: (B, 9, d) → (B, min(N, 9), d); each grid gets its own draw from ``generator``.
    """
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: expected an integer N >= 1, got {budget!r}")
    keep = torch.rand(cells.shape[:2], generator=generator).argsort(-1)[:, :min(budget, CELLS)]  # (B, N)
    return cells.gather(1, keep[..., None].expand(-1, -1, cells.shape[-1]))
