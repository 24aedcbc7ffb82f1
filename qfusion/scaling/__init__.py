"""The scaling analysis (SPEC.md §7): power laws in the number of tokens, budgets chosen from them, and
branch divergence of a causal LM.

One module per analysis:

* :mod:`~qfusion.scaling.power_law`: :func:`fit_power_law` fits P(N) = (N_c / N)^α to (number of
  tokens, score) points, in log space, giving a :class:`PowerLawFit`; :func:`save_fits` /
  :func:`load_fits` keep fits as JSON and :func:`load_points_csv` reads points from a CSV file. A fit
  with R² below :data:`POOR_FIT_R2` is poor (``fit.poor``): a :class:`PoorFitWarning` when it is made
  or a budget is chosen from it, and a flag wherever it is shown (``str(fit)``, the CLI tables, the
  plots' legends).
* :mod:`~qfusion.scaling.budget_selection`: :func:`smallest_budget` turns a fit into the smallest N
  that meets a target (a :class:`BudgetChoice`).
* :mod:`~qfusion.scaling.divergence`: :func:`branch_divergence` measures how the last hidden states
  of a causal LM drift apart along two answers to one prompt (chosen / rejected pairs);
  :func:`divergence_statistics` is its arithmetic on per-pair difference arrays.
* :mod:`~qfusion.scaling.plots`: :func:`plot_scaling` and :func:`plot_divergence` draw them.
"""

from qfusion.scaling.budget_selection import BudgetChoice, smallest_budget
from qfusion.scaling.divergence import DivergenceResult, branch_divergence, divergence_statistics
from qfusion.scaling.plots import plot_divergence, plot_scaling
from qfusion.scaling.power_law import (
    NO_POWER_LAW,
    POOR_FIT_R2,
    PoorFitWarning,
    PowerLawFit,
    fit_power_law,
    load_fits,
    load_points_csv,
    save_fits,
)

__all__ = [
    "NO_POWER_LAW",
    "POOR_FIT_R2",
    "BudgetChoice",
    "DivergenceResult",
    "PoorFitWarning",
    "PowerLawFit",
    "branch_divergence",
    "divergence_statistics",
    "fit_power_law",
    "load_fits",
    "load_points_csv",
    "plot_divergence",
    "plot_scaling",
    "save_fits",
    "smallest_budget",
]
