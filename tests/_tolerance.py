"""Float tolerances derived from the arithmetic, never tuned until one machine passes.

Two implementations of the same computation (other kernels, thread counts, BLAS blocking, reduction orders, fused
ops) each round differently. For a sum of n terms, recursive summation in any order satisfies
|fl(sum x) - sum x| <= gamma_n * sum |x| with gamma_n = n u / (1 - n u), u the unit roundoff (2^-24 in float32,
2^-53 in float64; Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 4.2). Each implementation
is within that bound of the exact value, so two of them differ by at most twice it. A result that goes through
`depth` such reductions one after the other (the layers of a network, forward and backward, and the SGD steps of a
training run) accumulates at most `depth` times that, to first order.

So a comparison states the longest reduction (`terms`), how many are chained (`depth`) and the magnitude of the
values (`scale`): the tolerance follows. Worst-case bounds are loose (rounding errors mostly cancel): the training
comparisons run in float64, where even the worst case is far below any difference a wrong algorithm makes
(>= 1e-3). They also hold on any CPU, thread count and BLAS, which is the point.
"""

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def tolerance(dtype: torch.dtype, terms: int, depth: int = 1, scale: float = 1.0) -> dict:
    """`rtol` / `atol` for `torch.testing.assert_close` between two implementations of a computation in `dtype` whose
    longest reduction sums `terms` values, chained `depth` times, on values of magnitude up to `scale`."""
    u = unit_roundoff(dtype)
    gamma = terms * u / (1 - terms * u)
    bound = 2 * gamma * depth
    return dict(rtol=bound, atol=bound * scale)


# An eval-mode forward of one of timm's tiny test models at 32 px in float32, computed twice (before and after a save,
# through another loader): BatchNorm uses its running statistics, so the longest sum is a global average pool over
# 32 x 32 (longer than any convolution's fan-in); about 30 layers; activations below 10.
TINY_FORWARD = tolerance(torch.float32, terms=32 * 32, depth=30, scale=10)
# The norm of an L2-normalised float32 embedding of up to 256 dimensions.
UNIT_NORM = tolerance(torch.float32, terms=256)
# One float32 normalisation of an 8-bit pixel, (x / 255 - mean) / std with std >= 0.2.
PIXEL = tolerance(torch.float32, terms=1, depth=3, scale=5)

__all__ = ["PIXEL", "TINY_FORWARD", "UNIT_NORM", "tolerance", "unit_roundoff"]
