"""Connected components of pairs that arrive in large batches, with numpy operations over whole batches.

``parent`` is an int64 array over the N nodes where ``parent[x] <= x`` always holds: a root is its own parent,
and a tree is only ever hooked under a root of lower index. So the root of every component is its lowest index,
which is the node a deduplication keeps (the first in source order), with nothing more to compute.

:func:`union` merges the components of the pairs (u[k], v[k]) in rounds: find both roots of every pair, drop
the pairs already joined, and set ``parent[hi] = lo`` for each pair's higher and lower root. Where one root is
the higher end of several pairs, one assignment wins (any: each ``lo`` is a root below ``hi``, so every choice
keeps ``parent[x] <= x`` and makes no cycle) and the others are merged in the next round. Every round hooks
every root that is still the higher end of a pair, so a batch of pairs ends in a few rounds (about log of the
largest component), each O(pairs) numpy work: a cluster of 10^4 copies (10^8 pairs over its tiles) costs no
Python loop per pair.
"""
from __future__ import annotations

import numpy as np


def new_forest(n: int) -> np.ndarray:
    """N singleton components."""
    return np.arange(n, dtype=np.int64)


def find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The roots of nodes ``x``, which then point at them directly (path compression of the nodes asked)."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            break
        r = up
    parent[x] = r
    return r


def union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the components of every pair (u[k], v[k]) (module doc)."""
    u = np.asarray(u, np.int64)
    v = np.asarray(v, np.int64)
    while len(u):
        ru, rv = find(parent, u), find(parent, v)
        apart = ru != rv
        ru, rv = ru[apart], rv[apart]
        if not len(ru):
            return
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        parent[hi] = lo
        u, v = lo, hi  # pairs whose hook lost to another are joined next round


def roots(parent: np.ndarray) -> np.ndarray:
    """The root of every node (compresses ``parent`` completely, in place; pointer jumping: log(depth) passes)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent[:] = up
