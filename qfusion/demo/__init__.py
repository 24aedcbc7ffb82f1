"""The CPU demo (``qfusion demo``): question-fused vs question-blind compression on real handwriting.

Images are 3×3 grids of scikit-learn's handwritten digits; a frozen per-cell encoder gives one
vision token per cell; a small LM, trained once on cell tokens and then frozen, answers questions
about one cell, a row or column (three digits) or a 2×2 block (four digits). QuestionFusion
compressors, with and without the question, are trained for that fixed reader and evaluated at
N = 1, 2, 3, 4, 6, 9, 16 tokens, beside two training-free baselines (the cells average-pooled to N,
N random cells) and, for conversations of four questions per grid, per turn with m tokens for the
first question and n for each follow-up.

Modules, in the order the data flows: ``data`` (grids and questions), ``encoder`` (the frozen cell
encoder), ``lm`` (the reader LM), ``answers`` (MiniLM answer embeddings), ``reconstruction`` (the
grounded reconstruction loss), ``train`` (host, then compressor stages), ``baselines`` (pooling and
random cells), ``evaluate`` (what the LM reads, scored), ``turns`` (per-turn results), ``report``,
``recipe`` (budgets) and ``run`` (the entry point). Needs ``pip install 'qfusion[demo]'``.
"""

from qfusion.demo.run import run_demo

__all__ = ["run_demo"]
