"""SD1.5 UNet pieces with ldm key names, and the AnyText2 UNet that takes WriteNet residuals.

The encoder builder is shared with the WriteNet (ControlNet), whose encoder must be a structural
copy of the UNet's so that its 12+1 outputs pair with the UNet's skip connections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpatialTransformer


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` (cos first, as ldm; diffusers' ``flip_sin_to_cos=True``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """ldm ResBlock (``use_scale_shift_norm=False``); GroupNorm eps 1e-5."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 stride-2 conv with symmetric padding 1 (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Runs each layer with the arguments it needs (emb for ResBlocks, context for transformers).

    With ``gradient_checkpointing`` set (by :func:`set_gradient_checkpointing`) and autograd on, the
    block's activations are recomputed in backward instead of stored: less memory, one more forward.
    """

    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        attnx_scale: float | torch.Tensor = 1.0,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, attnx_scale, context_mask)
            else:
                x = layer(x)
        return x


def set_gradient_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Turn block-level gradient checkpointing on or off below ``module``; returns the block count."""
    blocks = [m for m in module.modules() if isinstance(m, TimestepEmbedSequential)]
    for block in blocks:
        block.gradient_checkpointing = enabled
    return len(blocks)


def _transformer(channels: int, cfg: dict[str, Any], attnx: bool) -> SpatialTransformer:
    heads = int(cfg["num_heads"])
    return SpatialTransformer(channels, heads, channels // heads, int(cfg.get("transformer_depth", 1)), int(cfg["context_dim"]), attnx)


def time_embed_mlp(model_channels: int) -> nn.Sequential:
    """``time_embed``: Linear(mc, 4mc) -> SiLU -> Linear(4mc, 4mc)."""
    dim = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def build_encoder(cfg: dict[str, Any], input_attnx: bool, mid_attnx: bool) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """Input blocks and middle block of the SD UNet; also returns each input block's channel count."""
    mc = int(cfg["model_channels"])
    emb_dim = mc * 4
    dropout = float(cfg.get("dropout", 0.0))
    attention_resolutions = set(int(r) for r in cfg["attention_resolutions"])
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(int(cfg["in_channels"]), mc, 3, padding=1))])
    chans = [mc]
    ch, ds = mc, 1
    mults: Sequence[int] = cfg["channel_mult"]
    for level, mult in enumerate(mults):
        for _ in range(int(cfg["num_res_blocks"])):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, dropout)]
            ch = mult * mc
            if ds in attention_resolutions:
                layers.append(_transformer(ch, cfg, input_attnx))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(mults) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, dropout), _transformer(ch, cfg, mid_attnx), ResBlock(ch, emb_dim, ch, dropout))
    return blocks, middle, chans


class ControlledUnetModel(nn.Module):
    """The AnyText2 UNet (``model.diffusion_model``): SD1.5 + AttnX, skips offset by WriteNet residuals."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        mc = int(cfg["model_channels"])
        self.model_channels = mc
        emb_dim = mc * 4
        dropout = float(cfg.get("dropout", 0.0))
        attention_resolutions = set(int(r) for r in cfg["attention_resolutions"])
        attnx_levels = set(int(level) for level in cfg.get("output_attnx_level", []))
        self.time_embed = time_embed_mlp(mc)
        self.input_blocks, self.middle_block, chans = build_encoder(
            cfg, bool(cfg.get("input_attnx", False)), bool(cfg.get("mid_attnx", False))
        )
        mults: Sequence[int] = cfg["channel_mult"]
        num_res = int(cfg["num_res_blocks"])
        ch = mc * mults[-1]
        ds = 2 ** (len(mults) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(num_res + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), emb_dim, mc * mult, dropout)]
                ch = mc * mult
                if ds in attention_resolutions:
                    attnx = bool(cfg.get("output_attnx", False)) and level in attnx_levels
                    layers.append(_transformer(ch, cfg, attnx))
                if level and i == num_res:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, int(cfg["out_channels"]), 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        control: Sequence[torch.Tensor] | None,
        attnx_scale: float | torch.Tensor = 1.0,
        only_mid_control: bool = False,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict eps. ``control`` holds the (already strength-scaled) WriteNet outputs in input order."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, attnx_scale, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, attnx_scale, context_mask)
        residuals = list(control) if control is not None else None
        if residuals is not None:
            h = h + residuals.pop()
        for block in self.output_blocks:
            skip = skips.pop()
            if residuals is not None and not only_mid_control:
                skip = skip + residuals.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context, attnx_scale, context_mask)
        return self.out(h)
