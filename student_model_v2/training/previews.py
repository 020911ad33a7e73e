"""Preview grids written during training: one row per sample, columns image | masked image | hint |
student few-step sample (what the student draws now, with no guidance, with the sampler its objective
serves: LCM in ``--log_image_infer_steps`` steps, or for a phased-consistency run PCM in its phase count)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..anytext2.model import AnyText2Model
from ..distillation.adapter_info import AdapterInfo
from ..distillation.conditioning import encode_batch
from ..distillation.samplers import plan_student_sampling, sample_student


def slice_batch(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The first ``count`` rows of a collated batch (tensors, per-line lists and string lists)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value[:count]
        elif isinstance(value, list) and value and (torch.is_tensor(value[0]) or isinstance(value[0], list)):
            out[key] = [v[:count] for v in value]
        elif isinstance(value, list):
            out[key] = value[:count]
        else:
            out[key] = value
    return out


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW (1 or 3 channels) -> uint8 NHWC with 3 channels."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def save_preview_grid(model: AnyText2Model, batch: dict[str, Any], args: argparse.Namespace, path: Path,
                      info: AdapterInfo) -> Path:
    rows = slice_batch(batch, max(1, args.log_image_samples))
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    encoded = encode_batch(model, rows, None, generator)
    plan = plan_student_sampling("auto", None if info.objective == "pcm" else args.log_image_infer_steps, info)
    latents = sample_student(model, encoded.cond, plan, generator, args.control_strength, args.attnx_scale)
    sample = model.vae_decode(latents)
    columns = [to_pixels(rows["img"]), to_pixels(rows["masked_img"]), to_pixels(rows["hint"] * 2 - 1), to_pixels(sample)]
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
