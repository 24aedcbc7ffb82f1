"""The fused block-sparse attention kernel in Triton, split by job.

* :mod:`~qfusion.ops.triton.kernels`: the jit kernels (forward, dK/dV, dQ) and the in-kernel rule;
* :mod:`~qfusion.ops.triton.plan`: the host-side tile plan (which tile pairs to run, masked or not);
* :mod:`~qfusion.ops.triton.configs`: tile sizes, warps and stages per GPU generation, and the autotuner;
* :mod:`~qfusion.ops.triton.op`: the ``torch.library`` custom ops, their autograd and the entry
  :func:`triton_fusion_attention`.

Importing this package imports triton (an optional dependency); ``fusion_attention`` imports it only
when the kernel is chosen.
"""

from qfusion.ops.triton.configs import KernelConfig, PassConfig, autotune, default_config, tuned_configs
from qfusion.ops.triton.op import triton_fusion_attention
from qfusion.ops.triton.plan import TileStats, tile_stats

__all__ = ["KernelConfig", "PassConfig", "TileStats", "autotune", "default_config", "tile_stats",
           "triton_fusion_attention", "tuned_configs"]
