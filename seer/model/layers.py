"""The ViT building blocks: single-device modules in timm's layout (tensor parallelism is applied from
outside by :mod:`seer.parallel`, which swaps some of these for parallel versions with the same parameters).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seer_kernels


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose mean and variance are computed in float32 whatever the input dtype.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last dim; the result is returned in the
    input dtype, so bf16 activations stay bf16 while the statistics of 4096 values do not lose precision.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._norm(x, self.weight, self.bias)

    def _norm(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, weight.float(), bias.float(), self.eps).to(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> linear projection: (B, C, H, W) -> (B, H/p * W/p, d)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.dim() != 4 or x.shape[-1] % p or x.shape[-2] % p or x.shape[1] != self.proj.in_channels \
                or x.shape[-1] < p or x.shape[-2] < p:  # (0 is a multiple of p: an empty image, no patches)
            raise ValueError(f"PatchEmbed: expected images (B, {self.proj.in_channels}, H, W) with H and W "
                             f"multiples of the patch size {p} (at least one patch), got shape {tuple(x.shape)}")
        # Images arrive in float32; compute in the dtype of the weights (bf16 under FSDP mixed precision).
        x = self.proj(x.to(self.proj.weight.dtype))
        return x.flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], base_grid: int) -> Tensor:
    """Resize a learned (1, 1 + G*G, d) position embedding to a (gh, gw) patch grid.

    The class-token entry is kept; the patch entries are resampled bicubically (antialiased when shrinking,
    as timm does) in float32, so every crop size uses a smooth version of the same learned map.

    At the base grid this is the identity, bit for bit (the bicubic weights at the sample points are 1, 0, 0,
    0), and is skipped; where the grid is symbolic (``torch.export`` with a dynamic image size, the ONNX
    export's ``dynamic_size``) it is always resampled, so that the graph holds for every size.
    """
    gh, gw = grid
    if isinstance(gh, int) and isinstance(gw, int) and (gh, gw) == (base_grid, base_grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, base_grid, base_grid, d).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection and optional QK-norm.

    softmax(q k^T / sqrt(D)) v per head through ``seer_kernels.attention_packed`` (``seer_kernels.attention``
    with QK-norm, which transforms q and k between the projection and the attention). The rows of
    ``qkv.weight`` are [q of every head | k of every head | v of every head]; the head count (and the batch)
    are read from the projection's output, so the same code runs when tensor parallelism leaves each rank a
    subset of the heads. The packed op takes the projection's output as it is and hands back its gradient in
    one buffer written by the backward kernels, where slices through ``attention`` would have autograd stack
    dq, dk and dv and copy the result again (same values, same bits).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = False,
                 proj_drop: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        if isinstance(self.q_norm, nn.Identity):
            x = seer_kernels.attention_packed(qkv, qkv.shape[-1] // (3 * self.head_dim))
        else:
            b, n = qkv.shape[:2]  # (sequence parallelism gathers more sequences than x holds)
            q, k, v = qkv.unflatten(-1, (3, -1, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)
            q, k = self.q_norm(q), self.k_norm(k)
            x = seer_kernels.attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """x * gamma, a learned per-channel scale of a residual branch (CaiT), gamma initialised to a small value."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        # In x's dtype: under autocast without FSDP's 16-bit parameters a float32 gamma made x * gamma float32,
        # and with it the residual stream of every later block (twice the activation memory and the
        # tensor-parallel traffic), as nn.Linear's weight, cast by autocast, does not.
        return x * self.gamma.to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p, scale by 1/(1-p)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(ls1(attn(norm1(x)))), then the same with the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, qkv_bias: bool = True, qk_norm: bool = False,
                 layer_scale_init: float | None = None, drop_path: float = 0.0, dropout: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=dropout,
                              norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
