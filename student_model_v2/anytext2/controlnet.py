"""AnyText2's WriteNet: a ControlNet fed by glyph, position and masked-image latents.

With ``fast_control`` (the released setting) its input latent is zeros and its timestep is 0, so its
outputs depend only on the text-caption context and the text conditioning. They are therefore computed
once per condition and passed to every UNet call, never recomputed per denoising step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .unet import build_encoder, time_embed_mlp, timestep_embedding


def _conv_stack(spec: Sequence[tuple[int, int, int]]) -> nn.Sequential:
    """3x3 convs (in, out, stride), each followed by SiLU; convs at even indices as in the checkpoint."""
    layers: list[nn.Module] = []
    for c_in, c_out, stride in spec:
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU()]
    return nn.Sequential(*layers)


@dataclass
class WriteNetInternals:
    """Intermediate maps of one WriteNet pass, for golden checks and debugging."""

    glyph_union: torch.Tensor
    pos_sum: torch.Tensor
    enc_glyph: torch.Tensor
    enc_pos: torch.Tensor
    guided_hint: torch.Tensor


class WriteNet(nn.Module):
    """``control_model``: SD encoder copy + glyph/position/fuse blocks + zero convs (13 outputs for SD1.5)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        mc = int(cfg["model_channels"])
        self.model_channels = mc
        glyph_in = int(cfg.get("glyph_channels", 1))
        position_in = int(cfg.get("position_channels", 1))
        latent_channels = int(cfg["in_channels"])
        self.time_embed = time_embed_mlp(mc)
        self.input_blocks, self.middle_block, chans = build_encoder(cfg, input_attnx=False, mid_attnx=False)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in chans)
        self.glyph_block = _conv_stack(
            [(glyph_in, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2)]
        )
        self.position_block = _conv_stack(
            [(position_in, 8, 1), (8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]
        )
        self.fuse_block_za = nn.Conv2d(256 + 64 + latent_channels, mc, 3, padding=1)
        self.middle_block_out = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1))

    @staticmethod
    def glyph_union(glyphs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Binary union of all lines' glyph renders: text colour plays no role, only coverage."""
        total = torch.stack(list(glyphs), dim=0).sum(dim=0)
        return (total.sum(dim=1, keepdim=True) != 0).to(total.dtype)

    @staticmethod
    def position_sum(positions: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of line masks; overlaps reach 2 or more (AnyText2 sums, never clips)."""
        return torch.stack(list(positions), dim=0).sum(dim=0)

    def guided_hint(self, glyphs: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], masked_x: torch.Tensor) -> tuple[torch.Tensor, WriteNetInternals]:
        union = self.glyph_union(glyphs).to(masked_x.dtype)
        pos_sum = self.position_sum(positions).to(masked_x.dtype)
        enc_glyph = self.glyph_block(union)
        enc_pos = self.position_block(pos_sum)
        hint = self.fuse_block_za(torch.cat([enc_glyph, enc_pos, masked_x], dim=1))
        return hint, WriteNetInternals(union, pos_sum, enc_glyph, enc_pos, hint)

    def forward(
        self,
        context: torch.Tensor,
        glyphs: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        masked_x: torch.Tensor,
        return_internals: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], WriteNetInternals]:
        """Unscaled residuals, one per UNet skip plus the middle block (input order)."""
        hint, internals = self.guided_hint(glyphs, positions, masked_x)
        batch = masked_x.shape[0]
        t = torch.zeros(batch, dtype=torch.long, device=masked_x.device)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(masked_x.dtype))
        h = torch.zeros_like(masked_x)
        outputs = []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + hint
            outputs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outputs.append(self.middle_block_out(h))
        if return_internals:
            return outputs, internals
        return outputs
