"""``seer data dedup --features FEATS.npy --threshold T``: near duplicates among the rows ``seer features`` wrote.

Rows x_i (FEATS.npy, memory-mapped) become unit vectors u_i = x_i / ||x_i|| (the norm taken in float64, the
vectors kept in float32), and images i and j are near duplicates when their cosine similarity
s_ij = u_i . u_j >= T, T in [-1, 1]. s_ij is a float32 dot product (float32 accumulation; TF32 is turned off on
CUDA), which differs from the exact cosine by about sqrt(D) * 2^-24 (1e-6 for D = 384): identical rows of width
384 score between 1 - 8e-7 and 1 + 1e-6 (measured), so T = 1 misses about half of them; exact copies are what
``seer data dedup SOURCE`` finds, from the bytes, and T = 0.9999 catches identical rows here. Near duplicates
are the connected components of the pairs with s_ij >= T (:mod:`seer.data.union_find`): a ~ b and b ~ c put
a, b and c into one cluster even where s_ac < T, so a low T chains unlike images together. Each cluster keeps
its lowest row, the first in FEATS.txt's order.

A row whose norm is 0 or not finite (a NaN or inf anywhere) has no direction, so its cosine with any row is
undefined (0/0): such a row is never a duplicate of anything nor anything of it, and is kept, counted as a zero
row. (Scoring it 0 instead would make it a duplicate of every row at any T <= 0.)

Search: exact, blockwise. Rows [a, a+B) are multiplied by the columns from a onward, C columns at a time, so
only the upper triangle j > i is computed, and memory holds the unit vectors (N x D x 4 bytes) and one B x C
tile (C = max(256, 2^26 / B) columns: 2^26 similarities, 256 MiB, and their hit mask), never N x N. Cost: N^2 / 2
dot products of length D, N^2 * D floating-point operations; a low T adds the pairs it finds (up to every pair
of a tile at T = -1), each merged by numpy work, not a Python loop. Measured on the 2-core development machine
(torch's CPU matrix product, MKL): docs/training.md. An H100 runs float32 matrix products at about 50 TFLOP/s
(67 peak, without TF32), so 10^6 rows x 384 (3.8e14 FLOP) are about 8 s of products, 10^7 rows about 13 min
(15 GB of unit vectors), 10^8 rows about a day and 150 GB: from some millions of rows on, an approximate
nearest-neighbour index (FAISS: IVF or HNSW, range search at the threshold, then the same union-find) is the
tool; it is not bundled here.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import union_find
from .dedup_files import DedupResult, check_outputs, groups_from_roots, write_keep_list, write_report

TILE_ELEMENTS = 1 << 26  # similarities per tile (float32: 256 MiB), unless --block-rows asks for more
MIN_TILE_COLS = 256  # columns per tile at least: narrower products run far below the machine's speed
NORMALISE_ROWS = 1 << 16  # rows read from FEATS.npy and normalised at a time

if TYPE_CHECKING:  # imported when used: the module loads without torch
    import torch


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be a cosine similarity between -1 and 1, got {threshold!r}")
    return float(threshold)


class FeaturePaths:
    """The lines of FEATS.txt (row i's image path on line i), memory-mapped: no Python object per row.
    A relative path, as ``seer features --images FOLDER`` gives for a relative folder, is taken from the
    current folder (where that command presumably ran: FEATS.txt does not record it)."""

    def __init__(self, path: Path):
        size = os.path.getsize(path)
        self.text = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        ends = np.flatnonzero(self.text == 10) + 1
        if size and (not len(ends) or ends[-1] != size):  # a last line without its newline
            ends = np.append(ends, size + 1)
        self.starts = np.concatenate([[0], ends]).astype(np.int64)
        self.cwd = os.getcwd()
        self.relative = False  # whether a relative path was met (and taken from the current folder)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __call__(self, i: int) -> str:
        name = bytes(self.text[self.starts[i]:self.starts[i + 1] - 1]).decode("utf-8", "surrogateescape")
        if os.path.isabs(name):
            return name
        self.relative = True
        return os.path.join(self.cwd, name)  # (joined, not normalised: '..' after a symbolic link stays right)


def open_features(features: str) -> tuple[np.ndarray, FeaturePaths]:
    """FEATS.npy memory-mapped and its FEATS.txt, checked to be seer features' pair (ValueError naming
    --features otherwise)."""
    npy = Path(features)
    txt = npy.with_suffix(".txt")
    if not npy.is_file():
        raise ValueError(f"--features {features!r} is not a file (expected FEATS.npy written by seer features)")
    try:
        rows = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"--features {features!r} is not a .npy array ({type(e).__name__}: {e})") from None
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.floating):
        raise ValueError(f"--features {features!r} holds a {rows.dtype} array of shape {rows.shape}; expected "
                         f"float rows (N, D), one per image, as seer features writes")
    if not txt.is_file():
        raise ValueError(f"--features {features!r}: {str(txt)!r}, the image path of each row that seer features "
                         f"writes beside it, does not exist")
    paths = FeaturePaths(txt)
    if len(paths) != rows.shape[0]:
        raise ValueError(f"--features {features!r} has {rows.shape[0]} rows but {str(txt)!r} {len(paths)} lines: "
                         f"they are not one run's pair")
    if rows.shape[0] == 0:
        raise ValueError(f"--features {features!r} has no rows: nothing to deduplicate")
    return rows, paths


def unit_rows(rows: np.ndarray, device) -> tuple[torch.Tensor, np.ndarray]:
    """(u, valid): the rows scaled to norm 1, float32 on ``device``, and whether each has a direction (module
    doc; invalid rows are zero in u)."""
    import torch
    n, d = rows.shape
    u = torch.zeros((n, d), dtype=torch.float32, device=device)
    valid = np.zeros(n, bool)
    for a in range(0, n, NORMALISE_ROWS):
        x = np.asarray(rows[a:a + NORMALISE_ROWS], dtype=np.float64)  # float64: no overflow in the squares
        norm = np.sqrt(np.einsum("ij,ij->i", x, x))
        ok = np.isfinite(norm) & (norm > 0)
        x = np.where(ok[:, None], x / np.where(ok, norm, 1.0)[:, None], 0.0)
        u[a:a + len(x)] = torch.from_numpy(x.astype(np.float32)).to(device)
        valid[a:a + len(x)] = ok
    return u, valid


@contextlib.contextmanager
def _exact_float32():
    """float32 matrix products in full float32 (no TF32 or bf16 passes) for the block, as before after."""
    import torch
    was = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(was[0])
        torch.backends.cuda.matmul.allow_tf32 = was[1]


def near_roots(u, valid: np.ndarray, threshold: float, block_rows: int = 4096) -> np.ndarray:
    """``root[i]``: the lowest row of i's cluster of pairs with cosine >= ``threshold`` (module doc); ``u`` the
    unit rows (torch, N x D), ``valid`` the rows with a direction."""
    import torch
    n = u.shape[0]
    parent = union_find.new_forest(n)
    cols = min(n, max(MIN_TILE_COLS, TILE_ELEMENTS // block_rows))
    block_rows = min(n, block_rows)
    thr = torch.tensor(threshold, dtype=torch.float32, device=u.device)
    masked = not valid.all()
    ok = torch.from_numpy(valid).to(u.device)
    # One buffer each for the tile's similarities and hits, reused: fresh 256 MiB tiles cost the CPU a quarter
    # of the product again in page faults.
    sim_buf = torch.empty(block_rows * cols, dtype=torch.float32, device=u.device)
    hit_buf = torch.empty(block_rows * cols, dtype=torch.bool, device=u.device)
    with _exact_float32():
        for a in range(0, n, block_rows):
            b = min(n, a + block_rows)
            for c in range(a, n, cols):
                e = min(n, c + cols)
                shape = (b - a, e - c)
                sim = torch.matmul(u[a:b], u[c:e].T, out=sim_buf[:shape[0] * shape[1]].view(shape))
                hit = torch.ge(sim, thr, out=hit_buf[:shape[0] * shape[1]].view(shape))
                if masked:  # rows without a direction pair with nothing (module doc)
                    hit &= ok[a:b, None] & ok[None, c:e]
                if c < b:  # the tile holds the diagonal: pairs j > i only
                    hit &= torch.arange(c, e, device=u.device)[None, :] > torch.arange(a, b, device=u.device)[:, None]
                i, j = hit.nonzero(as_tuple=True)
                if len(i):
                    union_find.union(parent, i.cpu().numpy() + a, j.cpu().numpy() + c)
    return union_find.roots(parent)


def dedup_features(features: str, threshold: float, *, out: Optional[str] = None, report: Optional[str] = None,
                   device: str = "cpu", block_rows: int = 4096, overwrite: bool = False) -> DedupResult:
    """Near duplicates among the rows of ``features`` (module doc); KEEP.txt to ``out``, the report to
    ``report`` (:mod:`seer.data.dedup_files`)."""
    import torch
    threshold = check_threshold(threshold)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"--block-rows must be an integer >= 1, got {block_rows!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here")
    txt = str(Path(features).with_suffix(".txt"))
    check_outputs(out, report, overwrite, inputs=lambda: [("--features", features), ("its FEATS.txt", txt)])
    t0 = time.perf_counter()
    rows, paths = open_features(features)
    u, valid = unit_rows(rows, torch.device(device))
    groups = groups_from_roots(near_roots(u, valid, threshold, block_rows))
    del u
    res = DedupResult(len(paths), groups, zero_rows=int(len(valid) - valid.sum()))
    if out is not None:
        write_keep_list(out, paths, groups, overwrite=overwrite)
    if report is not None:
        write_report(report, paths, groups, overwrite=overwrite)
    res.relative_to = paths.cwd if paths.relative else None  # (known once the paths were read)
    res.seconds = time.perf_counter() - t0
    return res

