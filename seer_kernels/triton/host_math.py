"""Integer helpers for the launchers' host code.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: called from Python they go
through a wrapper that unwraps every argument, about 3 us per call on the 2-core development CPU. A
launcher calls them several times per launch, on the host-bound path of small eager calls; these plain
versions cost well under a microsecond.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
