"""Quick start: sample the tiny teacher end to end on a CPU and write an image.

It exercises conditioning (captions with ``*`` placeholders, line embeddings, masked-image latent),
the WriteNet, 20-step DDIM with CFG and the VAE decode. The tiny teacher is random (init rule), so the
image is noise-like: this shows the pipeline runs, not what AnyText2 draws.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from .anytext2.checkpoint import RANDOM_INIT_BANNER, build_random_teacher, load_teacher
from .anytext2.config import MODELS_YAML_DIR
from .anytext2.model import TextInfo
from .pipeline_anytext2 import to_uint8_image
from .samplers import sample_teacher_ddim


def block_text_info(size: int, generator: torch.Generator) -> TextInfo:
    """Two text lines as filled boxes (a stand-in for rendered glyphs), generation mode."""
    positions, glyphs = [], []
    for top in (size // 4, size // 2):
        mask = torch.zeros(1, 1, size, size)
        mask[..., top : top + size // 8, size // 8 : size - size // 8] = 1
        positions.append(mask)
        glyphs.append(mask.expand(-1, 3, -1, -1) * (torch.rand(1, 3, size, size, generator=generator) > 0.5))
    return TextInfo(
        glyphs=glyphs,
        gly_line=[(torch.rand(1, 1, 80, 512, generator=generator) > 0.8).float() for _ in positions],
        positions=positions,
        colors=[torch.full((1, 3), 500 / 255)] * len(positions),
        font_hint=torch.zeros(1, 1, size, size),
        masked_x=torch.zeros(1, 4, size // 8, size // 8),
        n_lines=[len(positions)],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(MODELS_YAML_DIR / "anytext2_tiny.yaml"))
    parser.add_argument("--teacher_ckpt", default=None, help="AnyText2 checkpoint; without it the init rule builds a random teacher")
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    model = load_teacher(args.config, args.teacher_ckpt) if args.teacher_ckpt else build_random_teacher(args.config)
    generator = torch.Generator().manual_seed(args.seed)
    info = block_text_info(args.resolution, generator)
    start = time.perf_counter()
    cond, uncond = model.encode_conditions(info, ["a shop sign on a brick wall"], ["Text says * , * . "], "low quality")
    latents = sample_teacher_ddim(model, cond, uncond, args.steps, args.guidance_scale, generator=generator)
    image = to_uint8_image(model.vae_decode(latents))[0]
    seconds = time.perf_counter() - start
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out_dir / "teacher_sample.png")
    report = {
        "image": str(out_dir / "teacher_sample.png"),
        "teacher": "random-init (tiny config)" if model.is_random_init else str(args.teacher_ckpt),
        "steps": args.steps, "guidance_scale": args.guidance_scale, "seconds": round(seconds, 3),
    }
    if model.is_random_init:
        report["warning"] = RANDOM_INIT_BANNER
    (out_dir / "run.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
