"""What a checkpoint holds, gathered from and restored into the live training objects.

Tensors (sharded by DCP): ``model/<name>`` for every parameter and buffer and ``optim/<name>/<slot>`` for
every optimizer slot (momentum buffer, Adam moments, step). FSDP2 parameters are DTensors, so DCP stores
each data-parallel shard once and reshards on load when the number of data-parallel ranks changed.

Tensor-parallel slices are plain per-rank tensors with the same name on every TP rank; they are stored
under ``<name>@tp<r>`` (one entry per TP rank) together with their split (dimension, fused chunks) in
meta.json, so that :func:`merge_tensor_parallel` can rebuild full tensors (for ``seer.load_pretrained`` and
export). Resuming training therefore needs the same ``parallel.tp``; the data-parallel size may change.

Per-rank state (``rank_*.pt``): torch CPU/CUDA, NumPy and Python RNG states, the TP RNG tracker, the SwAV
queue. With a different number of ranks, new ranks have no file: they reseed from (seed, step, rank) and
start with an empty queue (it refills in queue_length / global batch steps).
"""
from __future__ import annotations

import random
import re
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn



def tp_layout(model: nn.Module) -> dict[str, dict]:
    """{parameter name: {'dim', 'chunks', 'size'}} for every tensor-parallel-split parameter."""
    out = {}
    for mod_name, module in model.named_modules():
        size = getattr(module, "tp_size", 1)
        if size <= 1:
            continue
        for name in getattr(module, "tp_split_params", ()):
            if getattr(module, name, None) is not None:
                fqn = f"{mod_name}.{name}" if mod_name else name
                out[fqn] = {"dim": module.tp_split_dim, "chunks": getattr(module, "tp_chunks", 1), "size": size}
    return out


def _key(fqn: str, layout: dict, tp_rank: int) -> str:
    return f"{fqn}@tp{tp_rank}" if fqn in layout else fqn


def model_tensors(model: nn.Module, tp_rank: int = 0) -> dict[str, Tensor]:
    layout = tp_layout(model)
    return {f"model/{_key(k, layout, tp_rank)}": v for k, v in model.state_dict().items()}


def load_model_tensors(model: nn.Module, loaded: dict[str, Tensor], tp_rank: int = 0,
                       parts: tuple[str, ...] = ()) -> None:
    """Load ``loaded`` (keyed as :func:`model_tensors` keys them) into ``model``; ``parts``: only the
    tensors of these submodules ('backbone', 'head'), the others left as they are (() = every tensor)."""
    layout = tp_layout(model)
    names = [k for k in model.state_dict() if not parts or k.split(".", 1)[0] in parts]
    sd = {k: loaded[f"model/{_key(k, layout, tp_rank)}"] for k in names}
    model.load_state_dict(sd, strict=not parts)


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer, tp_rank: int = 0) -> tuple[dict, dict]:
    """(tensors, slots): slots = {param name: {slot: 'param' | 'scalar:<dtype>'}} to rebuild on load."""
    layout = tp_layout(model)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, slots = {}, {}
    for p, state in opt.state.items():
        fqn = names[id(p)]
        for slot, value in state.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"optimizer state {fqn}/{slot} is not a tensor ({type(value).__name__})")
            tensors[f"optim/{_key(fqn, layout, tp_rank)}/{slot}"] = value
            same = tuple(value.shape) == tuple(p.shape)
            slots.setdefault(fqn, {})[slot] = "param" if same else f"scalar:{str(value.dtype).split('.')[-1]}"
    return tensors, slots


def optimizer_destination(model: nn.Module, opt: torch.optim.Optimizer, slots: dict, tp_rank: int = 0) -> dict:
    """Create the optimizer slots recorded in ``slots`` (zeros shaped and sharded like their parameter)
    and return them keyed as in the checkpoint, for DCP to fill in place."""
    layout = tp_layout(model)
    params = dict(model.named_parameters())
    dest = {}
    for fqn, entries in slots.items():
        if fqn not in params:
            raise KeyError(f"checkpoint has optimizer state for {fqn!r}, which this model does not have")
        p = params[fqn]
        state = opt.state[p]
        for slot, kind in entries.items():
            if kind == "param":
                t = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                t = torch.zeros((), dtype=getattr(torch, kind.split(":", 1)[1]), device="cpu")
            state[slot] = t
            dest[f"optim/{_key(fqn, layout, tp_rank)}/{slot}"] = t
    return dest


# ---------------------------------------------------------------------------------------------------------
# RNG states (as tensors and numbers only, so that weights_only loading accepts them).

def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                        "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Full tensors from a checkpoint written under tensor parallelism.

def merge_tensor_parallel(tensors: dict[str, Tensor], layout: dict[str, dict], prefix: str = "model/") -> dict:
    """{name: full tensor}: entries 'name@tp<r>' concatenated along their split dim (q/k/v blocks in order)."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if "@tp" in name:
            continue
        out[name] = value
    for fqn, info in layout.items():
        parts = [tensors[f"{prefix}{fqn}@tp{r}"] for r in range(info["size"])]
        dim, chunks = info["dim"], info["chunks"]
        if chunks > 1:  # each part is [q_r; k_r; v_r]: regroup as [q_0 .. q_T-1; k_0 ..; v_0 ..]
            split = [p.reshape(chunks, p.shape[0] // chunks, *p.shape[1:]) for p in parts]
            full = torch.cat(split, dim=1)
            out[fqn] = full.reshape(-1, *full.shape[2:])
        else:
            out[fqn] = torch.cat(parts, dim=dim)
    return out


# A transformer block's tensors, named as in a checkpoint ('model/backbone.blocks.3.attn.qkv.weight@tp0'), in
# the SwAV model ('backbone.blocks.3.') or in an export of the backbone ('blocks.3.').
_BLOCK = re.compile(r"^(?:model/)?(?:backbone\.)?blocks\.(\d+)\.")


def tensor_groups(keys: Iterable[str]) -> list[list[str]]:
    """``keys`` in the groups that a load of full tensors reads one at a time, so that a process holds the
    largest group, not the model: first every tensor outside the transformer blocks (embeddings, the final
    norm, the head), then one group per block, in block order; each sorted. A tensor-parallel parameter's
    slices ('@tp<r>') share their name's group, so a group merges on its own (:func:`merge_tensor_parallel`).
    The groups depend on the keys alone: processes that read one index agree on them (collective loads)."""
    groups: dict[int, list[str]] = {}
    for key in sorted(keys):
        m = _BLOCK.match(key)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(key)
    return [groups[g] for g in sorted(groups)]
