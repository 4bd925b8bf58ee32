r"""The data order: a seeded permutation per epoch, consumed in global batches, whose position is checkpointed.

Epoch e visits the N images in the order perm_e(0), perm_e(1), ..., perm_e(N-1), where perm_e is a
pseudo-random permutation keyed by (seed, e). Each step consumes the next G = B x W positions (B images
per data-parallel rank, W ranks); rank r takes positions [r B, (r + 1) B) of the step's block. An epoch
ends when fewer than G positions remain (they are dropped, as DistributedSampler(drop_last=True) does).

The state is (epoch, offset), offset = positions consumed in the epoch. Because it counts *global*
positions, a run resumed with a different number of ranks continues with exactly the images not yet
seen in the epoch; only which rank gets which of them, and where the epoch's last partial block is
cut, change.

perm_e is a 4-round Feistel network on [0, 2^{2h}) (2^{2h} >= N) with cycle walking: a bijection computed
per position in O(1) memory, so 10^9 images need no 8 GB index permutation. Round function:
F_k(x) = splitmix64(x xor k) masked to h bits.
"""
from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, a well-mixed 64-bit hash, on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, epoch, index)): distinct inputs give unrelated seeds."""
    h = np.uint64(0x243F6A8885A308D3)
    for v in values:
        h = splitmix64(np.asarray([h ^ np.uint64(int(v) & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
    return int(h) & ((1 << 63) - 1)


def feistel_permutation(positions: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """perm(positions) for a keyed pseudo-random bijection of [0, n) (module doc)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return positions.astype(np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(mix_seed(key, r)) for r in range(rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = encrypt(positions)
    todo = out >= np.uint64(n)
    while todo.any():  # cycle walking: the domain is < 4n, so this takes few rounds
        out[todo] = encrypt(out[todo])
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


class ResumableSampler:
    """Global-batch data order with a checkpointable position (module doc).

    Args:
        n: dataset size.
        batch_size: B, images per data-parallel rank per step.
        world: W, data-parallel ranks.
        rank: this rank's data-parallel index.
        seed: keys the permutations.
        shuffle: False visits 0..N-1 in order every epoch.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"ResumableSampler: rank {rank} outside [0, {world})")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world
        if n < self.global_batch:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch (data.batch_size={batch_size} "
                             f"x {world} data-parallel ranks = {self.global_batch}); lower data.batch_size or add "
                             f"images")
        self.epoch = 0
        self.offset = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def order(self, epoch: int, start: int, count: int) -> np.ndarray:
        """Dataset indices at positions [start, start + count) of epoch ``epoch``."""
        positions = np.arange(start, start + count, dtype=np.uint64)
        if not self.shuffle:
            return positions.astype(np.int64)
        return feistel_permutation(positions, self.n, mix_seed(self.seed, epoch))

    def _roll(self, epoch: int, offset: int) -> tuple[int, int]:
        if offset + self.global_batch > self.n:
            return epoch + 1, 0
        return epoch, offset

    def batch_at(self, epoch: int, offset: int) -> list[tuple[int, int]]:
        """This rank's (epoch, index) pairs for the step starting at global position ``offset``."""
        start = offset + self.rank * self.batch_size
        return [(epoch, int(i)) for i in self.order(epoch, start, self.batch_size)]

    def iter_batches(self):
        """This rank's batches from the current position on, forever (a DataLoader ``batch_sampler``). The
        loader prefetches ahead; the checkpointed position moves only through :meth:`advance`."""
        epoch, offset = self._roll(self.epoch, self.offset)
        while True:
            yield self.batch_at(epoch, offset)
            epoch, offset = self._roll(epoch, offset + self.global_batch)

    def position(self) -> tuple[int, int]:
        """(epoch, global offset) of the next batch to be consumed."""
        return self._roll(self.epoch, self.offset)

    def current_epoch(self) -> int:
        """The epoch of the next batch to be consumed."""
        return self.position()[0]

    def advance(self) -> None:
        """One global batch consumed (called by the trainer once per step)."""
        epoch, offset = self._roll(self.epoch, self.offset)
        self.epoch, self.offset = self._roll(epoch, offset + self.global_batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"the checkpoint's data position is for {state['n']} images, the dataset now has {self.n}:"
                             f" the data index changed (resume needs the same data.source and OUT/data index)")
        if "seed" in state and int(state["seed"]) != self.seed:  # another order: the epoch's rest would repeat
            raise ValueError(f"the checkpoint's data order was drawn with train.seed={state['seed']}, this run has "
                             f"train.seed={self.seed}: resume with the same seed (another one would repeat and skip "
                             f"images in the current epoch), or give a run with this seed another --out")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class _BatchSampler:
    """Adapter so that torch's DataLoader can take :meth:`ResumableSampler.iter_batches` as batch_sampler."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self):
        return self.sampler.iter_batches()

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 1 << 62
