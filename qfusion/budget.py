"""Budget(m, n): the token budget of a call, and the one owner of its rules.

A sample's first question gets m fused tokens (slots), every later question n ≤ m. The rules that
follow from that — which values are valid, the default n when only m is given, the slots of group
g, how many placeholders a prompt needs before each question — live here and nowhere else.

A ``Budget`` is validated once, where it enters (a patched host call, ``QuestionFusion.forward``,
``QFusionProcessor``, the training config, the vLLM processor), and trusted inside. It is a
tuple, so ``m, n = budget`` and ``budget == (4, 2)`` work, and everywhere a budget is accepted a
plain ``(m, n)`` pair is accepted too.

>>> budget = Budget(8, 2)
>>> budget.slots(0), budget.slots(3)
(8, 2)
>>> Budget.resolve(m=4, default=Budget(64, 16))
Budget(m=4, n=4)
>>> budget.placeholders(3)
[8, 2, 2]
>>> budget.placeholder_blocks([[0], [0, 1], [0, 1]])
[[8], [2, 8], [2, 2]]
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class _Pair(NamedTuple):
    m: int
    n: int


class Budget(_Pair):
    """(m, n): m slots for a sample's first question, n for every later one; 1 <= n <= m.

    Build it with ``Budget(m, n)`` (checked), or let :meth:`of` / :meth:`resolve` turn what a caller
    gave into one with an error naming the caller's argument.
    """

    __slots__ = ()

    def __new__(cls, m: int, n: int) -> "Budget":
        for name, value in (("m", m), ("n", n)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
        if n < 1 or m < n:
            raise ValueError(f"m, n: expected 1 <= n <= m, got m={m}, n={n}")
        return super().__new__(cls, m, n)

    @classmethod
    def of(cls, value, *, name: str = "qfusion_budget", codebook_size: int | None = None) -> "Budget":
        """A budget from a Budget or an (m, n) pair; errors name ``name``.

        codebook_size: the largest m the fusion offers (its ``codebook_size``), checked when given.
        """
        if not isinstance(value, Budget):
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"{name}: expected a qfusion.Budget or (m, n), two integers, got {value!r}")
            try:
                value = cls(*value)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{name}: {error}") from None
        if codebook_size is not None and value.m > codebook_size:
            raise ValueError(f"{name}: expected m <= codebook_size={codebook_size}, got m={value.m}")
        return value

    @classmethod
    def resolve(cls, m: int | None = None, n: int | None = None, *, default: "Budget",
                codebook_size: int | None = None, name: str = "m, n") -> "Budget":
        """The budget of a call given as separate ``m`` / ``n`` (either may be None) over a default.

        A missing m is the default's; a missing n is the default's n, but never more than m (so
        ``m=4`` alone over a default of (64, 16) gives (4, 4)).
        """
        m = default.m if m is None else m
        if n is None:
            n = min(default.n, m) if isinstance(m, int) and not isinstance(m, bool) else default.n
        return cls.of((m, n), name=name, codebook_size=codebook_size)

    def slots(self, group: int) -> int:
        """Slots of question group ``group`` of a sample: m for group 0, n after."""
        return self.m if group == 0 else self.n

    def placeholder_blocks(self, about: Sequence[Sequence[int]], prefix: int = 0) -> list[list[int]]:
        """Per question of a sample, the placeholders of each visual input it is about, in order:
        ``prefix + m`` where the question is that input's first, n after.

        about: per question, the indices of the visual inputs it is about
            (:func:`qfusion.inputs.question_images`). prefix: host tokens before the first question's
            fused tokens (BLIP's Q-Former outputs in ``augment`` mode).
        """
        seen: set[int] = set()
        blocks = []
        for images in about:
            blocks.append([self.n if image in seen else prefix + self.m for image in images])
            seen.update(images)
        return blocks

    def placeholders(self, num_questions: int, prefix: int = 0) -> list[int]:
        """The placeholders before each question of a sample about one image: [prefix + m, n, n, ...]."""
        return [prefix + self.m] + [self.n] * (num_questions - 1)
