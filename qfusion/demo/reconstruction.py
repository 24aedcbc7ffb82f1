"""Grounded reconstruction: a group's fused tokens should reproduce the cell tokens it stands for.

Through a frozen reader alone, a fresh compressor gets almost no signal: the LM only attends to a
token that already looks like a cell token (its row/column part matching the question), so neither
mode learns which cell to keep in a short run. Stage 1 therefore adds a direct target in the LM's
own token space. A question's group should reproduce the cells the question is about (the asked
cell; the cells holding the asked digit); a group without a question cannot know what will be
asked, so its target is the whole grid. Matching is a set match (Chamfer): slots are not tied to
cells in advance.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_loss(tokens: Tensor, cells: Tensor, evidence: Tensor) -> Tensor:
    """Chamfer distance between each group's fused tokens and the cell tokens it should stand for.

    tokens: (S, N, d) the fused tokens of S groups; cells: (S, 9, d) the LM's tokens of each group's
    grid; evidence: (S, 9) bool, the cells each group should reproduce (groups with none are skipped).
    Both directions count: every evidence cell near some fused token (nothing lost) and every fused
    token near some evidence cell (nothing invented). Squared distances are taken relative to the
    mean squared norm of the cell tokens, so the loss does not depend on their scale.
    """
    keep = evidence.any(-1)
    if not keep.any():
        return tokens.sum() * 0.0
    tokens, cells, evidence = tokens[keep], cells[keep], evidence[keep]
    distance = torch.cdist(cells, tokens).pow(2) / cells.pow(2).sum(-1).mean()  # (S, 9, N)
    covered = (distance.min(-1).values * evidence).sum(-1) / evidence.sum(-1)  # (S,)
    grounded = distance.masked_fill(~evidence[..., None], float("inf")).min(-2).values.mean(-1)  # (S,)
    return 0.5 * (covered + grounded).mean()
