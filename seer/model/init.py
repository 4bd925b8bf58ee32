"""Weight initialisation, separate from construction so that a model built on the meta device (no memory)
can be materialised (``to_empty``) and initialised afterwards, shard by shard.

Rules (timm's ViT scheme): Linear and patch-projection weights ~ N(0, std^2) truncated at +-2 std, biases 0;
norm weights 1 and biases 0; LayerScale gamma = its init value; class token ~ N(0, 1e-12); position
embedding ~ truncated N(0, std^2). Inside a module that sets ``torch_default_init`` (the SwAV head, whose
reference code keeps PyTorch's defaults, seer_spec.md 1.5) Linear weights and biases are PyTorch's default
instead, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the fan-in of the whole, unsplit layer.

With a seed, every tensor gets its own generator seeded from (seed, parameter name, shard coordinates), so the
result does not depend on module order or on the global RNG, and each tensor-parallel or FSDP shard draws its
own values: the sharded, meta-built 10B model is initialised on every rank at once without ever holding a
full tensor. With ``seed=None`` an unsharded model draws from the global torch generator, as any PyTorch
module does; a sharded one (tensor-parallel layers or DTensor parameters) takes that keyed path with one seed
drawn from the global generator, because drawing shards straight from the global generator would give every
shard the same values on ranks whose generators agree (as they do inside a tensor-parallel group).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (an alias of its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_key(module: nn.Module, name: str, param: Tensor) -> str:
    parts = []
    if name in getattr(module, "tp_split_params", ()):
        parts.append(f"tp{module.tp_rank}")
    if isinstance(param, DTensor):
        coord = param.device_mesh.get_coordinate() or []
        parts.append("mesh" + ",".join(str(c) for c in coord))
    return "/".join(parts)


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


@torch.no_grad()
def _init_tensor(module: nn.Module, name: str, t: Tensor, std: float, gen: Optional[torch.Generator]) -> None:
    if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
        t.fill_(1.0 if name == "weight" else 0.0)
    elif name == "bias":
        t.zero_()
    elif name == "gamma" and hasattr(module, "init_value"):
        t.fill_(module.init_value)
    elif name == "cls_token":
        t.normal_(0.0, 1e-6, generator=gen)
    else:  # Linear / Conv weights, position embedding
        nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=gen)


def _full_fan_in(module: nn.Module) -> int:
    """in_features of the whole layer: a row-parallel shard holds 1/tp of them."""
    tp = getattr(module, "tp_size", 1) if getattr(module, "tp_split_dim", 0) == 1 else 1
    return module.in_features * tp


def _is_sharded(model: nn.Module) -> bool:
    return any(getattr(m, "tp_size", 1) > 1 for m in model.modules()) or \
        any(isinstance(p, DTensor) for p in model.parameters())


def _drawn_seed() -> int:
    """One seed from the global generator (so torch.manual_seed makes it reproducible), rank 0's under
    torch.distributed."""
    seed = int(torch.randint(0, 2 ** 62, (), device="cpu").item())  # the CPU generator, whatever the default device
    # Ranks' generators need not agree (seed_parallel_rng gives each data-parallel rank its own stream on
    # purpose, and any rank-dependent draw before this shifts one), but a replicated tensor must come out
    # the same on every rank: they all use rank 0's draw. Every rank drew one, so their streams stay in step.
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


@torch.no_grad()
def init_weights_(model: nn.Module, *, std: float = 0.02, seed: Optional[int] = None) -> nn.Module:
    """Initialise every parameter (and reset BatchNorm running statistics) of ``model`` in place.

    ``seed=None``: an unsharded model draws from the global generator; a sharded one uses a seed drawn from
    it (module doc). Under torch.distributed that case is a collective over the default group (rank 0's seed
    is broadcast): every rank calls it, as every rank must to initialise its own shards.
    """
    if seed is None and _is_sharded(model):
        seed = _drawn_seed()
    torch_default = {id(m) for top in model.modules() if getattr(top, "torch_default_init", False)
                     for m in top.modules()}
    for mod_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            t = local_tensor(param)
            if t.device.type == "meta":
                continue
            gen = None
            if seed is not None:
                fqn = f"{mod_name}.{name}" if mod_name else name
                gen = _generator(seed, f"{fqn}/{_shard_key(module, name, param)}", t.device)
            if id(module) in torch_default and isinstance(module, nn.Linear):
                bound = _full_fan_in(module) ** -0.5  # nn.Linear.reset_parameters' bound, for weight and bias
                t.uniform_(-bound, bound, generator=gen)
                continue
            _init_tensor(module, name, t, std, gen)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None \
                and module.running_mean.device.type != "meta":
            module.reset_running_stats()
    return model
