r"""``seer plan``: per-GPU memory, FLOPs and communication of one SwAV training step, before renting GPUs.

    seer plan --model vit-10b --gpus 64 --tp 8 --micro-batch 16 --checkpointing full

Parameter counts are exact (the tests compare them with models built on the meta device). Memory and
communication follow how this code runs; activations are estimates (validated on CPU against the tensors
autograd actually saves in a block, with QK-norm, LayerScale, dropout, drop-path, in bf16 and fp32). Model quantities, with d = width, m = MLP width, L = depth,
T = tensor-parallel size, D = dp size, n_c tokens per crop c (patches + class token):

* parameters per GPU: tensor-parallel slices / T + replicated tensors; FSDP divides by D the float32
  master weights, the float32 gradients and the float32 optimizer state (SGD/LARS keeps one moment, AdamW
  two: 4 or 8 bytes per parameter).
* activations per token and block, with a bytes per activation element (2 under bf16/fp16 autocast; in fp32
  the matmuls run in the weights' dtype: 4, or 2 with FSDP's gathered bf16 parameters): the float32 inputs of
  the two norms (8 d: copies of a 16-bit stream, or the float32 stream itself), the inputs of qkv and fc1
  (2 a d), qkv output (3 a d), attention output and projection input (a d + a d; one buffer when the kernel's
  output layout makes the reshape a view), MLP hidden before and after GELU (2 a m), QK-norm's float32 inputs
  (8 d; views of qkv's output when that is float32) and outputs (2 a d); LayerScale keeps its input for
  gamma's gradient (2 a d); dropout its masks after the projection, GELU and fc2 (2 d + m elements of 1 byte:
  CUDA's fused dropout keeps bools; the CPU keeps a scaled mask in the activation dtype); drop-path one scale
  per sequence. With bf16, no LayerScale and no dropout:
  without sequence parallelism  12 d + (10 d + 4 m) / T bytes  (+12 d / T with QK-norm);
  with sequence parallelism     (22 d + 4 m) / T bytes. The residual stream has a's dtype (the patch
  embedding's output; LayerScale and the row-parallel bias compute in it). A checkpointed block keeps only its
  input (a d; / T with sequence parallelism); the final norm keeps its float32 input (4 d, likewise). The SwAV head keeps, per crop and counted as float32, each linear's input, its hidden
  layers' BatchNorm/ReLU inputs and outputs, the normalisation's input and output and 2 K / T of scores.
* FSDP2's working memory per block parameter p (torch's _fully_shard source, read, not measured: a CPU
  allocation trace of FSDP2 under gloo would not show CUDA's stream-ordered allocator): the backward of block
  i holds its gathered parameters and its gradients (both in param_dtype), block i - 1's all-gather buffer
  (explicit backward prefetch), and block i + 1's float32 reduce-scatter input (kept until block i's
  post-backward frees it, one buffer by default): 3 p_b + 4 bytes, p_b = 2 for bfloat16; the forward's peak
  (block i's all-gather buffer kept until block i + 1's copy-out, i + 1's buffer and parameters: 3 p_b) is
  below it. Without resharding after the forward every block stays gathered: (L + 1) p_b + 4. With more than
  one resolution group (R > 1) each block's unsharded parameter is used R times, and autograd sums a leaf's
  gradients over all its uses before it runs the leaf's AccumulateGrad: the backward of the last group
  (run first) leaves every block's param_dtype weight gradient in autograd's buffer and FSDP2's post-backward
  for that group finds no gradient to reduce-scatter; block i's is reduce-scattered only when the first
  group's backward reaches it (seen under gloo). So (L - 1) p_b more wait at the first group's backward. The head's
  gathered projection (p_b) and float32 prototypes (4 / T) are added. Without FSDP, autocast's 16-bit copies
  of the tensor-parallel weights (2 bytes each; none in fp32).
* the optimizer step is a second peak, after the activations are freed: weights, gradients and moments plus
  one float32 temporary per parameter (LARS's update d = eta (g + wd w) and AdamW's sqrt(v) are built for
  every local tensor at once, foreach), so 16 (LARS) or 20 (AdamW) bytes per parameter over D.
* forward FLOPs per token and block: 2 (4 d^2 + 2 d m) + 4 n_c d (attention); training = 3 x forward
  (model FLOPs, used for MFU); recomputation adds one forward of the checkpointed blocks (hardware FLOPs).
* communication per GPU (ring algorithms), in units of u = (T - 1) / T x (tokens x d x 2 bytes), an
  all-gather or reduce-scatter of the bf16 residual stream (an all-reduce is 2 u). Without sequence
  parallelism a block moves 2 all-reduces forward and 2 backward (8 u); with it 2 all-gathers and 2
  reduce-scatters forward (4 u) and, backward, the two re-gathered inputs, the two input-gradient
  reduce-scatters and the two output-gradient all-gathers (6 u), plus once per step the gather after the
  final norm and the backward of the scatter before the first block (2 u). A checkpointed block replays its
  forward's collectives but fc2's (torch's checkpoint stops at the last tensor it saves, fc2's input):
  2 u, or 3 u with sequence parallelism; with LayerScale or dropout, which keep a tensor made after fc2, fc2's
  collective replays too (4 u). u scales with a. FSDP all-gathers param_dtype parameters and
  reduce-scatters float32 gradients once. The trunk runs its blocks once per resolution group R (consecutive
  crops of one size: 2 for 2x224+4x98): resharding, FSDP2 gathers a block for each of those forwards and
  backwards (2 R times), the root (embeddings, final norm) and the head, which run once, twice; without
  resharding the forward's copy serves the first backward and each post-backward reshards, so a block is
  gathered R times, the rest once (counted under gloo).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from .model.config import PRESET_NAMES, UnknownPresetError, ViTConfig, validate_vit_config, vit_preset
from .parallel.config import checkpoint_every, checkpointed_blocks
from .parallel.tensor_parallel import validate_tensor_parallel
from .swav.config import SwAVHeadConfig, seer_head

GiB = 1024 ** 3
H100_BF16_TFLOPS = 989.4  # dense, SXM (perf_anchors.md section 0)
# float32 matmuls without tensor cores: torch leaves TF32 off for them by default, and so does the trainer
H100_FP32_TFLOPS = 67.0
# float32 moments per parameter of each train.optimizer: LARS's momentum; AdamW's exp_avg and exp_avg_sq.
OPTIMIZER_MOMENTS = {"lars": 1, "adamw": 2}
# train.precision's values (its 'auto' is bf16 on the GPUs planned for) and parallel.param_dtype's, in bytes.
PRECISIONS = ("bf16", "fp16", "fp32")
PARAM_DTYPES = {"bfloat16": 2, "float32": 4}


# ---------------------------------------------------------------------------------------------------------
# Parameter counts

@dataclass
class ParamCount:
    """Exact counts. ``split`` tensors are divided over the tensor-parallel ranks, ``replicated`` are not."""
    trunk_split: int
    trunk_replicated: int
    block_split: int
    block_replicated: int
    head_projection: int
    prototypes: int

    @property
    def trunk(self) -> int:
        return self.trunk_split + self.trunk_replicated

    @property
    def head(self) -> int:
        return self.head_projection + self.prototypes

    @property
    def total(self) -> int:
        return self.trunk + self.head

    def per_rank(self, tp: int) -> int:
        """Parameters one tensor-parallel rank holds (before FSDP sharding)."""
        return (self.trunk_split + self.prototypes) // tp + self.trunk_replicated + self.head_projection

    def block_per_rank(self, tp: int) -> int:
        return self.block_split // tp + self.block_replicated


def count_parameters(cfg: ViTConfig, head: Optional[SwAVHeadConfig] = None) -> ParamCount:
    d, m, p, L = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size, cfg.depth
    hd = d // cfg.num_heads
    grid = cfg.img_size // p
    block_split = (3 * d * d + (3 * d if cfg.qkv_bias else 0)   # qkv (column)
                   + d * d                                        # proj weight (row)
                   + d * m + m                                    # fc1 (column)
                   + m * d)                                       # fc2 weight (row)
    block_rep = (2 * d + 2 * d                                    # norm1, norm2
                 + (4 * hd if cfg.qk_norm else 0)                 # q_norm, k_norm
                 + d + d                                          # proj and fc2 biases
                 + (2 * d if cfg.layer_scale_init is not None else 0))
    embed = cfg.in_chans * p * p * d + d + d + (1 + grid * grid) * d + 2 * d  # patch, cls, pos, final norm
    proj = protos = 0
    if head is not None:
        dims = [d, *head.hidden_dims, head.output_dim]
        for i in range(len(dims) - 1):
            proj += dims[i] * dims[i + 1] + dims[i + 1]
            if head.batch_norm and i < len(dims) - 2:
                proj += 2 * dims[i + 1]
        protos = head.output_dim * head.num_prototypes
    return ParamCount(L * block_split, L * block_rep + embed, block_split, block_rep, proj, protos)


# ---------------------------------------------------------------------------------------------------------
# Activations, FLOPs, communication

def element_bytes(precision: str, weight_bytes: int) -> int:
    """Bytes per element of the activations: 2 under bf16/fp16 autocast; in fp32 (no autocast) the matmuls
    run in the weights' dtype, ``weight_bytes`` (4, or 2 for FSDP's gathered bf16 parameters)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return 2 if precision in ("bf16", "fp16") else weight_bytes


def activation_bytes_per_token(cfg: ViTConfig, tp: int, sequence_parallel: bool, element: int = 2,
                               dropout_mask: int = 1) -> float:
    """Bytes autograd keeps per token per (non-checkpointed) block (module doc). ``element``: bytes of an
    activation (2 under bf16/fp16 autocast, 4 in fp32); ``dropout_mask``: bytes of a dropout mask element
    (1: CUDA's fused dropout keeps a bool mask; the CPU's keeps a scaled mask in the activation dtype)."""
    d, m, a = cfg.embed_dim, cfg.mlp_dim, element
    # qkv out, attention out, proj in, MLP hidden before and after GELU
    split = 3 * a * d + a * d + a * d + 2 * a * m
    if cfg.qk_norm:  # float32 copies of q and k (views of qkv's output when that is float32) and the outputs
        split += (8 * d if a < 4 else 0) + 2 * a * d
    norms_in = 4 * d + 4 * d      # float32 inputs of norm1 and norm2 (copies, or the float32 stream itself)
    matmul_in = a * d + a * d     # inputs of qkv and fc1 (the norms' outputs, or their autocast copies)
    # LayerScale keeps its input for gamma's gradient; dropout its masks (after proj, GELU and fc2).
    residual = 2 * a * d if cfg.layer_scale_init is not None else 0
    if cfg.dropout > 0:
        residual += 2 * dropout_mask * d
        split += dropout_mask * m
    # float32 mean/rstd of the norms (and of QK-norm per head), the attention's log-sum-exp per head
    small = 16 + 4 * cfg.num_heads / tp + (16 * cfg.num_heads / tp if cfg.qk_norm else 0)
    if sequence_parallel:
        return (norms_in + matmul_in + residual + split) / tp + small
    return norms_in + matmul_in + residual + split / tp + small


def stored_activation_bytes(cfg: ViTConfig, tokens: int, tp: int, sequence_parallel: bool,
                            checkpointed: int, element: int = 2, dropout_mask: int = 1) -> float:
    """Bytes the trunk keeps for the backward after a forward of ``tokens`` tokens with ``checkpointed``
    blocks recomputed (module doc): their inputs (``element`` bytes each), the other blocks' saved tensors,
    the final norm's float32 input."""
    seq = tp if sequence_parallel else 1
    per_block = activation_bytes_per_token(cfg, tp, sequence_parallel, element, dropout_mask) * tokens
    return (checkpointed * element * cfg.embed_dim * tokens / seq + (cfg.depth - checkpointed) * per_block
            + 4 * cfg.embed_dim * tokens / seq)


def head_activation_bytes(cfg: ViTConfig, head: Optional[SwAVHeadConfig], tp: int) -> float:
    """Bytes the SwAV head keeps per crop (module doc), counted as float32: each linear's input, each hidden
    layer's BatchNorm/ReLU input and output, the normalisation's input and output, the prototype scores and
    the loss's softmax of them (1/T of the prototypes per rank)."""
    if head is None:
        return 0.0
    dims = [cfg.embed_dim, *head.hidden_dims, head.output_dim]
    kept = sum(dims[:-1]) + sum(h * (3 if head.batch_norm else 2) for h in head.hidden_dims) \
        + 2 * head.output_dim + 2 * head.num_prototypes / tp
    return 4 * kept


def resolution_groups(crops: Sequence[tuple[int, int]]) -> list[int]:
    """Sizes of the runs of consecutive crops of one size, each of which goes through the trunk as one batch
    (seer.model.vit): [224, 98] for 2x224+4x98."""
    return [size for i, (_, size) in enumerate(crops) if i == 0 or crops[i - 1][1] != size]


def crop_tokens(cfg: ViTConfig, crops: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[(number of crops, tokens per crop)]."""
    return [(n, (size // cfg.patch_size) ** 2 + 1) for n, size in crops]


def forward_flops_per_image(cfg: ViTConfig, head: Optional[SwAVHeadConfig],
                            crops: Sequence[tuple[int, int]]) -> float:
    d, m, L = cfg.embed_dim, cfg.mlp_dim, cfg.depth
    flops = 0.0
    for n, tokens in crop_tokens(cfg, crops):
        per_token = L * (2 * (4 * d * d + 2 * d * m) + 4 * tokens * d)
        patch = 2 * cfg.in_chans * cfg.patch_size ** 2 * d * (tokens - 1)
        flops += n * (tokens * per_token + patch)
    if head is not None:
        dims = [d, *head.hidden_dims, head.output_dim]
        per_crop = sum(2 * dims[i] * dims[i + 1] for i in range(len(dims) - 1)) + 2 * head.output_dim * \
            head.num_prototypes
        flops += sum(n for n, _ in crops) * per_crop
    return flops


@dataclass
class PlanInput:
    model: ViTConfig
    head: Optional[SwAVHeadConfig]
    gpus: int
    tp: int
    micro_batch: int
    crops: list[tuple[int, int]]
    checkpointing: str = "none"
    sequence_parallel: bool = False
    fsdp: bool = True
    reshard_after_forward: bool = True
    sinkhorn_iterations: int = 3
    optimizer: str = "lars"
    precision: str = "bf16"
    param_dtype: str = "bfloat16"
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 4.0
    peak_tflops: Optional[float] = None  # None: the H100's for the dtype the matmuls run in
    mfu: float = 0.5
    tp_bandwidth_gbps: float = 370.0
    dp_bandwidth_gbps: float = 50.0


def plan(inp: PlanInput) -> dict:
    """Every number of the plan (bytes, FLOPs, seconds) as a flat dict."""
    cfg, tp = inp.model, inp.tp
    if inp.gpus % tp:
        raise ValueError(f"--gpus {inp.gpus} is not divisible by --tp {tp}")
    # In this command's flags, not training's keys (parallel.tp=8 read as a key to set)
    validate_tensor_parallel(cfg, inp.head, tp, said={
        "parallel.tp": "--tp ", "model.num_heads": "the --model's num_heads=",
        "model.mlp_dim": "the --model's mlp_dim=", "head.num_prototypes": "the --head's (or --prototypes) num_prototypes="})
    if not inp.fsdp and inp.gpus // tp > 1:
        # As validate_parallel_config refuses it: data parallelism is FSDP2 here, there is no unsharded
        # (DDP) mode. Planning one would show unsharded model state and no gradient traffic at all.
        raise ValueError(f"--no-fsdp with --gpus {inp.gpus} / --tp {tp} = {inp.gpus // tp} data-parallel ranks: "
                         f"data parallelism is implemented with FSDP2 (training refuses parallel.fsdp=false "
                         f"with dp > 1); drop --no-fsdp, or use --gpus equal to --tp")
    if inp.sequence_parallel:  # as the trainer refuses it (seer.parallel.tensor_parallel's scatter hook)
        odd = [(n, s) for n, s in inp.crops if n * inp.micro_batch % tp]
        if odd:
            n, s = odd[0]
            raise ValueError(f"--micro-batch {inp.micro_batch}: the {n}x{s} crops make {n * inp.micro_batch} "
                             f"sequences per rank, which sequence parallelism cannot split over --tp {tp} (training "
                             f"refuses it); use a micro-batch that makes them a multiple of {tp}, or "
                             f"--no-sequence-parallel")
    if inp.optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_MOMENTS)}, got {inp.optimizer!r}")
    if inp.param_dtype not in PARAM_DTYPES:
        raise ValueError(f"--param-dtype must be one of {', '.join(PARAM_DTYPES)}, got {inp.param_dtype!r}")
    n_ckpt = len(checkpointed_blocks(cfg.depth, inp.checkpointing))
    dp = inp.gpus // tp
    shard = dp if (inp.fsdp and dp > 1) else 1
    pc = count_parameters(cfg, inp.head)
    p_rank = pc.per_rank(tp)
    # The dtypes the step computes in (module doc): FSDP's gathered parameters are in param_dtype, unsharded
    # ones stay float32; without autocast (fp32) the activations follow the weights.
    pb = PARAM_DTYPES[inp.param_dtype] if shard > 1 else 4
    a = element_bytes(inp.precision, pb)

    out: dict = {"model_params": pc.total, "trunk_params": pc.trunk, "head_params": pc.head, "dp": dp, "tp": tp,
                 "global_batch": inp.micro_batch * dp, "params_per_gpu": p_rank / shard}
    out["param_bytes"] = 4 * p_rank / shard
    out["grad_bytes"] = 4 * p_rank / shard
    out["optimizer_bytes"] = 4 * OPTIMIZER_MOMENTS[inp.optimizer] * p_rank / shard  # float32 moments
    if shard > 1:
        # FSDP2's backward peak (module doc): the running block's gathered parameters and its gradients (both
        # in param_dtype), the prefetched block's all-gather buffer, the previous block's float32
        # reduce-scatter input; without resharding every block stays gathered. The head's gathered
        # projection (param_dtype) and float32 prototypes.
        gathered = 2 if inp.reshard_after_forward else cfg.depth
        # With several resolution groups, autograd sums a block's weight gradients over the groups before
        # its post-backward can reduce-scatter them: the later groups' gradients of every other block wait.
        waiting = cfg.depth - 1 if len(resolution_groups(inp.crops)) > 1 else 0
        working = ((gathered + waiting + 1) * pb + 4) * pc.block_per_rank(tp) + 4 * pc.prototypes / tp \
            + pb * pc.head_projection
    elif inp.precision != "fp32":
        working = 2 * (pc.trunk_split / tp + pc.head_projection)  # autocast's 16-bit copies of the weights
    else:
        working = 0.0
    out["working_bytes"] = working

    tokens = sum(n * t for n, t in crop_tokens(cfg, inp.crops)) * inp.micro_batch
    per_block = activation_bytes_per_token(cfg, tp, inp.sequence_parallel, a) * tokens
    stored = stored_activation_bytes(cfg, tokens, tp, inp.sequence_parallel, n_ckpt, a)
    recompute = per_block if n_ckpt else 0.0           # one block re-materialised during its backward
    grad_transient = 2 * 4 * cfg.embed_dim * tokens    # activation gradients in flight (float32)
    images = 4 * cfg.in_chans * inp.micro_batch * sum(n * s * s for n, s in inp.crops)
    out["head_activation_bytes"] = head_activation_bytes(cfg, inp.head, tp) * inp.micro_batch * \
        sum(n for n, _ in inp.crops)
    out["activation_bytes"] = stored + recompute + grad_transient + images + out["head_activation_bytes"]
    out["total_bytes"] = sum(out[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "working_bytes",
                                               "activation_bytes"))
    # The step's foreach temporaries (module doc): measured 4.0 bytes per parameter for both optimizers.
    out["optimizer_step_bytes"] = sum(out[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes")) \
        + 4 * p_rank / shard
    out["peak_bytes"] = max(out["total_bytes"], out["optimizer_step_bytes"])
    out["capacity_bytes"] = (inp.gpu_memory_gib - inp.reserve_gib) * GiB
    out["fits"] = out["peak_bytes"] <= out["capacity_bytes"]

    fwd = forward_flops_per_image(cfg, inp.head, inp.crops) * inp.micro_batch / tp
    trunk_fwd = forward_flops_per_image(cfg, None, inp.crops) * inp.micro_batch / tp
    out["model_flops_per_gpu"] = 3 * fwd
    out["hardware_flops_per_gpu"] = 3 * fwd + trunk_fwd * n_ckpt / cfg.depth
    out["tokens_per_gpu"] = tokens

    act = tokens * cfg.embed_dim * a                   # one activation of the residual stream
    ring = (tp - 1) / tp
    if tp > 1:
        # (units of u per block, per checkpointed block's replay, per step; module doc)
        block, replay, step = (10, 3, 2) if inp.sequence_parallel else (8, 2, 0)
        if cfg.layer_scale_init is not None or cfg.dropout > 0:
            replay = 4  # a tensor saved after fc2 (LayerScale's input, dropout's mask): fc2's collective replays
        out["tp_comm_bytes"] = ring * act * (cfg.depth * block + n_ckpt * replay + step)
    else:
        out["tp_comm_bytes"] = 0.0
    if shard > 1:
        ring_dp = (dp - 1) / dp
        groups = len(resolution_groups(inp.crops))
        # (module doc) the blocks run once per resolution group, the root and the head once per step
        gathers = 2 if inp.reshard_after_forward else 1
        blocks = cfg.depth * pc.block_per_rank(tp)
        rest = p_rank - blocks - pc.prototypes / tp  # (in param_dtype; the prototypes in float32)
        out["fsdp_comm_bytes"] = ring_dp * (gathers * groups * pb * blocks
                                            + gathers * (pb * rest + 4 * pc.prototypes / tp) + 4 * p_rank)
    else:
        out["fsdp_comm_bytes"] = 0.0
    k_local = inp.head.num_prototypes / tp if inp.head is not None else 0
    out["sinkhorn_comm_bytes"] = 2 * (1 + inp.sinkhorn_iterations) * 4 * k_local * 2 if dp * tp > 1 else 0.0
    out["peak_tflops"] = inp.peak_tflops or (H100_FP32_TFLOPS if a == 4 else H100_BF16_TFLOPS)
    out["compute_s_at_mfu"] = out["model_flops_per_gpu"] / (inp.mfu * out["peak_tflops"] * 1e12)
    out["tp_comm_s"] = out["tp_comm_bytes"] / (inp.tp_bandwidth_gbps * 1e9)
    out["fsdp_comm_s"] = out["fsdp_comm_bytes"] / (inp.dp_bandwidth_gbps * 1e9)
    return out


# ---------------------------------------------------------------------------------------------------------
# CLI

def parse_crops(spec: str) -> list[tuple[int, int]]:
    """'2x224+4x98' -> [(2, 224), (4, 98)]."""
    out = []
    for part in spec.replace(",", "+").split("+"):
        try:
            n, size = part.lower().split("x")
            out.append((int(n), int(size)))
        except ValueError:
            raise ValueError(f"--crops: expected NxSIZE[+NxSIZE...] such as 2x224+4x98, got {spec!r}") from None
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise ValueError(f"--crops: counts and sizes must be positive, got {part!r}")
    return out


def default_crops(cfg: ViTConfig) -> str:
    """SEER's 2 global + 4 local crops at patch 14 (224/98), SwAV's 2x224 + 6x96 at patch 16."""
    if cfg.patch_size == 14:
        return "2x224+4x98"
    if cfg.patch_size == 16:
        return "2x224+6x96"
    return f"2x{cfg.img_size}+2x{cfg.img_size // 2 // cfg.patch_size * cfg.patch_size or cfg.patch_size}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seer plan", description="Per-GPU memory, FLOPs and communication of one "
                                 "SwAV training step, and whether it fits the GPU.")
    ap.add_argument("--model", default="vit-10b", help=f"ViT preset: {', '.join(PRESET_NAMES)} (default: %(default)s)")
    ap.add_argument("--gpus", type=int, required=True, help="total number of GPUs (dp x tp)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (inside a node; default: %(default)s)")
    ap.add_argument("--micro-batch", type=int, required=True, help="images per data-parallel rank per step")
    ap.add_argument("--checkpointing", default="none",
                    help="activation checkpointing: none, full, every-N (default: %(default)s)")
    ap.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="sequence parallelism (default: on when --tp > 1; training's parallel.sequence_parallel "
                         "is false unless set, in every preset too)")
    ap.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                    help="shard parameters, gradients and optimizer state over data-parallel ranks (default: on)")
    ap.add_argument("--crops", default=None, help="crops per image, e.g. 2x224+4x98 (default by patch size)")
    ap.add_argument("--head", choices=("seer", "swav", "none"), default="seer",
                    help="SwAV head: seer (8192-8192-256, 16000 prototypes), swav (2048-128, 3000), none "
                         "(default: %(default)s)")
    ap.add_argument("--prototypes", type=int, default=None, help="number of prototypes K (overrides the head's)")
    ap.add_argument("--optimizer", choices=tuple(OPTIMIZER_MOMENTS), default="lars",
                    help="train.optimizer: lars (one float32 moment per parameter, SwAV/SEER) or adamw (two) "
                         "(default: %(default)s)")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16",
                    help="train.precision: bf16 or fp16 autocast, or fp32 (activations in the weights' dtype: "
                         "float32, or --param-dtype with FSDP) (default: %(default)s)")
    ap.add_argument("--param-dtype", choices=tuple(PARAM_DTYPES), default="bfloat16",
                    help="parallel.param_dtype: FSDP's gathered parameters (default: %(default)s)")
    ap.add_argument("--layer-scale", type=float, default=None, metavar="INIT",
                    help="model.layer_scale_init: LayerScale on (default: the preset's, off in every preset)")
    ap.add_argument("--dropout", type=float, default=None,
                    help="model.dropout (default: the preset's, 0 in every preset)")
    ap.add_argument("--drop-path", type=float, default=None,
                    help="model.drop_path_rate (default: the preset's, 0 in every preset)")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="GPU memory (default 80)")
    ap.add_argument("--mfu", type=float, default=0.5,
                    help="MFU assumed for the compute-time estimate (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def format_plan(inp: PlanInput, r: dict, model_name: str) -> str:
    cfg = inp.model
    crops = "+".join(f"{n}x{s}" for n, s in inp.crops)
    if r["dp"] > 1 and inp.fsdp:
        working = f"gathered {inp.param_dtype} blocks, unsharded block grads"
        if len(resolution_groups(inp.crops)) > 1:
            working += (f", and every block's {inp.param_dtype} grads from the later resolutions, held until the "
                        f"first resolution's backward reaches the block")
    else:
        working = "none: fp32 weights used as they are" if inp.precision == "fp32" else \
            f"{inp.precision} copies of the weights"
    extra = "".join(f", {k} {v:g}" for k, v in (("LayerScale", cfg.layer_scale_init), ("dropout", cfg.dropout),
                                                 ("drop-path", cfg.drop_path_rate)) if v)
    lines = [
        f"seer plan: {model_name} (d={cfg.embed_dim}, L={cfg.depth}, heads={cfg.num_heads}, mlp={cfg.mlp_dim}, "
        f"patch {cfg.patch_size}) on {inp.gpus} GPUs = dp {r['dp']} x tp {r['tp']}; micro-batch {inp.micro_batch} "
        f"images/dp rank (global batch {r['global_batch']}), crops {crops}, checkpointing {inp.checkpointing}, "
        f"sequence parallel {'on' if inp.sequence_parallel else 'off'}, FSDP {'on' if inp.fsdp and r['dp'] > 1 else 'off'}, "
        f"{inp.precision}{extra}",
        f"  parameters          {r['model_params'] / 1e9:8.3f} B  (trunk {r['trunk_params'] / 1e9:.3f} B, head "
        f"{r['head_params'] / 1e6:.1f} M); per GPU {r['params_per_gpu'] / 1e9:.3f} B",
        "  memory per GPU",
        f"    parameters (fp32) {_gib(r['param_bytes'])}",
        f"    gradients (fp32)  {_gib(r['grad_bytes'])}",
        f"    optimizer (fp32)  {_gib(r['optimizer_bytes'])}   "
        f"({'LARS momentum' if inp.optimizer == 'lars' else 'AdamW: two moments'})",
        f"    working copies    {_gib(r['working_bytes'])}   ({working})",
        f"    activations       {_gib(r['activation_bytes'])}   ({r['tokens_per_gpu']:,} tokens)",
        f"    total             {_gib(r['total_bytes'])}   (forward/backward)",
        f"    optimizer step    {_gib(r['optimizer_step_bytes'])}   (weights, gradients, moments, the update's "
        f"temporaries)",
        f"    peak              {_gib(r['peak_bytes'])}   of {inp.gpu_memory_gib:.0f} GiB "
        f"({inp.reserve_gib:.0f} GiB reserved): {'FITS' if r['fits'] else 'DOES NOT FIT'}",
        f"  FLOPs per GPU per step: model {r['model_flops_per_gpu'] / 1e12:.1f} TFLOP (3x forward), hardware "
        f"{r['hardware_flops_per_gpu'] / 1e12:.1f} TFLOP (with recomputation); "
        f"{r['compute_s_at_mfu'] * 1e3:.0f} ms at {inp.mfu:.0%} MFU of {r['peak_tflops']:.0f} TFLOP/s",
        f"  communication per GPU per step: tensor parallel {r['tp_comm_bytes'] / 1e9:.2f} GB "
        f"({r['tp_comm_s'] * 1e3:.0f} ms at {inp.tp_bandwidth_gbps:.0f} GB/s), FSDP {r['fsdp_comm_bytes'] / 1e9:.2f} GB "
        f"({r['fsdp_comm_s'] * 1e3:.0f} ms at {inp.dp_bandwidth_gbps:.0f} GB/s), Sinkhorn "
        f"{r['sinkhorn_comm_bytes'] / 1e3:.1f} kB",
    ]
    if not r["fits"]:
        lines.append("  to fit: more GPUs (FSDP divides the model state), --checkpointing full, "
                     "--sequence-parallel, or a smaller --micro-batch")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``seer plan``; returns the exit status (0 ok, 2 bad arguments)."""
    args = _parser().parse_args(argv)
    try:
        cfg = vit_preset(args.model)
        model_flags = {"layer_scale_init": args.layer_scale, "dropout": args.dropout,
                       "drop_path_rate": args.drop_path}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in model_flags.items() if v is not None})
        try:
            validate_vit_config(cfg)
        except ValueError as e:  # the field's message, for the flag the user typed
            flag = {"layer_scale_init": "--layer-scale", "dropout": "--dropout", "drop_path_rate": "--drop-path"}
            raise ValueError(next((str(e).replace(f"ViTConfig.{k}", f) for k, f in flag.items()
                                   if f"ViTConfig.{k}" in str(e)), str(e))) from None
        for name in ("gpus", "tp", "micro_batch"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be a fraction in (0, 1], got {args.mfu}")
        if args.prototypes is not None and args.prototypes < 2:  # (as training's head.num_prototypes)
            raise ValueError(f"--prototypes must be >= 2, got {args.prototypes}")
        reserve = PlanInput.__dataclass_fields__["reserve_gib"].default
        if not reserve < args.gpu_memory_gib < float("inf"):
            raise ValueError(f"--gpu-memory-gib must be more than the {reserve:g} GiB the plan reserves, got "
                             f"{args.gpu_memory_gib}")
        if args.head == "none" and args.prototypes is not None:
            raise ValueError("--prototypes needs a head (--head seer or swav), got --head none")
        head = {"seer": seer_head(), "swav": SwAVHeadConfig(), "none": None}[args.head]
        if head is not None and args.prototypes is not None:
            head.num_prototypes = args.prototypes
        # (an empty --crops is a mistake, not the default: planning other crops than asked for would say nothing)
        crops = parse_crops(args.crops if args.crops is not None else default_crops(cfg))
        bad = [s for _, s in crops if s % cfg.patch_size]
        if bad:
            raise ValueError(f"--crops: sizes {bad} are not multiples of the patch size {cfg.patch_size}")
        try:
            checkpoint_every(args.checkpointing)
        except ValueError as e:  # the config key's message, for the flag the user typed
            raise ValueError(str(e).replace("parallel.activation_checkpointing", "--checkpointing")) from None
        sp = args.sequence_parallel if args.sequence_parallel is not None else args.tp > 1
        if sp and args.tp == 1:
            raise ValueError("--sequence-parallel needs --tp > 1")
        inp = PlanInput(cfg, head, args.gpus, args.tp, args.micro_batch, crops, checkpointing=args.checkpointing,
                        sequence_parallel=sp, fsdp=args.fsdp, gpu_memory_gib=args.gpu_memory_gib, mfu=args.mfu,
                        optimizer=args.optimizer, precision=args.precision, param_dtype=args.param_dtype)
        result = plan(inp)
    except (ValueError, UnknownPresetError) as e:
        print(f"seer plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_plan(inp, result, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
