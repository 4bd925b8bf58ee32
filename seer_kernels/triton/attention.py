"""Triton kernels for attention, FlashAttention-2 style (math: seer_kernels/reference/attention.py).

Forward: one program per (query tile, head, batch) walks the keys in tiles with the online softmax (running
max m and running sum l), and writes out and the log-sum-exp rows lse = m + log l. The N x N matrix never
exists. The bookkeeping is in log2 units, as FlashAttention-2 does: with c = scale * log2(e) >= 0 the
running max is m = c * max_j s_ij (one multiply per row, not per score) and p = exp2(s * c - m) is one fma
and one flush-to-zero ex2 per score, where tl.exp(s * scale - m) costs a multiply by scale, a subtraction, a
multiply by log2(e) and a non-flush-to-zero ex2 that ptxas wraps in range-scaling multiplies (the sm_90 main
loops lose 14-35 % of their instructions: docs/attention.md). The fma rounds once, at the small result, so
float32 stays close to PyTorch's own error when the scores are large (peaked attention); flushing drops only
probabilities below 2^-126. A negative scale runs as -q with |scale| (the max needs c >= 0); lse is stored
in natural log (lse = (m + log2 l) * ln 2).

Backward, from lse (P = exp(S - lse) is recomputed per tile):

* delta_i = dout_i . out_i (float32), once per row instead of per tile pair: by the ``delta`` kernel in the
  atomic scheme (which also zeroes the float32 dq buffer) and the stored-dS one, by the ``dq`` kernel for its
  own rows in the dq-pass one (which runs it first);
* ``dkdv`` kernel: one program per key tile walks every query tile and accumulates dk, dv in registers;
  with ``ATOMIC_DQ`` it also adds its dq share into a float32 buffer with atomics (FlashAttention-2's
  scheme: 5 matmuls per tile pair, but the order of the additions, hence the bits of dq, vary run to run;
  with ``Tile.dq_tma`` on sm_90+ each query tile's share is one TMA bulk reduction instead);
* ``dq`` kernel: one program per query tile walks every key tile (the deterministic scheme: 7 matmuls per
  tile pair instead of 5, no atomics, no float32 dq buffer; every output element has one owner);
* or, deterministic too, dq from a stored dS (``Tile.store_ds``): the dkdv kernel also writes its dS^T tiles
  (rounded to the input dtype, as its dk matmul uses them) into a buffer, and the ``dq_ds`` kernel computes
  dq = scale * dS K from it (5 matmuls per tile pair, no atomics; a buffer of B * H * Nkv * Nq elements,
  bounded by ``ds_fits``; delta by the ``delta`` kernel first).

Masking, for any N: the last query and key tiles are partial. Loops run over full tiles without masks and
then over the one partial tile with masks (the ``MASK_*`` constexpr copies). Padded key columns get score
-inf; padded query rows load lse = +inf so that their recomputed probabilities are exactly 0 and nothing
padded can turn into inf * 0 = NaN in a stored value or an atomic.

Tail tiles: the partial last tile runs as a smaller tile, ``TAIL_M`` / ``TAIL_N`` rows (``tail_block``: the
smallest power of two >= the leftover rows, at least 16), on both axes: the masked tail iteration of each
loop, and the program that owns the last query tile (fwd, dq) or key tile (dkdv), which branches once,
uniformly, to a copy of its body compiled at the tail size. The class token makes ViT lengths one more than
a multiple of 64 (257 = 4 * 64 + 1), so without this one row costs a full 64-row tile on each axis.

Head dims: any multiple of 8 up to 256. Tiles are D_PAD = next power of two (at least 16, the smallest
tl.dot) wide; the D axis is masked when HEAD_DIM < D_PAD (80, 88, 96: 128 wide). HEAD_DIM is a
constexpr, so the mask folds away for 64 and 128 and loads stay vectorised.

Tile sizes at ViT lengths (tile quantisation): without tail tiles a pass over an Nq x Nk score matrix
costs ceil(Nq / BLOCK_M) * BLOCK_M x ceil(Nk / BLOCK_N) * BLOCK_N. At N = 257 (256 patches + class token):
128 x 128 tiles do 384^2 (45% useful), 64 x 64 do 320^2 (64.5%), 64 x 32 do 320 x 288 (71.7%), 32 x 32 do
288^2 (79.6%); with tail tiles any of 64 x 64, 64 x 32, 32 x 32 does 272^2 (89.3%). At N = 197: 64 x 64 ->
256^2 (59%), 64 x 32 -> 256 x 224 (68%), with tail tiles 208^2 (89.7%). At N = 37 / 50 one 64-row
tile holds the whole sequence. The candidate sets below therefore use 64-row query tiles with 32- or 64-wide
key tiles (128-row tiles only as alternatives); the benchmark
(bench/bench_attention.py) times every candidate per shape and bench/attention_table.py records the best one
in the selector table (seer_kernels/ops/attention_table.py). Fixed tiles per shape, not run-time autotuning,
keep results bit-identical from one process to the next, which the deterministic mode promises.

Inputs need a unit stride on the head dim and rows that start 16 bytes aligned (base and strides multiples
of 16 bytes; the launchers copy other layouts, ``_kernel_layout``), other strides are free (slices of a
fused qkv projection run without copies). The kernels tell the compiler of that alignment (``_row_ptrs``):
Triton itself knows only strides that are multiples of 16 elements, which 88-wide heads' are not.
bfloat16 and float16 use the tensor cores with float32 accumulation; float32 is supported for the CPU
interpreter only (tests), where dots are exact.

Hopper features, per candidate tile (``Tile``): ``tma_load`` loads the full tiles of each loop through tensor
descriptors (the TMA unit), ``dq_tma`` adds dq's shares with TMA bulk reductions. Both fall back to the
pointer code where the GPU, the Triton or the tensor's layout does not allow them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.attention import new_lse, new_out
from .device import on_device as _on_device
from .host_math import cdiv, next_pow2


@dataclass(frozen=True)
class Tile:
    """Launch shape of one kernel: BLOCK_M query rows x BLOCK_N key rows per tile.

    ``split_tail``: the partial last tile on each axis runs as a smaller tile (see ``tail_block``) instead of
    a padded full one. Selector tables written before it existed hold 4-element lists; the selector runs
    those without the split, as they were measured (seer_kernels/ops/attention.py ``_tile``).

    ``dq_tma`` (dkdv tiles; the atomic scheme, and the stored-dS one below): each query tile's dq share goes
    to the float32 buffer as one tensor-memory-accelerator reduction (``cp.reduce.async.bulk.tensor ... add``:
    the registers are staged in shared memory and the TMA unit adds the whole box into global memory
    asynchronously) instead of per-thread vector atomics. FlashAttention-3 accumulates dq this way on Hopper.
    Needs sm_90+ (and a Triton with tensor descriptors, 3.4+); elsewhere the tile runs with ordinary atomics
    (``tma_reduce_ok``).

    ``tma_load``: the loop loads of full tiles (K and V in the forward and dq kernels, Q and dO in dkdv) go
    through the tensor memory accelerator (``desc.load`` on a (B, H, N, D) descriptor: the unit computes the
    addresses and writes shared memory, which wgmma reads directly, synchronised by mbarriers) instead of
    per-thread ``cp.async``. Same sm_90+ condition (``tma_load_ok``), and the tensors' base and batch, head and
    row strides must be multiples of 16 bytes (``_row_descriptor``); otherwise the tile loads by pointers.

    ``store_ds`` (dkdv tiles, deterministic scheme only): dq from a stored dS instead of its own pass. The dkdv
    kernel also writes each tile of dS^T = (P * (dP - delta))^T, in the input dtype (the rounding the dk and
    dq matmuls apply to it anyway), into a (B, H, Nkv, ``ds_cols(Nq)``) buffer, and a third kernel computes
    dq = scale * dS K, one matmul per tile pair, with the dq tile's block sizes (``_bwd_dq_ds_kernel``).
    No atomics, so the same bits every run, and 5 matmuls per tile pair instead of the dq pass's 7, for a
    dS buffer of about B * H * Nkv * Nq elements written once and read once (``ds_fits`` bounds it; a larger
    one runs the dq pass, with the default dq tiles). With ``dq_tma`` too, each dS tile goes out as one TMA
    bulk store (sm_90+; pointer stores elsewhere): ``dq_tma`` means dq's traffic through the TMA unit in
    either scheme.

    ``fold_tail`` (forward tiles, and the dq tile of a stored-dS pair; the dq pass ignores it): the partial
    last query tile (a ``split_tail`` tail of TAIL_M rows) is computed by the program of the last full query
    tile, with the K and V tiles that program loads anyway, instead of by a program of its own that streams
    all of K and V again for a few rows. At N = 257 with 64-row tiles the tail program is the class token's
    one row: a fifth of the forward's K and V traffic (each query tile's program reads all of K and V, mostly
    from L2) and of its programs, for 1/257 of its work. The last program then runs two row blocks (BLOCK_M
    and TAIL_M rows) against each key tile. Applies where N_q > BLOCK_M and N_q is not a multiple of it
    (``fold_active``); elsewhere the tile runs as without.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    split_tail: bool = True
    dq_tma: bool = False
    tma_load: bool = False
    store_ds: bool = False
    fold_tail: bool = False

    def __post_init__(self):  # from a table's 0/1: bools, so that equal tiles print and compare alike
        for flag in ("split_tail", "dq_tma", "tma_load", "store_ds", "fold_tail"):
            object.__setattr__(self, flag, bool(getattr(self, flag)))

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages, int(self.split_tail),
                int(self.dq_tma), int(self.tma_load), int(self.store_ds), int(self.fold_tail)]

    def constexprs(self, n_q: int, n_kv: int) -> dict:
        """The kernels' tile constexprs for an Nq x Nkv pass: block sizes and tail sizes (``tail_block``)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, TAIL_M=tail_block(n_q, self.block_m, self.split_tail),
                    TAIL_N=tail_block(n_kv, self.block_n, self.split_tail))


# Candidate tiles per padded head dim (the first is the default when the selector table has no entry).
# dkdv programs own BLOCK_N keys and walk queries BLOCK_M at a time; dq programs own BLOCK_M queries.
# From a 116-135-variant sweep per ViT shape on an H200 (bench/attention_sweep.py,
# bench/results/nvidia-h200-attention-sweep.json): the first of each was the fastest at one of the measured
# shapes (ViT-10B/TP4 for the 128 class, ViT-L or local crops for the 64 class), the others at another shape
# or close behind; the benchmark times them all per shape and the selector table keeps the fastest.
# Every entry compiles for sm_90 within 180 KB of shared memory at bf16/fp16 and spills at most 64 bytes per
# thread (python -m bench.attention_compile prints both; at most 48 with Triton 3.6, 32 with 3.8): the
# fastest dkdv tile at 128-wide heads, (32, 64, 4 warps), spills 24-36 bytes with dq atomics and was still
# the fastest measured.
# No entry has its wgmma serialised by ptxas with Triton 3.6 (the GPU machines') or 3.8 at the head dims
# of its class (the compile check fails such a variant: a wait after every wgmma, so no matmul overlaps
# anything). ptxas does that to some dkdv tiles ("non wgmma instructions defining accumulator registers of a
# wgmma between start and end of the pipeline stage"): with Triton 3.6 every 3-stage dkdv tile, the
# (32, 64, 4 warps) tile with TMA dq reductions at 80-128-wide heads and the (64, 64) one at 16-wide heads
# with 32-row tails, with Triton 3.8 the (64, 64) tile at 64-wide heads with 32-row tails (atomic, and with
# TMA reductions), and, with either Triton, the atomic (32, 128, 8 warps) tile at 64-wide heads and the
# (32, 64) and (64, 64) atomic tiles at 32-wide ones (hence the 32 class). Which variants it hits moves with
# small changes (the Triton, the tail size), so `python -m bench.attention_compile --seq-len 257` and
# `--seq-len 145` with both Tritons is the check. The sweep above timed some serialised tiles.
# The 64-row query tiles map onto Hopper's 64-row wgmma.
# Every tile splits its tail (tail_block) except the last entry of the 32, 64 and 128 classes: the default
# tile without the split, so that the GPU benchmark times the split against the tiles measured before it,
# in the same run, and the table keeps whichever is faster. (The split is not timed on a GPU yet: it
# removes work, 28 % of the padded score tiles at N = 257, but compiles a second copy of each loop for the
# tail tile; on sm_90 that copy uses mma instead of wgmma, and the main loops keep their software
# pipelining.)
# The forward's (128, 32, 8 warps, 3 stages) tile was 1 % behind the fastest at ViT-10B/TP4 in that sweep,
# before tail tiles: 128-row query tiles then padded 257 queries to 384 (64-row ones to 320); with the split
# both do 272, so the 128-row tiles lose 33 % of their work there against 20 % for the 64-row ones (not timed
# yet; 128 registers, no spills, 80 KB of shared memory with Triton 3.6 at D = 128).
# The Hopper features (Tile.dq_tma, Tile.tma_load; not timed on a GPU yet either) come the same way: as a
# candidate tile with the feature whose twin without it is timed in the same run (bench/summary.py prints
# each pair). In DKDV_TILES and DQ_TILES the tiles without dq_tma pair up by position for the deterministic
# scheme (bwd_candidates).
# The fold_tail tiles (not timed on a GPU yet): the split tiles that the H100 table keeps at ViT lengths and
# a 128-row one, each timed against its twin with a tail program of its own: compiled for sm_90 (N = 257, bf16) the last
# program's loop, two row blocks against each key tile, takes 560 SASS instructions at (64, 64) and D = 128
# against 363 (Triton 3.6; 553 vs 369 with 3.8), and the kernel 226 registers instead of 168 (no spills, no
# serialised wgmma): at (64, 64) shared memory bounds the SMs to 2 programs either way, at (64, 32) the
# registers now do (3 before). The (128, 64, 8 warps) one (twin: the (128, 64, 8, 2) tile above) reads
# K and V twice per (batch, head) at N = 257 instead of five times: 2 x 128 + 16 rows in two programs (223
# registers with Triton 3.6, one program per SM, as its twin's 170 already allow).
FWD_TILES = {
    64: (Tile(64, 64, 4, 3), Tile(64, 32, 4, 3), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3, tma_load=True),
         Tile(64, 64, 4, 3, fold_tail=True), Tile(64, 64, 4, 3, split_tail=False)),
    128: (Tile(64, 32, 4, 3), Tile(128, 32, 4, 2), Tile(128, 32, 8, 3), Tile(64, 64, 4, 3), Tile(128, 64, 8, 2),
          Tile(64, 32, 4, 3, tma_load=True), Tile(64, 64, 4, 3, fold_tail=True), Tile(64, 32, 4, 3, fold_tail=True),
          Tile(128, 64, 8, 2, fold_tail=True), Tile(64, 32, 4, 3, split_tail=False)),
    256: (Tile(64, 32, 8, 2), Tile(64, 64, 8, 2)),
}
DKDV_TILES = {
    # 8- to 32-wide heads (no benchmark shape; the ViT presets above "tiny" use 64-128): tiles that ptxas
    # does not serialise there
    32: (Tile(16, 64, 4, 2), Tile(32, 32, 4, 2), Tile(64, 32, 4, 2), Tile(16, 64, 4, 2, dq_tma=True),
         Tile(32, 32, 4, 2, tma_load=True), Tile(16, 64, 4, 2, split_tail=False)),
    64: (Tile(32, 64, 4, 2), Tile(16, 64, 4, 2), Tile(64, 32, 4, 2), Tile(32, 32, 4, 2),
         Tile(32, 64, 4, 2, dq_tma=True), Tile(16, 64, 4, 2, dq_tma=True), Tile(32, 64, 4, 2, tma_load=True),
         Tile(32, 64, 4, 2, dq_tma=True, tma_load=True), Tile(32, 64, 4, 2, split_tail=False)),
    # The dq_tma tiles are the (16, 64) and (64, 64, 8 warps) tiles, each with its pointer-atomic twin here
    128: (Tile(32, 64, 4, 2), Tile(16, 64, 4, 2), Tile(64, 64, 8, 2), Tile(32, 128, 8, 2),
          Tile(16, 64, 4, 2, dq_tma=True), Tile(64, 64, 8, 2, dq_tma=True), Tile(32, 64, 4, 2, tma_load=True),
          Tile(16, 64, 4, 2, dq_tma=True, tma_load=True), Tile(32, 64, 4, 2, split_tail=False)),
    256: (Tile(32, 32, 8, 2), Tile(64, 32, 8, 2)),
}
DQ_TILES = {
    64: (Tile(64, 32, 4, 3), Tile(64, 16, 4, 3), Tile(64, 64, 4, 2), Tile(128, 32, 8, 2),
         Tile(64, 32, 4, 3, tma_load=True), Tile(64, 32, 4, 3, split_tail=False)),
    128: (Tile(64, 32, 4, 3), Tile(64, 16, 4, 3), Tile(64, 64, 8, 2), Tile(128, 32, 8, 2),
          Tile(64, 32, 4, 3, tma_load=True), Tile(64, 32, 4, 3, split_tail=False)),
    256: (Tile(32, 64, 8, 2), Tile(64, 32, 8, 2), Tile(32, 32, 4, 2)),
}
# The 32 class shares the 64 class's forward and dq tiles (no serialised wgmma there); its dq list drops
# the 128-row tile so that the deterministic pairs line up by position (tma_load with tma_load, unsplit
# with unsplit).
FWD_TILES[32] = FWD_TILES[64]
DQ_TILES[32] = tuple(t for t in DQ_TILES[64] if t.block_m != 128)
# The stored-dS scheme (Tile.store_ds; deterministic): (dkdv tile that stores dS^T, tile of the dq-from-dS
# kernel). Not timed on a GPU yet: the benchmark times these against the dq pass in the same run. The dS
# store by TMA (dq_tma) and its pointer twin on the dkdv tile that was fastest on the H200 (for the 32 class,
# the one ptxas does not serialise there). Compiled for sm_90 by Triton 3.6 at D = 128 the store adds 30
# SASS instructions per iteration by TMA, 92 by pointers (266 -> 296 / 358); the (16, 64) tile was left out:
# 257 per iteration for half the scores (0.25 per score against 0.145). At 80-128-wide heads also the
# (32, 128, 8 warps) tile with the TMA store: 283 per warp and iteration for twice the scores with twice the
# warps (0.138 per score and warp of 4; 231 registers, no spills), and the one whose work the split tails cut
# most at N = 257 (32 x 128 tiles: 288 x 384 -> 272 x 272 score rows, 33 %, against 20 % for 32 x 64).
# Last, the pair that the H100 table keeps at ViT-10B/TP4 and ViT-g (pointer stores), with its dq-from-dS
# tile folding the query tail into its last program (Tile.fold_tail: each query tile's program reads all of
# K; at N = 257 the tail's 16 rows read it a fifth time), timed against that pair; at the 128 class also
# with a (128, 64, 8 warps) dq tile, folding and not (K read twice per (batch, head) at N = 257, or three
# times).
DS_TILES = {
    32: ((Tile(16, 64, 4, 2, store_ds=True, dq_tma=True), Tile(64, 64, 4, 3)),
         (Tile(16, 64, 4, 2, store_ds=True), Tile(64, 64, 4, 3))),
    64: ((Tile(32, 64, 4, 2, store_ds=True, dq_tma=True), Tile(64, 64, 4, 3)),
         (Tile(32, 64, 4, 2, store_ds=True), Tile(64, 64, 4, 3)),
         (Tile(32, 64, 4, 2, store_ds=True), Tile(64, 64, 4, 3, fold_tail=True))),
    128: ((Tile(32, 64, 4, 2, store_ds=True, dq_tma=True), Tile(64, 64, 4, 3)),
          (Tile(32, 64, 4, 2, store_ds=True), Tile(64, 64, 4, 3)),
          (Tile(32, 128, 8, 2, store_ds=True, dq_tma=True), Tile(64, 64, 4, 3)),
          (Tile(32, 64, 4, 2, store_ds=True), Tile(64, 64, 4, 3, fold_tail=True)),
          (Tile(32, 64, 4, 2, store_ds=True), Tile(128, 64, 8, 2)),
          (Tile(32, 64, 4, 2, store_ds=True), Tile(128, 64, 8, 2, fold_tail=True))),
    256: (),
}
DS_MAX_RATIO = 4  # ds_fits: the dS^T buffer at most this many times the size of q, k and v
DELTA_BLOCK = 64
# The softmax runs in base 2 (module docstring): scores and lse convert with these.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def bwd_candidates(cls: int) -> list[tuple[bool, Tile, Tile]]:
    """(deterministic, dkdv tile, dq tile) for every backward candidate of a tile class: each dkdv tile in
    the atomic scheme (with the default dq tile, which that scheme does not launch), and the dkdv and dq
    tiles pairwise in the deterministic one, where ``dq_tma`` does nothing (the shorter list repeats its
    default), then the stored-dS pairs of ``DS_TILES`` (deterministic too). What the benchmark times and the
    tests check."""
    atomic = [(False, t, DQ_TILES[cls][0]) for t in DKDV_TILES[cls]]
    dkdv, dq = [t for t in DKDV_TILES[cls] if not t.dq_tma], DQ_TILES[cls]
    det = [(True, dkdv[i] if i < len(dkdv) else dkdv[0], dq[i] if i < len(dq) else dq[0])
           for i in range(max(len(dkdv), len(dq)))]
    return atomic + det + [(True, t, d) for t, d in DS_TILES[cls]]


def tail_block(n: int, block: int, split: bool = True) -> int:
    """Rows of the tile that covers the last ``n % block`` rows of an axis of length n.

    The smallest power of two that holds them, at least 16 (tl.dot's minimum), at most ``block``; the full
    block where n divides evenly or ``split`` is off. At N = 257 (256 patches + class token) the one leftover
    row then costs a 16-row tile instead of a 64-row one: with 64 x 32 tiles a pass over the 257 x 257 score
    matrix does 272 x 272 instead of 320 x 288 (89 % useful instead of 72 %); at N = 197 with 64 x 32 tiles,
    208 x 208 instead of 256 x 224. Correctness does not depend on the value (the tail loops are masked and
    step by it); only the work does. It is a constexpr, so each distinct value is its own compiled variant
    (at most log2(block) - 3 values per axis, so up to 9 variants of a 128 x 128 tile).
    """
    rem = n % block
    if not split or rem == 0:
        return block
    return min(block, max(16, next_pow2(rem)))


def fold_active(tile: Tile, n_q: int) -> bool:
    """Whether ``tile`` folds the query tail into the last full tile's program (``Tile.fold_tail``) at N_q."""
    return tile.fold_tail and n_q > tile.block_m and tail_block(n_q, tile.block_m, tile.split_tail) < tile.block_m


def query_programs(tile: Tile, n_q: int) -> int:
    """Programs per (batch, head) of a kernel that owns query tiles (the forward, dq from a stored dS): one per
    query tile, the tail's folded into the last full one's where ``fold_active``."""
    return n_q // tile.block_m if fold_active(tile, n_q) else cdiv(n_q, tile.block_m)


def d_pad(head_dim: int) -> int:
    """Width of the register tiles along the head dim: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(head_dim))


def tile_class(head_dim: int) -> int:
    """Key of the candidate tables: the padded head dim, 32 for 8- to 32-wide heads (D_PAD 16 or 32)."""
    return max(32, d_pad(head_dim))


# ---------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _row_ptrs(base, offs_rows, offs_cols, stride_row):
    """Pointers to a tile of rows (of q, k, v, out, their gradients, dq's float32 buffer or the dS buffer)
    that start 16 bytes aligned, and the compiler told so.

    The launchers copy any other input layout (``_kernel_layout``); the buffers are allocated so. Triton
    knows it by itself only where every stride is a multiple of 16 elements: at 88-wide heads (strides 88
    and 257 x 88) each load and store of a row went 2 bytes at a time and the loops lost cp.async (sm_90
    SASS: the forward's main loop 579 instructions, 265 with this)."""
    return tl.multiple_of(base + offs_rows[:, None] * stride_row + offs_cols[None, :], [1, 16])


@triton.jit
def _load_rows(base, offs_rows, offs_d, stride_row, n_rows, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows, D_PAD) tile; padded rows and head-dim columns read as 0."""
    ptrs = _row_ptrs(base, offs_rows, offs_d, stride_row)
    if MASK_ROWS:
        if HEAD_DIM == D_PAD:
            x = tl.load(ptrs, mask=(offs_rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == D_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _load_tile(base, desc, start, offs_rows, offs_d, stride_row, n_rows, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, ROWS: tl.constexpr, MASK_ROWS: tl.constexpr, TMA_LOAD: tl.constexpr):
    """Rows offs_rows = start + arange(ROWS) of this program's (batch, head) as a (ROWS, D_PAD) tile: through
    the tensor memory accelerator for the full tiles of a ``Tile.tma_load`` tile (``desc``: a (B, H, N, D)
    descriptor with (1, 1, ROWS, D_PAD) boxes; columns past D read as 0; every kernel here runs batch on grid
    axis 2 and head on axis 1), by pointers otherwise (the masked tail, whose row count differs from the
    box where it is split)."""
    if TMA_LOAD and not MASK_ROWS:
        x = desc.load([tl.program_id(2), tl.program_id(1), start, 0]).reshape([ROWS, D_PAD])
    else:
        x = _load_rows(base, offs_rows, offs_d, stride_row, n_rows, HEAD_DIM, D_PAD, MASK_ROWS)
    return x


@triton.jit
def _store_rows(base, x, offs_rows, offs_d, stride_row, n_rows, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    ptrs = _row_ptrs(base, offs_rows, offs_d, stride_row)
    if HEAD_DIM == D_PAD:
        tl.store(ptrs, x, mask=(offs_rows < n_rows)[:, None])
    else:
        tl.store(ptrs, x, mask=(offs_rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _softmax_step(s, m_i, l_i, offs_n, N_KV, qk_scale, MASK_N: tl.constexpr):
    """One key tile of the online softmax in log2 units (c = qk_scale = scale * log2(e) >= 0; m_i the running
    max of c * s, l_i the sum of exp2(c * s - m_i)): p = exp2(c * s - m_new), alpha = exp2(m_i - m_new), the
    rescale of what came before, and the new max and sum."""
    if MASK_N:  # the one tail tile: scale first, so that c = 0 cannot make -inf * 0 = NaN
        s = tl.where((offs_n < N_KV)[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:  # c >= 0: max(c * s) = c * max(s), and the exponent is one fma
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, skn, svn, offs_d, start, end, N_KV, qk_scale,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
               TMA_LOAD: tl.constexpr):
    """Online softmax over key tiles [start, end) (:func:`_softmax_step`)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, k_desc, start_n, offs_n, offs_d, skn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        p, alpha, m_i, l_i = _softmax_step(tl.dot(q, tl.trans(k)), m_i, l_i, offs_n, N_KV, qk_scale, MASK_N)
        v = _load_tile(v_base, v_desc, start_n, offs_n, offs_d, svn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_fold(acc, l_i, m_i, q, acc2, l2, m2, q2, k_base, v_base, k_desc, v_desc, skn, svn, offs_d, start,
                    end, N_KV, qk_scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    """:func:`_fwd_inner` for two row blocks (q and q2, ``Tile.fold_tail``) against each K and V tile,
    loaded once for both."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, k_desc, start_n, offs_n, offs_d, skn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        kt = tl.trans(k)
        p, alpha, m_i, l_i = _softmax_step(tl.dot(q, kt), m_i, l_i, offs_n, N_KV, qk_scale, MASK_N)
        p2, alpha2, m2, l2 = _softmax_step(tl.dot(q2, kt), m2, l2, offs_n, N_KV, qk_scale, MASK_N)
        v = _load_tile(v_base, v_desc, start_n, offs_n, offs_d, svn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        acc2 = acc2 * alpha2[:, None] + tl.dot(p2.to(v.dtype), v)
    return acc, l_i, m_i, acc2, l2, m2


@triton.jit
def _fwd_store(o_base, lse_row, acc, l_i, m_i, offs_m, offs_d, son, N_Q, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr):
    """out = acc / l and lse (natural log) of the rows offs_m. Every row saw at least one real key
    (N_KV >= 1), so l_i >= 1 and the division is safe."""
    out = acc / l_i[:, None]
    _store_rows(o_base, out.to(o_base.dtype.element_ty), offs_m, offs_d, son, N_Q, HEAD_DIM, D_PAD)
    tl.store(lse_row + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < N_Q)


@triton.jit
def _fwd_rows(q_base, k_base, v_base, o_base, lse_row, k_desc, v_desc, sqn, skn, svn, son, start_m, N_Q,
              N_KV, scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    """Query rows [start_m, start_m + BLOCK_M) of one (batch, head): out and lse."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(q_base, offs_m, offs_d, sqn, N_Q, HEAD_DIM, D_PAD, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    qk_scale = scale * LOG2E  # the launcher makes scale >= 0
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, skn, svn, offs_d, 0,
                               n_full, N_KV, qk_scale, HEAD_DIM, D_PAD, BLOCK_N, False, TMA_LOAD)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, skn, svn, offs_d,
                               n_full, N_KV, N_KV, qk_scale, HEAD_DIM, D_PAD, TAIL_N, True, TMA_LOAD)
    _fwd_store(o_base, lse_row, acc, l_i, m_i, offs_m, offs_d, son, N_Q, HEAD_DIM, D_PAD)


@triton.jit
def _fwd_rows_fold(q_base, k_base, v_base, o_base, lse_row, k_desc, v_desc, sqn, skn, svn, son, start_m, N_Q,
                   N_KV, scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                   TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    """The last full query tile, rows [start_m, start_m + BLOCK_M), and the tail after it, TAIL_M rows
    (``Tile.fold_tail``), in one pass over the keys."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_t = start_m + BLOCK_M + tl.arange(0, TAIL_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(q_base, offs_m, offs_d, sqn, N_Q, HEAD_DIM, D_PAD, True)
    q2 = _load_rows(q_base, offs_t, offs_d, sqn, N_Q, HEAD_DIM, D_PAD, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    m2 = tl.full([TAIL_M], float("-inf"), tl.float32)
    l2 = tl.zeros([TAIL_M], tl.float32)
    acc2 = tl.zeros([TAIL_M, D_PAD], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    qk_scale = scale * LOG2E  # the launcher makes scale >= 0
    acc, l_i, m_i, acc2, l2, m2 = _fwd_inner_fold(acc, l_i, m_i, q, acc2, l2, m2, q2, k_base, v_base, k_desc,
                                                  v_desc, skn, svn, offs_d, 0, n_full, N_KV, qk_scale, HEAD_DIM,
                                                  D_PAD, BLOCK_N, False, TMA_LOAD)
    acc, l_i, m_i, acc2, l2, m2 = _fwd_inner_fold(acc, l_i, m_i, q, acc2, l2, m2, q2, k_base, v_base, k_desc,
                                                  v_desc, skn, svn, offs_d, n_full, N_KV, N_KV, qk_scale, HEAD_DIM,
                                                  D_PAD, TAIL_N, True, TMA_LOAD)
    _fwd_store(o_base, lse_row, acc, l_i, m_i, offs_m, offs_d, son, N_Q, HEAD_DIM, D_PAD)
    _fwd_store(o_base, lse_row, acc2, l2, m2, offs_t, offs_d, son, N_Q, HEAD_DIM, D_PAD)


@triton.jit(do_not_specialize=["N_Q", "N_KV"])
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N_Q, N_KV, scale, K_DESC, V_DESC,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr, FOLD_TAIL: tl.constexpr):
    """K_DESC, V_DESC: None, or with ``TMA_LOAD`` descriptors of K and V (``Tile.tma_load``). ``FOLD_TAIL``
    (``fold_active``): the grid has N_Q // BLOCK_M query programs, the last of which also computes the
    TAIL_M-row tail."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)  # 64-bit: b * stride overflows int32 on large activations
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    lse_row = LSE + (b * H + h) * N_Q
    if FOLD_TAIL and start_m + 2 * BLOCK_M > N_Q:  # the last program: its full tile and the tail after it
        _fwd_rows_fold(q_base, k_base, v_base, o_base, lse_row, K_DESC, V_DESC, sqn, skn, svn, son, start_m, N_Q,
                       N_KV, scale, HEAD_DIM, D_PAD, BLOCK_M, TAIL_M, BLOCK_N, TAIL_N, TMA_LOAD)
    elif TAIL_M < BLOCK_M and start_m + BLOCK_M > N_Q:  # the partial last query tile, in a TAIL_M-row tile
        _fwd_rows(q_base, k_base, v_base, o_base, lse_row, K_DESC, V_DESC,
                  sqn, skn, svn, son, start_m, N_Q, N_KV, scale, HEAD_DIM, D_PAD, TAIL_M, BLOCK_N, TAIL_N, TMA_LOAD)
    else:
        _fwd_rows(q_base, k_base, v_base, o_base, lse_row, K_DESC, V_DESC,
                  sqn, skn, svn, son, start_m, N_Q, N_KV, scale, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, TAIL_N, TMA_LOAD)


@triton.jit(do_not_specialize=["N_Q"])
def _bwd_delta_kernel(O, DO, DELTA, DQ_ACC, sob, soh, son, sdob, sdoh, sdon, sdqb, sdqh, sdqn, H, N_Q,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr):
    """delta_i = dout_i . out_i in float32, and with ``ZERO_DQ`` zeros into the same rows of the float32 dq
    buffer (which the dkdv kernel then accumulates into): one launch instead of a separate fill, as
    FlashAttention-3's preprocessing kernel does. (The stored-dS scheme has no buffer to zero.)"""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = _load_rows(O + b * sob + h * soh, offs_m, offs_d, son, N_Q, HEAD_DIM, D_PAD, True).to(tl.float32)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, N_Q, HEAD_DIM, D_PAD, True).to(tl.float32)
    tl.store(DELTA + (b * H + h) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)
    if ZERO_DQ:
        _store_rows(DQ_ACC + b * sdqb + h * sdqh, tl.zeros([BLOCK_M, D_PAD], tl.float32), offs_m, offs_d, sdqn, N_Q,
                    HEAD_DIM, D_PAD)


@triton.jit
def _dkdv_inner(dk, dv, k, v, key_bias, q_base, do_base, lse_row, delta_row, dq_base, ds_base, q_desc, do_desc,
                dq_desc, ds_desc, bh, sqn, sdon, sdqn, sdsn, start_n, offs_n, offs_d, start, end, N_Q, N_KV, qk_scale,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
                MASK_KEYS: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr, TMA_LOAD: tl.constexpr,
                STORE_DS: tl.constexpr, DS_TMA: tl.constexpr):
    """Accumulate dk, dv of one key tile over query tiles [start, end), working on S^T (keys x queries).

    With ``DQ_TMA`` the dq share goes through ``dq_desc`` (a (B * H, N_Q, HEAD_DIM) float32 descriptor with
    BLOCK_M x D_PAD boxes; the TMA unit drops the rows past N_Q and the columns past HEAD_DIM); tail tiles
    of another row count use the pointer atomics. ``MASK_KEYS``: this key tile has padded rows (key_bias
    -inf there); only the program of the last key tile can. With ``STORE_DS`` the tile of dS^T (keys x
    queries, in the input dtype) goes to ``ds_base`` (rows ``sdsn`` apart) for the dq kernel of that scheme,
    with ``DS_TMA`` as one TMA bulk store through ``ds_desc`` ((B * H, N_KV, row length) with
    (1, key rows, BLOCK_M) boxes; the tail tiles of other row counts store by pointers)."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, q_desc, start_m, offs_m, offs_d, sqn, N_Q, HEAD_DIM, D_PAD, BLOCK_M, MASK_M, TMA_LOAD)
        do = _load_tile(do_base, do_desc, start_m, offs_m, offs_d, sdon, N_Q, HEAD_DIM, D_PAD, BLOCK_M, MASK_M,
                        TMA_LOAD)
        if MASK_M:  # padded query rows: lse = +inf gives p = 0 exactly
            lse = tl.load(lse_row + offs_m, mask=offs_m < N_Q, other=float("inf"))
            delta = tl.load(delta_row + offs_m, mask=offs_m < N_Q, other=0.0)
        else:
            lse = tl.load(lse_row + offs_m)
            delta = tl.load(delta_row + offs_m)
        # p = exp(s * scale - lse) = exp2(s * c - lse * log2(e)): one fma and one ex2 per score (any sign
        # of c: no max here)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale + (lse * -LOG2E)[None, :]
        if MASK_KEYS:
            s_t += key_bias[:, None]
        p_t = tl.exp2(s_t)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
        if STORE_DS:  # dS^T as computed (keys x queries): rows of the buffer are contiguous along queries
            if DS_TMA:  # one bulk store of the box; the unit drops rows past N_KV, columns past the buffer's
                ds_desc.store([bh, start_n, start_m], ds_t.to(q.dtype).reshape([1, ds_t.shape[0], BLOCK_M]))
            else:
                ds_ptrs = _row_ptrs(ds_base, offs_n, offs_m, sdsn)
                if MASK_M or MASK_KEYS:
                    # Columns up to the buffer's row length (sdsn, a multiple of 16: ds_cols), not N_Q: the
                    # padded queries' dS is exactly 0 (p = 0, dO = 0), and a bound that the compiler knows
                    # to be a multiple of 16 keeps the stores 16 bytes wide.
                    tl.store(ds_ptrs, ds_t.to(q.dtype), mask=(offs_n < N_KV)[:, None] & (offs_m < sdsn)[None, :])
                else:
                    tl.store(ds_ptrs, ds_t.to(q.dtype))
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k)  # times scale in the conversion: once per element
            if DQ_TMA:
                dq_desc.atomic_add([bh, start_m, 0], dq.reshape([1, BLOCK_M, D_PAD]))
            else:
                # (HEAD_DIM for sdqn, dq_acc being contiguous, cut 16 instructions per iteration with Triton
                # 3.8 but made Triton 3.6 spill 72 bytes at D = 80)
                ptrs = _row_ptrs(dq_base, offs_m, offs_d, sdqn)
                if MASK_M:
                    tl.atomic_add(ptrs, dq, mask=(offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :],
                                  sem="relaxed")
                elif HEAD_DIM == D_PAD:
                    tl.atomic_add(ptrs, dq, sem="relaxed")
                else:
                    tl.atomic_add(ptrs, dq, mask=(offs_d < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_keys(k_base, v_base, q_base, do_base, dk_base, dv_base, lse_row, delta_row, dq_base, ds_base, q_desc,
               do_desc, dq_desc, ds_desc, bh, skn, svn, sqn, sdon, sdkn, sdvn, sdqn, sdsn, start_n, N_Q, N_KV, scale,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TAIL_M: tl.constexpr, MASK_KEYS: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
               TMA_LOAD: tl.constexpr, STORE_DS: tl.constexpr, DS_TMA: tl.constexpr):
    """dk, dv of key rows [start_n, start_n + BLOCK_N) of one (batch, head), from every query."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(k_base, offs_n, offs_d, skn, N_KV, HEAD_DIM, D_PAD, True)
    v = _load_rows(v_base, offs_n, offs_d, svn, N_KV, HEAD_DIM, D_PAD, True)
    # Padded keys get score -inf: p = 0, so their (never stored) gradients and dq's share stay exact zeros.
    key_bias = tl.where(offs_n < N_KV, 0.0, float("-inf"))
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    qk_scale = scale * LOG2E
    dk, dv = _dkdv_inner(dk, dv, k, v, key_bias, q_base, do_base, lse_row, delta_row, dq_base, ds_base, q_desc,
                         do_desc, dq_desc, ds_desc, bh, sqn, sdon, sdqn, sdsn, start_n, offs_n, offs_d, 0, m_full, N_Q,
                         N_KV, qk_scale, HEAD_DIM, D_PAD, BLOCK_M, False, MASK_KEYS, ATOMIC_DQ, DQ_TMA, TMA_LOAD,
                         STORE_DS, DS_TMA)
    # The tail tile's box is the descriptor's only where it has BLOCK_M rows (no split); the TMA unit drops
    # the rows past N_Q.
    dk, dv = _dkdv_inner(dk, dv, k, v, key_bias, q_base, do_base, lse_row, delta_row, dq_base, ds_base, q_desc,
                         do_desc, dq_desc, ds_desc, bh, sqn, sdon, sdqn, sdsn, start_n, offs_n, offs_d, m_full, N_Q,
                         N_Q, N_KV, qk_scale, HEAD_DIM, D_PAD, TAIL_M, True, MASK_KEYS, ATOMIC_DQ,
                         DQ_TMA and TAIL_M == BLOCK_M, TMA_LOAD, STORE_DS, DS_TMA and TAIL_M == BLOCK_M)
    _store_rows(dk_base, (dk * scale).to(dk_base.dtype.element_ty), offs_n, offs_d, sdkn, N_KV, HEAD_DIM, D_PAD)
    _store_rows(dv_base, dv.to(dv_base.dtype.element_ty), offs_n, offs_d, sdvn, N_KV, HEAD_DIM, D_PAD)


@triton.jit(do_not_specialize=["N_Q", "N_KV"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, DS,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                     sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sdqb, sdqh, sdqn, sdsb, sdsh, sdsn,
                     H, N_Q, N_KV, scale, DQ_DESC, Q_DESC, DO_DESC, DS_DESC,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
                     TMA_LOAD: tl.constexpr, STORE_DS: tl.constexpr, DS_TMA: tl.constexpr):
    """DQ_ACC: with ``ATOMIC_DQ`` the float32 buffer that the dq shares add into, without ``scale`` (the
    conversion applies it); DQ_DESC: None, or with ``DQ_TMA`` its descriptor for the TMA reduction
    (``Tile.dq_tma``); Q_DESC, DO_DESC: None, or with ``TMA_LOAD`` descriptors of Q and DO (``Tile.tma_load``);
    DS: with ``STORE_DS`` the (B, H, N_KV, >= N_Q) buffer that dS^T goes to (``Tile.store_ds``); DS_DESC: None,
    or with ``DS_TMA`` its descriptor (``Tile.store_ds`` with ``Tile.dq_tma``)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(2) * H + tl.program_id(1)  # the descriptor's leading coordinate (int32, < 2^32 grid)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dk_base = DK + b * sdkb + h * sdkh
    dv_base = DV + b * sdvb + h * sdvh
    dq_base = DQ_ACC + b * sdqb + h * sdqh
    ds_base = DS + b * sdsb + h * sdsh
    lse_row = LSE + (b * H + h) * N_Q
    delta_row = DELTA + (b * H + h) * N_Q
    # Only the last key tile can have padded keys: with a split tail that is the TAIL_N copy alone, so the
    # other programs skip the key mask (one add per score).
    if TAIL_N < BLOCK_N and start_n + BLOCK_N > N_KV:  # the partial last key tile, in a TAIL_N-row tile
        _dkdv_keys(k_base, v_base, q_base, do_base, dk_base, dv_base, lse_row, delta_row, dq_base, ds_base, Q_DESC,
                   DO_DESC, DQ_DESC, DS_DESC, bh, skn, svn, sqn, sdon, sdkn, sdvn, sdqn, sdsn, start_n, N_Q, N_KV,
                   scale, HEAD_DIM, D_PAD, BLOCK_M, TAIL_N, TAIL_M, True, ATOMIC_DQ, DQ_TMA, TMA_LOAD, STORE_DS, False)
    else:
        _dkdv_keys(k_base, v_base, q_base, do_base, dk_base, dv_base, lse_row, delta_row, dq_base, ds_base, Q_DESC,
                   DO_DESC, DQ_DESC, DS_DESC, bh, skn, svn, sqn, sdon, sdkn, sdvn, sdqn, sdsn, start_n, N_Q, N_KV,
                   scale, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N == BLOCK_N, ATOMIC_DQ, DQ_TMA, TMA_LOAD,
                   STORE_DS, DS_TMA)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, svn, offs_d, start, end, N_KV,
              qk_scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
              TMA_LOAD: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, k_desc, start_n, offs_n, offs_d, skn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        v = _load_tile(v_base, v_desc, start_n, offs_n, offs_d, svn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        s = tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None]  # p = exp2(s * c - lse * log2(e)), one fma
        if MASK_N:
            s = tl.where((offs_n < N_KV)[None, :], s, float("-inf"))
        p = tl.exp2(s)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _dq_rows(q_base, do_base, o_base, k_base, v_base, dq_base, lse_row, delta_row, k_desc, v_desc, sqn,
             sdon, son, skn, svn, sdqn, start_m, N_Q, N_KV, scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    """dq of query rows [start_m, start_m + BLOCK_M) of one (batch, head), from every key; also writes their
    delta = dout . out (float32), which the dkdv kernel reads next (the deterministic scheme runs this pass
    first, so it needs no delta kernel of its own)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(q_base, offs_m, offs_d, sqn, N_Q, HEAD_DIM, D_PAD, True)
    do = _load_rows(do_base, offs_m, offs_d, sdon, N_Q, HEAD_DIM, D_PAD, True)
    o = _load_rows(o_base, offs_m, offs_d, son, N_Q, HEAD_DIM, D_PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # padded rows: 0
    tl.store(delta_row + offs_m, delta, mask=offs_m < N_Q)
    lse2 = tl.load(lse_row + offs_m, mask=offs_m < N_Q, other=float("inf")) * LOG2E
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, svn, offs_d, 0, n_full,
                   N_KV, qk_scale, HEAD_DIM, D_PAD, BLOCK_N, False, TMA_LOAD)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, svn, offs_d, n_full, N_KV,
                   N_KV, qk_scale, HEAD_DIM, D_PAD, TAIL_N, True, TMA_LOAD)
    _store_rows(dq_base, (dq * scale).to(dq_base.dtype.element_ty), offs_m, offs_d, sdqn, N_Q, HEAD_DIM, D_PAD)


@triton.jit(do_not_specialize=["N_Q", "N_KV"])
def _bwd_dq_kernel(Q, K, V, DO, O, LSE, DELTA, DQ,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sob, soh, son, sdqb, sdqh, sdqn,
                   H, N_Q, N_KV, scale, K_DESC, V_DESC,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    o_base = O + b * sob + h * soh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq_base = DQ + b * sdqb + h * sdqh
    lse_row = LSE + (b * H + h) * N_Q
    delta_row = DELTA + (b * H + h) * N_Q
    if TAIL_M < BLOCK_M and start_m + BLOCK_M > N_Q:  # the partial last query tile, in a TAIL_M-row tile
        _dq_rows(q_base, do_base, o_base, k_base, v_base, dq_base, lse_row, delta_row, K_DESC, V_DESC, sqn,
                 sdon, son, skn, svn, sdqn, start_m, N_Q, N_KV, scale, HEAD_DIM, D_PAD, TAIL_M, BLOCK_N, TAIL_N,
                 TMA_LOAD)
    else:
        _dq_rows(q_base, do_base, o_base, k_base, v_base, dq_base, lse_row, delta_row, K_DESC, V_DESC, sqn,
                 sdon, son, skn, svn, sdqn, start_m, N_Q, N_KV, scale, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, TAIL_N,
                 TMA_LOAD)


@triton.jit
def _dq_ds_inner(dq, ds_base, k_base, k_desc, sdsn, skn, offs_m, offs_d, start, end, N_KV,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr,
                 MASK_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = _row_ptrs(ds_base, offs_n, offs_m, sdsn)
        if MASK_M or MASK_N:  # past N_KV there is no row; the buffer's row ends at sdsn (zeros past N_Q)
            ds_t = tl.load(ptrs, mask=(offs_n < N_KV)[:, None] & (offs_m < sdsn)[None, :], other=0.0)
        else:
            ds_t = tl.load(ptrs)
        k = _load_tile(k_base, k_desc, start_n, offs_n, offs_d, skn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        dq += tl.dot(tl.trans(ds_t), k)
    return dq


@triton.jit
def _dq_ds_inner_fold(dq, dq2, ds_base, k_base, k_desc, sdsn, skn, offs_m, offs_t, offs_d, start, end, N_KV,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                      TMA_LOAD: tl.constexpr):
    """:func:`_dq_ds_inner` for the last full query tile (offs_m) and the tail after it (offs_t, masked at the
    buffer's row length), each K tile loaded once for both (``Tile.fold_tail``)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK_N:
            ds_t = tl.load(_row_ptrs(ds_base, offs_n, offs_m, sdsn), mask=(offs_n < N_KV)[:, None], other=0.0)
        else:
            ds_t = tl.load(_row_ptrs(ds_base, offs_n, offs_m, sdsn))
        ds_t2 = tl.load(_row_ptrs(ds_base, offs_n, offs_t, sdsn), mask=(offs_n < N_KV)[:, None] &
                        (offs_t < sdsn)[None, :], other=0.0)
        k = _load_tile(k_base, k_desc, start_n, offs_n, offs_d, skn, N_KV, HEAD_DIM, D_PAD, BLOCK_N, MASK_N, TMA_LOAD)
        dq += tl.dot(tl.trans(ds_t), k)
        dq2 += tl.dot(tl.trans(ds_t2), k)
    return dq, dq2


@triton.jit
def _dq_ds_rows_fold(ds_base, k_base, dq_base, k_desc, sdsn, skn, sdqn, start_m, N_Q, N_KV, scale,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr):
    """:func:`_dq_ds_rows` for the last full query tile and the TAIL_M-row tail after it in one pass over the
    keys (``Tile.fold_tail``)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_t = start_m + BLOCK_M + tl.arange(0, TAIL_M)
    offs_d = tl.arange(0, D_PAD)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dq2 = tl.zeros([TAIL_M, D_PAD], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    dq, dq2 = _dq_ds_inner_fold(dq, dq2, ds_base, k_base, k_desc, sdsn, skn, offs_m, offs_t, offs_d, 0, n_full,
                                N_KV, HEAD_DIM, D_PAD, BLOCK_N, False, TMA_LOAD)
    dq, dq2 = _dq_ds_inner_fold(dq, dq2, ds_base, k_base, k_desc, sdsn, skn, offs_m, offs_t, offs_d, n_full, N_KV,
                                N_KV, HEAD_DIM, D_PAD, TAIL_N, True, TMA_LOAD)
    _store_rows(dq_base, (dq * scale).to(dq_base.dtype.element_ty), offs_m, offs_d, sdqn, N_Q, HEAD_DIM, D_PAD)
    _store_rows(dq_base, (dq2 * scale).to(dq_base.dtype.element_ty), offs_t, offs_d, sdqn, N_Q, HEAD_DIM, D_PAD)


@triton.jit
def _dq_ds_rows(ds_base, k_base, dq_base, k_desc, sdsn, skn, sdqn, start_m, N_Q, N_KV, scale,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_N: tl.constexpr, MASK_M: tl.constexpr, TMA_LOAD: tl.constexpr):
    """dq = scale * dS K for query rows [start_m, start_m + BLOCK_M) of one (batch, head), from the dS^T tiles
    that the dkdv kernel stored (``Tile.store_ds``): one matmul per key tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    dq = _dq_ds_inner(dq, ds_base, k_base, k_desc, sdsn, skn, offs_m, offs_d, 0, n_full, N_KV,
                      HEAD_DIM, D_PAD, BLOCK_N, MASK_M, False, TMA_LOAD)
    dq = _dq_ds_inner(dq, ds_base, k_base, k_desc, sdsn, skn, offs_m, offs_d, n_full, N_KV, N_KV,
                      HEAD_DIM, D_PAD, TAIL_N, MASK_M, True, TMA_LOAD)
    _store_rows(dq_base, (dq * scale).to(dq_base.dtype.element_ty), offs_m, offs_d, sdqn, N_Q, HEAD_DIM, D_PAD)


@triton.jit(do_not_specialize=["N_Q", "N_KV"])
def _bwd_dq_ds_kernel(DS, K, DQ, sdsb, sdsh, sdsn, skb, skh, skn, sdqb, sdqh, sdqn, N_Q, N_KV, scale, K_DESC,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, TMA_LOAD: tl.constexpr, FOLD_TAIL: tl.constexpr):
    """dq of the stored-dS scheme (``Tile.store_ds``): DS is the (B, H, N_KV, >= N_Q) buffer of dS^T, K_DESC
    None or with ``TMA_LOAD`` a descriptor of K. ``FOLD_TAIL``: as the forward's (``Tile.fold_tail``)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    ds_base = DS + b * sdsb + h * sdsh
    k_base = K + b * skb + h * skh
    dq_base = DQ + b * sdqb + h * sdqh
    if FOLD_TAIL and start_m + 2 * BLOCK_M > N_Q:  # the last program: its full tile and the tail after it
        _dq_ds_rows_fold(ds_base, k_base, dq_base, K_DESC, sdsn, skn, sdqn, start_m, N_Q, N_KV, scale, HEAD_DIM,
                         D_PAD, BLOCK_M, TAIL_M, BLOCK_N, TAIL_N, TMA_LOAD)
    elif start_m + BLOCK_M > N_Q:  # the partial last query tile: TAIL_M rows (BLOCK_M without the split), masked
        _dq_ds_rows(ds_base, k_base, dq_base, K_DESC, sdsn, skn, sdqn, start_m, N_Q, N_KV, scale, HEAD_DIM, D_PAD,
                    TAIL_M, BLOCK_N, TAIL_N, True, TMA_LOAD)
    else:
        _dq_ds_rows(ds_base, k_base, dq_base, K_DESC, sdsn, skn, sdqn, start_m, N_Q, N_KV, scale, HEAD_DIM, D_PAD,
                    BLOCK_M, BLOCK_N, TAIL_N, False, TMA_LOAD)


# ---------------------------------------------------------------------------------------------------------
# Launchers


def _rows_fit_int32(t: Tensor) -> bool:
    """Inside one (batch, head) slice the kernels offset rows in int32: (N - 1) * stride + D < 2^31.

    (Batch and head offsets are int64 in the kernels.) A fused projection's (B, N, 3, H, D) layout passes
    2^31 at N * 3 * H * D, e.g. N = 87k tokens at H * D = 8192; int32 would wrap to a wrong address there.
    """
    return (t.shape[2] - 1) * t.stride(2) + t.shape[3] < 2**31


def _rows_aligned(t: Tensor) -> bool:
    """Every row of t (B, H, N, D) starts 16 bytes aligned: its base and its batch, head and row strides are
    multiples of 16 bytes (the stride of a size-1 dim multiplies index 0 only: it does not count)."""
    (b, h, n, _), (sb, sh, sn, _) = t.shape, t.stride()
    step = 16 // t.element_size()
    # Written out rather than as a loop over the dims: this runs for every input of every launch, on the
    # host-bound path of an eager call (a generator over zip() cost 1.2 us here, this 0.4 us).
    return (t.data_ptr() % 16 == 0 and (b == 1 or sb % step == 0) and (h == 1 or sh % step == 0)
            and (n == 1 or sn % step == 0))


def _kernel_takes(t: Tensor) -> bool:
    """The kernels index the head dim without a stride, rows with int32 offsets, and tell the compiler that
    rows start 16 bytes aligned (``_row_ptrs``: vectorised loads). Contiguous rows fit int32 up to
    N * D < 2^31, which the op checks, and start aligned as D % 8 == 0; slices of a fused qkv projection
    qualify."""
    return t.stride(3) == 1 and _rows_fit_int32(t) and _rows_aligned(t)


def _kernel_layout(t: Tensor) -> Tensor:
    """``t``, or a copy in a layout the kernels take (:func:`_kernel_takes`; the rare other layouts)."""
    if _kernel_takes(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)  # a copy even of a contiguous view 2 bytes off


def _strides3(t: Tensor) -> tuple[int, ...]:
    return t.stride()[:3]


def _run(kernel, grid_of, tiles: Sequence[Tile], args: tuple, constexprs: dict, n_q: int, n_kv: int,
         per_tile: Optional[Callable[[Tile], dict]] = None) -> Tile:
    """Launch with the first tile that fits the GPU (shared memory, registers); return the one used.
    ``per_tile(tile)``: keyword arguments that depend on the tile (the dq descriptor's box)."""
    errors = []
    for tile in tiles:
        try:
            extra = per_tile(tile) if per_tile is not None else {}
            kernel[grid_of(tile)](*args, **tile.constexprs(n_q, n_kv), num_warps=tile.num_warps,
                                  num_stages=tile.num_stages, **constexprs, **extra)
            return tile
        except _OUT_OF_RESOURCES as exc:  # a tile too big for this GPU: try the next candidate
            errors.append(f"{tile}: {exc}")
    raise RuntimeError("seer_kernels.attention: no candidate tile fits this GPU:\n" + "\n".join(errors))


try:  # where Triton 3.x raises "shared memory / registers exceeded" at the first launch of a variant
    from triton.runtime.errors import OutOfResources as _OUT_OF_RESOURCES
except ImportError:  # pragma: no cover
    _OUT_OF_RESOURCES = getattr(triton.runtime, "OutOfResources", ())


try:  # Triton 3.4+: host tensor descriptors and their reductions (torch 2.6-2.7 bring older Tritons)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
    if not hasattr(getattr(tl.core, "tensor_descriptor_base", None), "atomic_add"):
        _TensorDescriptor = None
except ImportError:  # pragma: no cover
    _TensorDescriptor = None

_TMA_DEVICES: dict = {}


def _tma_off() -> bool:
    """This Triton has no tensor descriptors, or SEER_KERNELS_TMA=0 turns the TMA features off (read per call:
    only tiles with such a feature ask)."""
    return _TensorDescriptor is None or os.environ.get("SEER_KERNELS_TMA") == "0"


def _tma_gpu(t: Tensor) -> bool:
    """t is on an NVIDIA GPU with a TMA unit (compute capability 9.0 or newer; ROCm reports 9.x for MI300)."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _TMA_DEVICES.get(index)
    if ok is None:
        ok = _TMA_DEVICES[index] = torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9
    return ok


def tma_reduce_ok(t: Tensor) -> bool:
    """Whether ``Tile.dq_tma`` runs as a TMA reduction on t's device: a GPU of compute capability 9.0 or
    newer (the TMA unit) and a Triton with tensor descriptors; on the CPU, a Triton interpreter that can
    emulate the descriptor reduction (``seer_kernels.testing.emulate_descriptor_reduce``, for tests)."""
    if _tma_off():
        return False
    if t.is_cuda:
        return _tma_gpu(t)
    from triton.runtime import interpreter
    return hasattr(interpreter.InterpreterBuilder, "create_descriptor_reduce")


def tma_load_ok(t: Tensor) -> bool:
    """Whether ``Tile.tma_load`` loads through descriptors on t's device: as ``tma_reduce_ok``; Triton's
    interpreter loads through descriptors itself (by pointers, with the unit's zero padding)."""
    return not _tma_off() and (not t.is_cuda or _tma_gpu(t))


def _row_descriptor(t: Tensor, rows: int) -> object:
    """t (B, H, N, D), unit stride on D, as a descriptor with (1, 1, rows, D_PAD) boxes; None where the TMA
    unit cannot address it: its base and its batch, head and row strides must be multiples of 16 bytes
    (true for slices of a fused qkv projection when H * D is a multiple of 8). Columns past D read as 0.
    The stride of a size-1 dim is never used; it is set to 16 bytes so that it cannot refuse the tensor."""
    step = 16 // t.element_size()
    strides = [st if size > 1 else step for st, size in zip(t.stride()[:3], t.shape[:3])] + [1]
    if not _rows_aligned(t) or any(st <= 0 for st in strides[:3]):
        return None
    return _TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, d_pad(t.shape[3])])


def _tma_loads(tile: Tile, rows: int, **tensors: Tensor) -> dict:
    """Kernel arguments for the loop loads: descriptors (``Tile.tma_load`` where every tensor allows it) or
    None, and the TMA_LOAD constexpr."""
    if tile.tma_load and tma_load_ok(next(iter(tensors.values()))):
        descs = {name: _row_descriptor(t, rows) for name, t in tensors.items()}
        if all(d is not None for d in descs.values()):
            return dict(descs, TMA_LOAD=True)
    return dict(dict.fromkeys(tensors), TMA_LOAD=False)


def _dq_descriptor(dq_acc: Tensor, block_m: int) -> object:
    """dq_acc (B, H, N, D) float32, contiguous, as a (B * H, N, D) descriptor with (1, block_m, D_PAD) boxes.

    Rows past N and columns past D fall outside the tensor: the TMA unit drops them, so one (batch, head)
    never adds into the next. Row strides are D * 4 bytes, a multiple of 16 as TMA needs (D % 8 == 0)."""
    B, H, N, D = dq_acc.shape
    return _TensorDescriptor(dq_acc.view(B * H, N, D), [B * H, N, D], [N * D, D, 1], [1, block_m, d_pad(D)])


def _ds_descriptor(ds: Tensor, block_n: int, block_m: int) -> object:
    """The stored-dS scheme's buffer (B, H, N_KV, ds_cols(N_Q)) as a (B * H, N_KV, ds_cols) descriptor with
    (1, block_n, block_m) boxes: rows past N_KV and columns past the buffer's are dropped by the unit."""
    B, H, NK, C = ds.shape
    return _TensorDescriptor(ds.view(B * H, NK, C), [B * H, NK, C], [NK * C, C, 1], [1, block_n, block_m])


_CANDIDATES: dict = {}


def _candidates(table: dict, head_dim: int, tile: Optional[Tile]) -> tuple[Tile, ...]:
    """The class's candidate tiles, ``tile`` (the selector's) first. Memoised per (candidate tuple, tile):
    Tile equality is a dataclass comparison of 8 fields, and the list is the same on every call of a shape."""
    rest = table[tile_class(head_dim)]
    key = (id(rest), tile)
    hit = _CANDIDATES.get(key)
    if hit is not None and hit[0] is rest:  # the tuple itself, not a new one that reuses its id
        return hit[1]
    got = (tile,) + tuple(t for t in rest if t != tile) if tile is not None else tuple(rest)
    _CANDIDATES[key] = (rest, got)
    return got


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, tile: Optional[Tile] = None
                  ) -> tuple[Tensor, Tensor]:
    """out (B, H, Nq, D) on (B, Nq, H, D) memory, lse (B, H, Nq) float32."""
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    out, lse = new_out(q, v), new_lse(q)
    if scale < 0:  # the kernel's running max needs scale >= 0: (q, scale) and (-q, -scale) give the same scores
        q, scale = _kernel_layout(q.neg()), -scale
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    # out's (B, N, H, D) rows are H * D apart: past int32 row offsets, write (B, H, N, D) rows and copy.
    dst = out if _rows_fit_int32(out) else torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    with _on_device(q):
        _run(_fwd_kernel, lambda t: (query_programs(t, NQ), H, B), _candidates(FWD_TILES, D, tile),
             (q, k, v, dst, lse, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dst), H, NQ, NK,
              float(scale)),
             dict(HEAD_DIM=D, D_PAD=d_pad(D)), NQ, NK,
             lambda t: dict(_tma_loads(t, t.block_n, K_DESC=k, V_DESC=v), FOLD_TAIL=fold_active(t, NQ)))
        if dst is not out:
            out.copy_(dst)
    return out, lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                  deterministic: bool, dkdv_tile: Optional[Tile] = None, dq_tile: Optional[Tile] = None,
                  grads: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous; or ``grads``, written in place: e.g. the slices of one fused dqkv buffer,
    which the kernels write through their strides where the layout lets them, else by a copy at the end).
    ``deterministic``: no atomics: dq by its own pass, or from a stored dS where ``dkdv_tile.store_ds`` and
    ``ds_fits``; otherwise dq by float32 atomics."""
    with _on_device(q):
        if grads is None:
            return _bwd(dout, q, k, v, out, lse, scale, deterministic, dkdv_tile, dq_tile, None)
        for name, g, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
            if g.shape != like.shape or g.dtype != like.dtype or g.device != like.device:
                raise ValueError(f"attention_bwd: argument 'grads' must hold dq, dk, dv shaped as q, k, v; its {name} "
                                 f"is {tuple(g.shape)} {g.dtype} on {g.device}, expected {tuple(like.shape)} "
                                 f"{like.dtype} on {like.device}")
        # Written through their strides where the kernels take the layout and no two elements share memory
        # (an expanded dim, stride 0, would have several programs write one element).
        direct = all(_kernel_takes(g) and all(st != 0 or n == 1 for st, n in zip(g.stride(), g.shape))
                     for g in grads)
        got = _bwd(dout, q, k, v, out, lse, scale, deterministic, dkdv_tile, dq_tile, grads if direct else None)
        if not direct:
            for g, x in zip(grads, got):
                g.copy_(x)
        return grads


def ds_fits(n_q: int, n_kv: int, head_dim: int) -> bool:
    """Whether the stored-dS scheme (``Tile.store_ds``) may run: its dS^T buffer, N_kv x ``ds_cols(N_q)``
    elements per (batch, head), is at most ``DS_MAX_RATIO`` times the size of q, k and v together (self-
    attention at D = 128 up to N = 1536, at D = 64 up to N = 768; ViT lengths are far below), and its rows
    fit int32 offsets.
    Elsewhere the deterministic scheme computes dq in its own pass."""
    elems = n_kv * ds_cols(n_q)
    return elems <= DS_MAX_RATIO * head_dim * (n_q + 2 * n_kv) and elems < 2**31


def ds_cols(n_q: int) -> int:
    """Row length of the dS^T buffer: N_q rounded up to 16 elements, so that rows start 32-byte aligned and
    the compiler, which sees the stride divisible by 16, vectorises the loads and stores."""
    return cdiv(n_q, 16) * 16


def _bwd(dout, q, k, v, out, lse, scale, deterministic, dkdv_tile, dq_tile, grads):
    """``grads``: (dq, dk, dv) for the kernels to write (a layout they take), or None to allocate them."""
    dout, q, k, v, out = (_kernel_layout(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    dev = q.device
    cx = dict(HEAD_DIM=D, D_PAD=d_pad(D))

    def new_grad(i, like):
        return grads[i] if grads is not None else torch.empty(like.shape, dtype=like.dtype, device=dev)
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=dev)
    common = (H, NQ, NK, float(scale))
    # The stored-dS scheme where the table's (or the caller's) dkdv tile asks for it and the buffer is small.
    store_ds = deterministic and dkdv_tile is not None and dkdv_tile.store_ds and ds_fits(NQ, NK, D)
    if deterministic and not store_ds and dkdv_tile is not None and dkdv_tile.store_ds:
        dq_tile = None  # that pair's dq tile is the dq-from-dS kernel's: the dq pass takes its own candidates
    ds = torch.empty((B, H, NK, ds_cols(NQ)), dtype=q.dtype, device=dev) if store_ds else delta  # else unused
    ds_strides = _strides3(ds) if store_ds else (0, 0, 0)
    # The float32 buffer the atomics add dq into; without atomics a placeholder that is never read.
    dq_acc = delta if deterministic else torch.empty(q.shape, dtype=torch.float32, device=dev)
    acc_strides = (0, 0, 0) if deterministic else _strides3(dq_acc)
    if deterministic and not store_ds:  # the dq pass first: it writes delta as it goes
        dq = new_grad(0, q)
        _run(_bwd_dq_kernel, lambda t: (cdiv(NQ, t.block_m), H, B), _candidates(DQ_TILES, D, dq_tile),
             (q, k, v, dout, out, lse, delta, dq, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout),
              *_strides3(out), *_strides3(dq), *common),
             cx, NQ, NK, lambda t: _tma_loads(t, t.block_n, K_DESC=k, V_DESC=v))
    else:  # delta first; with atomics the delta kernel also zeroes dq_acc
        _bwd_delta_kernel[(cdiv(NQ, DELTA_BLOCK), H, B)](
            out, dout, delta, dq_acc, *_strides3(out), *_strides3(dout), *acc_strides, H, NQ,
            BLOCK_M=DELTA_BLOCK, ZERO_DQ=not deterministic, **cx)
    dk, dv = new_grad(1, k), new_grad(2, v)

    def dq_traffic_and_loads(tile):
        loads = dict(_tma_loads(tile, tile.block_m, Q_DESC=q, DO_DESC=dout), DQ_DESC=None, DQ_TMA=False,
                     DS_DESC=None, DS_TMA=False)
        if not tile.dq_tma or B * H >= 2**31:  # TMA coordinates are int32
            return loads
        if not deterministic and tma_reduce_ok(q):
            return dict(loads, DQ_DESC=_dq_descriptor(dq_acc, tile.block_m), DQ_TMA=True)
        if store_ds and tma_load_ok(q):  # the unit stores as it loads (the interpreter too)
            return dict(loads, DS_DESC=_ds_descriptor(ds, tile.block_n, tile.block_m), DS_TMA=True)
        return loads

    _run(_bwd_dkdv_kernel, lambda t: (cdiv(NK, t.block_n), H, B), _candidates(DKDV_TILES, D, dkdv_tile),
         (q, k, v, dout, lse, delta, dk, dv, dq_acc, ds, *_strides3(q), *_strides3(k), *_strides3(v),
          *_strides3(dout), *_strides3(dk), *_strides3(dv),
          *acc_strides, *ds_strides, *common),
         dict(ATOMIC_DQ=not deterministic, STORE_DS=store_ds, **cx), NQ, NK, dq_traffic_and_loads)
    if store_ds:  # dq = scale * dS K from the buffer, any candidate dq tile (all fit this one-matmul kernel)
        dq = new_grad(0, q)
        _run(_bwd_dq_ds_kernel, lambda t: (query_programs(t, NQ), H, B), _candidates(DQ_TILES, D, dq_tile),
             (ds, k, dq, *ds_strides, *_strides3(k), *_strides3(dq), NQ, NK, float(scale)),
             cx, NQ, NK, lambda t: dict(_tma_loads(t, t.block_n, K_DESC=k), FOLD_TAIL=fold_active(t, NQ)))
    elif not deterministic:  # dq = scale * dq_acc in q's dtype: one elementwise kernel, like .to() alone
        dq = torch.mul(dq_acc, float(scale), out=new_grad(0, q))
    return dq, dk, dv
