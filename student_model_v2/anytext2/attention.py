"""Transformer blocks of the AnyText2 UNet and WriteNet, including AttnX.

The layout follows ldm's ``SpatialTransformer`` so the checkpoint keys line up. AnyText2's AttnX adds a
second self/cross attention pair to some blocks; it re-uses ``norm1``/``norm2`` (there are no new
norms) and runs after the original pair, scaled by ``attnx_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention with ldm key names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention when no context is given. Uses PyTorch's fused SDPA kernels, which compute the same
    softmax(q k^T / sqrt(d)) v as the original fp32-logit path.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` ``[B, Lk]`` (True = attend) hides padding keys of concatenated contexts."""
        context = x if context is None else context
        batch, length, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (exact erf GELU), key ``proj``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """ldm FeedForward with GEGLU: keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attn, cross-attn, optional AttnX pair, feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, attnx: bool) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.has_attnx = attnx
        if attnx:
            self.attn1x = CrossAttention(dim, None, heads, dim_head)
            self.attn2x = CrossAttention(dim, context_dim, heads, dim_head)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attnx_scale: float | torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        if self.has_attnx:
            x = x + attnx_scale * self.attn1x(self.norm1(x))
            x = x + attnx_scale * self.attn2x(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> 1x1 conv -> transformer blocks over pixels -> 1x1 conv, plus residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, attnx: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, attnx) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attnx_scale: float | torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context, attnx_scale, context_mask)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        return self.proj_out(h) + x
