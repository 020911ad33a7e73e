"""The ldm ``AutoencoderKL`` (the Stable Diffusion VAE) under the checkpoint's own key names.

The AnyText2 checkpoint stores the VAE under ``first_stage_model.`` with the latent-diffusion layout
(``encoder.down.<level>.block.<i>``, ``decoder.up.<level>.upsample`` ...), which differs from the
diffusers ``AutoencoderKL`` layout. Re-creating that module tree lets the checkpoint load with
``strict=True`` and lets the golden init rule (seeded by key name) reproduce the reference weights.

Numerics follow the original: GroupNorm(32, eps 1e-6) with swish, a stride-2 downsampling conv after
a right/bottom-only zero pad, nearest-neighbour upsampling, single-head mid-block attention, and a
posterior sample whose noise comes from the global CPU generator (the reference images and latents
were produced that way, so a device-side draw would not reproduce them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_DDCONFIG_KEYS = (
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "in_channels",
    "resolution",
    "z_channels",
    "double_z",
)
_DDCONFIG_DEFAULTS: dict[str, Any] = {"dropout": 0.0, "double_z": True}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without a time embedding (the VAE has none)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # The original only creates the 1x1 projection when the width changes; its key exists
        # exactly then, so the attribute must too.
        if in_channels != out_channels:
            self.nin_shortcut = _conv1x1(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q/k/v/proj are 1x1 convs to match the checkpoint."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv1x1(channels, channels)
        self.k = _conv1x1(channels, channels)
        self.v = _conv1x1(channels, channels)
        self.proj_out = _conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, height * width).transpose(2, 3)

        out = F.scaled_dot_product_attention(
            tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)), scale=c**-0.5
        )
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution; the zero pad goes on the right and bottom only, as in ldm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour repetition, then smooth with a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, optional per-block attention, optional resampler.

    ``attn`` is an empty ModuleList when the level's resolution is not in ``attn_resolutions``;
    otherwise it holds one attention block per residual block (ldm's ``down.i.attn.j`` keys).
    """

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, with_attn: bool,
                 dropout: float) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], out_channels, dropout) for i in range(n_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(n_blocks if with_attn else 0))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image -> latent moments (before ``quant_conv``)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, in_channels: int,
                 resolution: int, z_channels: int, double_z: bool) -> None:
        super().__init__()
        self.conv_in = _conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        widths = [ch] + [ch * m for m in ch_mult]
        current_res = resolution
        for level in range(len(ch_mult)):
            stage = _Level(widths[level], widths[level + 1], num_res_blocks,
                           current_res in attn_resolutions, dropout)
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(widths[level + 1])
                current_res //= 2
            self.down.append(stage)
        self.mid = _Mid(widths[-1], dropout)
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv3x3(widths[-1], 2 * z_channels if double_z else z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image.

    ``up`` is indexed by resolution level like ``down`` (``up.0`` is the full-resolution level) but
    runs from the coarsest level to ``up.0``; each level has ``num_res_blocks + 1`` blocks and every
    level except 0 ends with an upsample.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, resolution: int,
                 z_channels: int) -> None:
        super().__init__()
        n_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        current_res = resolution // 2 ** (n_levels - 1)
        self.conv_in = _conv3x3(z_channels, block_in)
        self.mid = _Mid(block_in, dropout)
        levels: dict[int, _Level] = {}
        for level in reversed(range(n_levels)):
            block_out = ch * ch_mult[level]
            stage = _Level(block_in, block_out, num_res_blocks + 1,
                           current_res in attn_resolutions, dropout)
            if level != 0:
                stage.upsample = Upsample(block_out)
                current_res *= 2
            levels[level] = stage
            block_in = block_out
        self.up = nn.ModuleList(levels[level] for level in range(n_levels))
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior ``N(mean, exp(logvar))`` from the encoder moments, as ldm's distribution class.

    ``moments`` are kept unclamped; only ``logvar`` (and hence ``std``) is clamped to [-30, 20].
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``mean + std * eps``.

        Without a generator, ``eps`` is a float32 draw from the global CPU RNG moved to the moments'
        device afterwards, which is what the original does (so ``torch.manual_seed`` alone fixes it,
        whatever the device). With a generator, ``eps`` is drawn on that generator's device.
        """
        if generator is None:
            noise = torch.randn(self.mean.shape)
        else:
            noise = torch.randn(self.mean.shape, generator=generator, device=generator.device)
        noise = noise.to(device=self.moments.device)
        return (self.mean.float() + self.std.float() * noise).to(self.mean.dtype)


class AutoencoderKL(nn.Module):
    """ldm ``AutoencoderKL``: encoder/decoder plus the 1x1 ``quant_conv``/``post_quant_conv``."""

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int) -> None:
        super().__init__()
        cfg = _resolve_ddconfig(ddconfig)
        if not cfg["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig double_z: true (moments hold mean and logvar)")
        shared = {k: cfg[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                      "dropout", "resolution", "z_channels")}
        self.encoder = Encoder(in_channels=cfg["in_channels"], double_z=True, **shared)
        self.decoder = Decoder(out_ch=cfg["out_ch"], **shared)
        self.quant_conv = _conv1x1(2 * cfg["z_channels"], 2 * embed_dim)
        self.post_quant_conv = _conv1x1(embed_dim, cfg["z_channels"])

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AutoencoderKL:
        """Build from a YAML ``first_stage_config.params`` block (``embed_dim`` + ``ddconfig``).

        ``monitor`` and ``lossconfig`` are training-only and add no state-dict keys.
        """
        missing = [k for k in ("embed_dim", "ddconfig") if k not in params]
        if missing:
            raise KeyError(f"first_stage_config.params lacks {missing}")
        return cls(params["ddconfig"], int(params["embed_dim"]))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``[B, 2*embed_dim, h, w]`` = quant_conv(encoder(x)), before the logvar clamp."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an unscaled latent (already divided by the scale factor)."""
        return self.decoder(self.post_quant_conv(z))

    def encode_to_latent(self, x: torch.Tensor, scale_factor: float, sample: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled diffusion latent; ``sample=False`` uses the posterior mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return scale_factor * z

    def decode_latent(self, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
        """Scaled diffusion latent -> image; multiplies by ``1/scale_factor`` as the original does."""
        return self.decode((1.0 / scale_factor) * z)


def _resolve_ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject keys this implementation does not honour.

    An unknown key (say ``attn_type`` or ``tanh_out``) would change the network in the original,
    so silently ignoring it could build a different model than the YAML describes.
    """
    unknown = sorted(set(ddconfig) - set(_DDCONFIG_KEYS))
    if unknown:
        raise ValueError(f"VAE ddconfig has unsupported keys {unknown}; supported: {list(_DDCONFIG_KEYS)}")
    cfg = {**_DDCONFIG_DEFAULTS, **dict(ddconfig)}
    missing = [k for k in _DDCONFIG_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"VAE ddconfig lacks required keys {missing}")
    cfg["ch_mult"] = [int(m) for m in cfg["ch_mult"]]
    cfg["attn_resolutions"] = [int(r) for r in cfg["attn_resolutions"]]
    for key in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
        cfg[key] = int(cfg[key])
    cfg["dropout"] = float(cfg["dropout"])
    cfg["double_z"] = bool(cfg["double_z"])
    return cfg
