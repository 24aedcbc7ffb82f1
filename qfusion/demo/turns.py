"""Per-turn results of conversations: a grid's questions asked one after another, the first with m fused
tokens and each follow-up with n, against asking every question afresh with m and against a
question-blind compressor whose N tokens serve every turn.

A scheme's ``tokens`` is the number of fused tokens a conversation puts before the LM: m + (G − 1)·n
for the m/n layout, G·m afresh, N once for the blind compressor (its tokens are the same for every
turn, so an LM that keeps its context across turns reads them once). The demo's LM answers each
question from that turn's tokens only, so a follow-up's accuracy is what its own n tokens carry.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from qfusion.demo.data import QUESTION_TYPES
from qfusion.demo.evaluate import accuracy_by_type

SCHEMES = {"ask": "question fused, m/n", "afresh": "question fused, afresh", "blind": "no question"}


def scheme_tokens(scheme: str, m: int, n: int, questions: int) -> int:
    """Fused tokens one conversation of `questions` questions puts before the LM under a scheme."""
    if scheme == "ask":
        return m + (questions - 1) * n
    if scheme == "afresh":
        return questions * m
    if scheme == "blind":
        return m
    raise ValueError(f"scheme: expected one of {sorted(SCHEMES)}, got {scheme!r}")


def turn_accuracy(scores: Tensor, kinds: Tensor) -> dict:
    """Accuracy of the first turn and of the follow-ups: {"turn1" | "followups": {"all", type: accuracy}}.

    scores: (B, G) digit accuracy of each conversation's G answers, in turn order; kinds: (B, G) their
    question types. "all" is the mean over the questions of those turns, whatever their type.
    """
    result = {}
    for part, turns in (("turn1", slice(0, 1)), ("followups", slice(1, None))):
        chosen, chosen_kinds = scores[:, turns], kinds[:, turns]
        result[part] = {"all": chosen.mean().item(), **accuracy_by_type(chosen, chosen_kinds)}
    return result


def summarize_turns(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds of each scheme's turn accuracies, in the order the schemes first appear.

    runs: one dict per (seed, scheme, m, n): {"seed", "scheme", "m", "n", "tokens", "turn1", "followups"}
    (accuracies as :func:`turn_accuracy` gives them; for "blind", m = n = N).
    """
    keys = list(dict.fromkeys((r["scheme"], r["m"], r["n"]) for r in runs))
    rows = []
    for scheme, m, n in keys:
        chosen = [r for r in runs if (r["scheme"], r["m"], r["n"]) == (scheme, m, n)]
        row = {"scheme": scheme, "m": m, "n": n, "tokens": chosen[0]["tokens"], "seeds": len(chosen)}
        for part in ("turn1", "followups"):
            row[part] = {key: {"mean": float(np.mean([r[part][key] for r in chosen])),
                               "std": float(np.std([r[part][key] for r in chosen]))}
                         for key in chosen[0][part]}
        rows.append(row)
    return rows


def _label(row: dict) -> str:
    if row["scheme"] == "ask":
        return f"{SCHEMES['ask']} = {row['m']}/{row['n']}"
    if row["scheme"] == "afresh":
        return f"{SCHEMES['afresh']}, m = {row['m']}"
    return f"{SCHEMES['blind']}, N = {row['m']}"


def format_turns(rows: list[dict], questions: int, conversations: int, seeds: int) -> str:
    """The per-turn table: one row per scheme, the fused tokens of a conversation, the first turn's accuracy
    and the follow-ups' (all types, then per type)."""
    stat = lambda s: f"{100 * s['mean']:5.1f} ± {100 * s['std']:3.1f}"  # noqa: E731
    header = (f"{'scheme':<30} | {'tokens':>6} | {'turn 1':>12} | {'turns 2-' + str(questions):>12} | "
              + " | ".join(f"{'follow-up ' + k:>15}" for k in QUESTION_TYPES))
    lines = [f"conversations: {conversations} grids, {questions} questions each, asked in turn (digit accuracy, %, "
             f"mean ± std over {seeds} seed{'s' * (seeds > 1)}); tokens = fused tokens per conversation",
             header, "-" * len(header)]
    for row in rows:
        follow = row["followups"]
        lines.append(f"{_label(row):<30} | {row['tokens']:>6} | {stat(row['turn1']['all']):>12} | "
                     f"{stat(follow['all']):>12} | " + " | ".join(f"{stat(follow[k]):>15}" for k in QUESTION_TYPES))
    lines.append("m/n: the first question with m fused tokens, each follow-up with n, through start/ask; afresh: "
                 "every question as a new first question with m; no question: one set of N tokens for every turn")
    return "\n".join(lines)
