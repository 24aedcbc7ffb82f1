"""Grounded reconstruction: a group's fused tokens should reproduce cell tokens it stands for.

Through a frozen reader alone, a fresh compressor gets almost no signal: the LM only attends to a
token that already looks like a cell token (its row/column part matching the question), so neither
mode learns which cell to keep in a short run. Stage 1 therefore adds a direct target in the LM's
own token space. A question's group should reproduce the cells the question is about; a group
without a question cannot know what will be asked, so its targets are all nine cells.

The match is one-to-one (a linear assignment, slots not tied to cells in advance): N slots hold
min(N, |cells|) distinct target cells, and slots beyond the targets sit on their nearest target.
So a small budget keeps a few cells exactly rather than a blur of all of them, and because budgets
nest, the first slots learn to hold whole cells at every N.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qfusion.demo.data import require


def reconstruction_loss(tokens: Tensor, cells: Tensor, evidence: Tensor) -> Tensor:
    """Mean squared distance of each fused token to the target cell token assigned to it.

    tokens: (S, N, d) the fused tokens of S groups; cells: (S, 9, d) the LM's tokens of each group's
    grid; evidence: (S, 9) bool, each group's target cells (groups with none are skipped).
    Squared distances are taken relative to the mean squared norm of the cell tokens, so the loss
    does not depend on their scale.
    """
    keep = evidence.any(-1)
    if not keep.any():
        return tokens.sum() * 0.0
    tokens, cells, evidence = tokens[keep], cells[keep], evidence[keep]
    cost = torch.cdist(tokens, cells).pow(2) / cells.pow(2).sum(-1).mean()  # (S, N, 9)
    cost = cost.masked_fill(~evidence[:, None, :], float("inf"))
    target = cost.argmin(-1)  # (S, N): nearest target cell, kept for slots the assignment leaves over
    linear_sum_assignment = require("scipy.optimize").linear_sum_assignment
    numpy_cost = cost.detach().numpy()
    for s in range(cost.shape[0]):
        targets = np.flatnonzero(evidence[s].numpy())
        slots, chosen = linear_sum_assignment(numpy_cost[s][:, targets])
        target[s, torch.from_numpy(slots)] = torch.from_numpy(targets[chosen])
    return cost.gather(-1, target[..., None]).mean()
