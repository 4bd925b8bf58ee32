"""One SwAV training step (forward over global + local crops, loss, backward, LARS step, prototype
renormalisation): our model against a plain eager PyTorch ViT of the same shape, in the same run.

The baseline is what one writes without seer: nn.LayerNorm / nn.Linear blocks with softmax(q k^T) v
attention, the same head, swav's per-pair loss loop with its plain Sinkhorn, and apex-style per-tensor LARC
followed by torch.optim.SGD. ratio = baseline median / ours median.

    train_step:cpu-<shape>      2-core CPU, float32 (gated by bench/floors/cpu.json: ours not slower)
    train_step:gpu-giant-*      one GPU, bf16 autocast, 2x224 + 4x98 crops; with full activation
                                checkpointing (-ac), without (-noac), and without under parallel.compile
                                (-noac-compile); reports model TFLOP/s and MFU (model FLOPs = 3 x forward,
                                seer.plan's formula, against the dense bf16 peak of an H100, 989 TFLOP/s)
"""
from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.bench_sinkhorn import swav_original
from seer.model import VisionTransformer, vit_preset
from seer.optim import build_lars
from seer.parallel import ParallelConfig, ParallelDims, parallelize
from seer.plan import H100_BF16_TFLOPS, forward_flops_per_image
from seer.swav import SwAVHead, SwAVHeadConfig, SwAVModel, normalize_prototypes, swav_loss


# ---------------------------------------------------------------------------------------------------------
# The plain baseline

class PlainBlock(nn.Module):
    def __init__(self, d, heads, m):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PlainViT(nn.Module):
    def __init__(self, cfg, checkpointing=False):
        super().__init__()
        d, self.p, self.g = cfg.embed_dim, cfg.patch_size, cfg.img_size // cfg.patch_size
        self.patch = nn.Conv2d(3, d, self.p, self.p)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.g ** 2, d) * 0.02)
        self.blocks = nn.ModuleList([PlainBlock(d, cfg.num_heads, cfg.mlp_dim) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.checkpointing = checkpointing

    def forward(self, x):
        t = self.patch(x)
        gh, gw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)
        pos = self.pos
        if (gh, gw) != (self.g, self.g):
            grid = pos[:, 1:].reshape(1, self.g, self.g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        x = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + pos
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.checkpointing else blk(x)
        return self.norm(x)[:, 0]


class PlainSwAV(nn.Module):
    def __init__(self, cfg, head: SwAVHeadConfig, checkpointing=False):
        super().__init__()
        self.trunk = PlainViT(cfg, checkpointing)
        dims = [cfg.embed_dim, *head.hidden_dims, head.output_dim]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += ([nn.BatchNorm1d(dims[i + 1])] if head.batch_norm else []) + [nn.ReLU(inplace=True)]
        self.projection = nn.Sequential(*layers)
        self.prototypes = nn.Linear(head.output_dim, head.num_prototypes, bias=False)

    def forward(self, crops):
        feats, start = [], 0
        sizes = [c.shape[-1] for c in crops]
        for end in range(1, len(crops) + 1):  # consecutive crops of one size together, as swav does
            if end == len(crops) or sizes[end] != sizes[start]:
                feats.append(self.trunk(torch.cat(crops[start:end])))
                start = end
        z = F.normalize(self.projection(torch.cat(feats)).float(), dim=1)
        with torch.autocast(z.device.type, enabled=False):
            return self.prototypes(z)


def plain_loss(scores, n_crops, batch, temperature=0.1):
    loss = 0
    for a in (0, 1):
        with torch.no_grad():  # SwAV's Sinkhorn-Knopp, eps 0.05, 3 iterations
            q = swav_original(scores[a * batch:(a + 1) * batch].detach(), 0.05, 3)
        sub = 0
        for v in range(n_crops):
            if v != a:
                sub -= torch.mean(torch.sum(q * F.log_softmax(scores[v * batch:(v + 1) * batch] / temperature, 1), 1))
        loss += sub / (n_crops - 1)
    return loss / 2


class PlainLARC:
    """apex's LARC around torch.optim.SGD, tensor by tensor."""

    def __init__(self, params, lr, weight_decay=1e-6, trust=0.001, eps=1e-8):
        self.params = list(params)
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.wd, self.trust, self.eps = weight_decay, trust, eps

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            wn, gn = torch.norm(p), torch.norm(p.grad)
            if wn != 0 and gn != 0:  # host syncs, as in apex
                eta = self.trust * wn / (gn + wn * self.wd + self.eps)
                p.grad.add_(p, alpha=self.wd).mul_(eta)
        self.sgd.step()

    def zero_grad(self):
        self.sgd.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------
# The two steps

def make_steps(cfg, head, crops, device, *, checkpointing=False, dtype=None, compile=False):
    torch.manual_seed(0)
    with torch.device(device):  # built and initialised where they run (a 1B model inits in ms on a GPU)
        ours = SwAVModel(VisionTransformer(cfg), SwAVHead(cfg.embed_dim, head))
        plain = PlainSwAV(cfg, head, checkpointing)
    parallelize(ours, ParallelDims(ParallelConfig(activation_checkpointing="full" if checkpointing else "none",
                                                  compile=compile), device.split(":")[0], world_size=1))
    normalize_prototypes(ours)
    opt = build_lars(ours, lr=0.3)
    plain_opt = PlainLARC(plain.parameters(), lr=0.3)
    batch, n_crops = crops[0].shape[0], len(crops)
    amp = dict(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None)

    def ours_step():
        with torch.autocast(**amp):
            out = ours(crops)
        swav_loss(out.scores).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        normalize_prototypes(ours)

    def plain_step():
        with torch.autocast(**amp):
            scores = plain(crops)
        plain_loss(scores, n_crops, batch).backward()
        plain_opt.step()
        plain_opt.zero_grad()
        with torch.no_grad():
            plain.prototypes.weight.copy_(F.normalize(plain.prototypes.weight, dim=1))

    return ours_step, plain_step


def _crops(spec, batch, device):
    return [torch.randn(batch, 3, s, s, device=device) for n, s in spec for _ in range(n)]


CPU_CASES = {  # a small ViT (ViT-S width / 4 layers) at 64 px, SwAV head with BatchNorm
    "vits4-64px-2x64+2x32-b16": (vit_preset("small", depth=4, img_size=64), SwAVHeadConfig(
        hidden_dims=[512], output_dim=128, num_prototypes=1024), [(2, 64), (2, 32)], 16),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def bench_train_step_cpu(bench_record, bench_device, case):
    if bench_device != "cpu":
        pytest.skip("CPU case")
    cfg, head, spec, batch = CPU_CASES[case]
    ours, plain = make_steps(cfg, head, _crops(spec, batch, "cpu"), "cpu")
    bench_record("train_step", f"cpu-{case}", {"ours": ours, "plain": plain}, ours="ours", baseline="plain",
                 min_time=1.0, min_rounds=6)


# The compiled case runs last: its first step compiles the blocks (a minute or more), and where the GPU
# check's benchmark time limit stops it, the eager rows are already written.
@pytest.mark.parametrize("checkpointing,compile", [(True, False), (False, False), (False, True)],
                         ids=["ac", "noac", "noac-compile"])
def bench_train_step_gpu(bench_record, bench_device, checkpointing, compile):
    """The largest preset that fits one 80 GB GPU with its plain twin: giant (ViT-g/14, 1.0B), SEER head.

    With full activation checkpointing (``ac``: the forward runs twice, so MFU, which counts 3 x forward, is
    at most 75% of the GPU's busy rate), without it (``noac``: where the activations fit), and without it
    with ``parallel.compile`` (``noac-compile``: every block under torch.compile; the plain twin stays
    eager, as the baseline is what one writes without seer).
    """
    if not bench_device.startswith("cuda"):
        pytest.skip("GPU case")
    cfg = vit_preset("giant")
    head = SwAVHeadConfig(hidden_dims=[8192, 8192], output_dim=256, batch_norm=False, num_prototypes=16384)
    spec, batch = [(2, 224), (4, 98)], 32
    ours = plain = None
    try:
        ours, plain = make_steps(cfg, head, _crops(spec, batch, bench_device), bench_device,
                                 checkpointing=checkpointing, dtype=torch.bfloat16, compile=compile)
        ours(), plain()
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    if not fits:  # outside the except block, so the traceback's frames no longer hold the models
        ours = plain = None
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip("does not fit this GPU")
    flops = 3 * forward_flops_per_image(cfg, head, spec) * batch

    def metrics(t):
        return {"model_tflops": flops / t["ours"].median_s / 1e12,
                "mfu": flops / t["ours"].median_s / (H100_BF16_TFLOPS * 1e12),
                "plain_mfu": flops / t["plain"].median_s / (H100_BF16_TFLOPS * 1e12),
                "images_per_s": batch / t["ours"].median_s}

    label = ("ac" if checkpointing else "noac") + ("-compile" if compile else "")
    row = bench_record("train_step", f"gpu-giant-2x224+4x98-b32-bf16-{label}",
                       {"ours": ours, "plain": plain},
                       ours="ours", baseline="plain", metrics=metrics, min_time=0.0, min_rounds=4, max_rounds=4,
                       warmup=1)
    print(f"\ntrain_step giant ({label}): {row['times_ms']['ours']:.0f} ms/step, "
          f"{row['model_tflops']:.0f} TFLOP/s, "
          f"MFU {100 * row['mfu']:.1f}% (plain eager {100 * row['plain_mfu']:.1f}%)")
