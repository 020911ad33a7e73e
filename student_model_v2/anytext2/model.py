"""The AnyText2 teacher (``ControlLDM`` equivalent) with explicit, stateless operations.

Where the original hides state on modules (a ControlNet cache toggled by call order, line embeddings
and a start index on the embedding manager), this class returns values: conditions are encoded once,
WriteNet residuals are computed once per condition, and both are passed to every UNet call. That is
what lets a sampler or a trainer batch cond and uncond rows into one UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, load_model_config
from .controlnet import WriteNet, WriteNetInternals
from .embedding_manager import EmbeddingManager, LineEmbeddings
from .ocr import RecModel
from .schedule import make_schedule_buffers
from .text_encoder import TextEncoder
from .unet import ControlledUnetModel
from .vae import AutoencoderKL

NUM_CONTROL_SCALES = 13


@dataclass
class TextInfo:
    """The per-line conditioning of a batch (AnyText2's ``text_info``), NCHW tensors.

    ``glyphs[j]`` ``[B,3,H,W]``, ``gly_line[j]`` ``[B,1,80,512]``, ``positions[j]`` ``[B,1,H,W]``,
    ``colors[j]`` ``[B,3]`` (RGB/255, 500/255 = unspecified), ``font_hint`` ``[B,1,H,W]``,
    ``masked_x`` ``[B,4,H/8,W/8]`` (already scaled by 0.18215), ``n_lines[i]`` lines used in sample i.
    """

    glyphs: list[torch.Tensor]
    gly_line: list[torch.Tensor]
    positions: list[torch.Tensor]
    colors: list[torch.Tensor]
    font_hint: torch.Tensor
    masked_x: torch.Tensor
    n_lines: list[int]
    mimic_images: list[list[torch.Tensor] | None] | None = None


@dataclass
class Conditions:
    """Everything a UNet/WriteNet call needs for a set of batch rows.

    ``image_context`` is the UNet context (image caption, ``77k`` tokens); ``image_context_mask``
    marks real tokens when rows with different chunk counts were concatenated (padding keys are
    masked out, so batching changes no numbers). ``text_context`` is the WriteNet context.
    """

    image_context: torch.Tensor
    text_context: torch.Tensor
    glyphs: list[torch.Tensor]
    positions: list[torch.Tensor]
    masked_x: torch.Tensor
    image_context_mask: torch.Tensor | None = None
    line_embeddings: LineEmbeddings | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.masked_x.shape[0]


def concat_conditions(parts: Sequence[Conditions]) -> Conditions:
    """Stack conditions along the batch (e.g. cond rows then uncond rows for one CFG call)."""
    longest = max(p.image_context.shape[1] for p in parts)
    contexts, masks = [], []
    for part in parts:
        ctx = part.image_context
        mask = part.image_context_mask
        if mask is None:
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
        pad = longest - ctx.shape[1]
        if pad:
            ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], pad, ctx.shape[2])], dim=1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
        contexts.append(ctx)
        masks.append(mask)
    mask = torch.cat(masks)
    lines = len(parts[0].glyphs)
    if any(len(p.glyphs) != lines for p in parts):
        raise ValueError("conditions to concatenate must have the same number of (padded) text lines")
    return Conditions(
        image_context=torch.cat(contexts),
        text_context=torch.cat([p.text_context for p in parts]),
        glyphs=[torch.cat([p.glyphs[j] for p in parts]) for j in range(lines)],
        positions=[torch.cat([p.positions[j] for p in parts]) for j in range(lines)],
        masked_x=torch.cat([p.masked_x for p in parts]),
        image_context_mask=None if bool(mask.all()) else mask,
    )


class _DiffusionWrapper(nn.Module):
    """Holds the UNet under the checkpoint name ``model.diffusion_model``."""

    def __init__(self, unet: ControlledUnetModel) -> None:
        super().__init__()
        self.diffusion_model = unet


class AnyText2Model(nn.Module):
    """AnyText2 with state-dict keys identical to the released checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.scale_factor = config.scale_factor
        self.model = _DiffusionWrapper(ControlledUnetModel(config.unet))
        self.control_model = WriteNet(config.control)
        self.first_stage_model = AutoencoderKL(config.ddconfig, config.embed_dim)
        self.cond_stage_model = TextEncoder(config.clip_text_config, config.tokenizer_dir)
        self.embedding_manager = EmbeddingManager(int(config.embedding_manager.get("position_channels", 1)))
        self.text_predictor = RecModel()
        with torch.device("cpu"):
            schedule = make_schedule_buffers(config.linear_start, config.linear_end, config.timesteps)
        for name, value in schedule.items():
            self.register_buffer(name, value)
        self.is_random_init = False

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AnyText2Model":
        return cls(load_model_config(path))

    @property
    def unet(self) -> ControlledUnetModel:
        return self.model.diffusion_model

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    def line_embeddings(self, text_info: TextInfo) -> LineEmbeddings:
        return self.embedding_manager(
            self.text_predictor, text_info.gly_line, text_info.positions, text_info.font_hint,
            text_info.colors, text_info.n_lines, text_info.mimic_images,
        )

    def encode_conditions(
        self,
        text_info: TextInfo,
        image_captions: Sequence[str],
        text_captions: Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        uncond_contexts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[Conditions, Conditions | None]:
        """Encode a batch once: (cond, AnyText2's own uncond or None).

        The uncond keeps the same glyphs, positions and masked image; only its captions change
        (image caption = negative prompt, text caption = ""). The line embeddings are computed once and
        shared, since both captions see the same ``text_info``. ``uncond_contexts`` are precomputed
        ``uncond_caption_contexts`` of ``negative_prompt`` (a trainer's cache); they skip the uncond CLIP pass.
        """
        lines = self.line_embeddings(text_info)
        batch = text_info.masked_x.shape[0]
        device = self.device
        glyphs = [g.to(device, self.dtype) for g in text_info.glyphs]
        positions = [p.to(device, self.dtype) for p in text_info.positions]
        masked_x = text_info.masked_x.to(device, self.dtype)
        img_ctx, txt_ctx = self.cond_stage_model.encode(image_captions, text_captions, lines.per_sample)
        cond = Conditions(img_ctx, txt_ctx, glyphs, positions, masked_x, line_embeddings=lines)
        if negative_prompt is None:
            return cond, None
        if uncond_contexts is None:
            uncond_contexts = self.uncond_caption_contexts(negative_prompt, batch, lines.per_sample)
        un_img, un_txt = uncond_contexts
        return cond, replace(cond, image_context=un_img, text_context=un_txt)

    def uncond_caption_contexts(
        self,
        negative_prompt: str | Sequence[str],
        batch_size: int,
        line_embeddings: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP contexts of the uncond captions: (negative prompt as image caption, "" as text caption).

        They depend on the lines only through ``*`` placeholders in the negative prompt, so without
        placeholders ``line_embeddings`` may be None and the result can be reused across batches.
        """
        negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
        return self.cond_stage_model.encode(negatives, [""] * batch_size, line_embeddings)

    def control_residuals(
        self, conditions: Conditions, strength: float | Sequence[float] = 1.0, return_internals: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], WriteNetInternals]:
        """WriteNet outputs times the control scales (``[strength]*13`` unless a list is given).

        With ``fast_control`` they depend on neither the latent nor the timestep: compute once per
        conditions and reuse at every denoising step.
        """
        scales = [float(strength)] * NUM_CONTROL_SCALES if isinstance(strength, (int, float)) else [float(s) for s in strength]
        outputs, internals = self.control_model(
            conditions.text_context, conditions.glyphs, conditions.positions, conditions.masked_x, return_internals=True
        )
        scaled = [out * scale for out, scale in zip(outputs, scales)]
        return (scaled, internals) if return_internals else scaled

    def predict_eps(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor | int,
        conditions: Conditions,
        residuals: Sequence[torch.Tensor] | None,
        attnx_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """UNet eps prediction for ``x_t`` at ``timesteps`` given precomputed WriteNet residuals."""
        if not torch.is_tensor(timesteps):
            timesteps = torch.full((x_t.shape[0],), int(timesteps), dtype=torch.long, device=x_t.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps.expand(x_t.shape[0])
        context = conditions.image_context
        mask = conditions.image_context_mask
        return self.unet(
            x_t.to(self.dtype), timesteps.to(x_t.device), context, residuals, attnx_scale,
            self.config.only_mid_control, context_mask=mask,
        )

    def vae_encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent ``0.18215 * z`` of images in [-1, 1]; ``sample`` draws z like the original (CPU randn)."""
        vae = self.first_stage_model
        return vae.encode_to_latent(images.to(self.device, self.dtype), self.scale_factor, sample=sample, generator=generator)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents (divides by the scale factor first)."""
        return self.first_stage_model.decode_latent(latents.to(self.device, self.dtype), self.scale_factor)
