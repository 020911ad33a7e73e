"""Image generation for the OCR evaluation: resumable, timed, identical seeds for teacher and student.

:func:`generate_images` is the one place that calls the inference pipeline (``pipeline_anytext2``).
Each model writes ``<img>_<k>.jpg`` (JPEG quality 95, what AnyText2's evaluation writes and then
reads back) and a ``<img>.json`` sidecar with the prompt's fingerprint, seed and seconds per stage
into its own folder, plus a ``settings.json``; images are reused when the settings and the prompt's
fingerprint match, so an interrupted run continues where it stopped and its timings are kept.

Timing is end to end per image: glyph rendering (``prepare``), conditioning (``encode``: OCR, CLIP,
VAE-encode of the masked image), sampling and VAE decode, synchronised on CUDA by the pipeline,
divided by the images of the call. A one-step warm-up call precedes the first timed prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..anytext2.checkpoint import DTYPES
from ..data.anytext_record import TEXT_CAPTION_PHRASES, text_caption
from ..inference.inputs import InferenceInputError, append_prompt
from .prompts import EvalPrompt
from .report import write_json

if TYPE_CHECKING:  # the pipeline (diffusers, samplers) is imported only when something is generated
    from ..inference.pipeline import AnyText2Pipeline, TextRequest

EVAL_TEXT_PHRASE = TEXT_CAPTION_PHRASES[0]
"""AnyText2's evaluation draws one of its six text-caption phrases at random; a fixed one keeps runs repeatable."""
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ModelSpec:
    """How one model samples: the teacher (DDIM + CFG) or the student (its adapter's sampler, no CFG).

    ``warmup_steps``: steps of the untimed warm-up call (a PCM student serves only its phase count).
    """

    name: str
    sampler: str
    steps: int
    guidance_scale: float = 1.0
    eta: float = 0.0
    warmup_steps: int = 1


@dataclass(frozen=True)
class GenerationOptions:
    num_images: int
    batch_size: int
    seed: int
    resolution: int
    a_prompt: str
    n_prompt: str


def prompt_request(prompt: EvalPrompt, options: GenerationOptions, font_path: Path) -> TextRequest:
    """The free-form request for a prompt: its texts quoted in order, one polygon each, the glyph
    font as every line's font hint (AnyText2's evaluation), colour unspecified."""
    from ..inference.pipeline import LineStyle, TextRequest

    return TextRequest(
        prompt=" ".join(f'"{line.text}"' for line in prompt.lines),
        positions=[line.polygon.tolist() for line in prompt.lines],
        line_styles=[LineStyle(font=font_path) for _ in prompt.lines],
        width=options.resolution, height=options.resolution, a_prompt=options.a_prompt, n_prompt=options.n_prompt,
    )


def generate_images(pipe: AnyText2Pipeline, prompt: EvalPrompt, spec: ModelSpec, options: GenerationOptions,
                    steps: int | None = None) -> tuple[list[np.ndarray], dict[str, float]]:
    """Images (RGB uint8) of one prompt and the seconds of each stage, summed over the calls.

    The only place that talks to the inference pipeline. Captions are AnyText2's evaluation ones: the
    benchmark caption (placeholders blanked) + the a_prompt for the image, ``'Text says * , * . '`` for
    the texts. Image k comes from call ``k // batch_size``, seeded with ``seed + k // batch_size``, so
    teacher and student share seeds; with batch_size = num_images (default) it is one call with ``seed``.
    """
    from ..inference.pipeline import SamplingOptions

    started = time.perf_counter()
    conditioning = pipe.prepare(prompt_request(prompt, options, pipe.glyph_font.path))
    conditioning = dataclasses.replace(
        conditioning, image_caption=append_prompt(prompt.caption, options.a_prompt),
        text_caption=text_caption(len(prompt.lines), EVAL_TEXT_PHRASE))
    seconds = Counter({"prepare": time.perf_counter() - started})
    images: list[np.ndarray] = []
    for call, first in enumerate(range(0, options.num_images, options.batch_size)):
        sampling = SamplingOptions(sampler=spec.sampler, steps=steps or spec.steps, guidance_scale=spec.guidance_scale,
                                   eta=spec.eta, num_images=min(options.batch_size, options.num_images - first),
                                   seed=options.seed + call)
        result = pipe.generate(conditioning, sampling)
        images += result.images
        seconds.update(result.timings)
    seconds["total"] += seconds["prepare"]
    return images, dict(seconds)


class ModelPool:
    """The pipeline, built on first use. The teacher must sample before the student: the student's
    LoRA is merged into the weights (its fastest form), after which the teacher is gone."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pipe = None
        self.lora_applied = False

    def pipeline(self, sampler: str) -> AnyText2Pipeline:
        from ..inference.pipeline import AnyText2Pipeline

        if self.pipe is None:
            self.pipe = AnyText2Pipeline.from_pretrained(
                self.args.config, self.args.teacher_ckpt or None, device=self.args.device or None,
                dtype=DTYPES[self.args.dtype], font_path=self.args.font_path,
                trust_checkpoint=self.args.trust_checkpoint)
        if sampler == "student" and not self.lora_applied:
            if self.args.lora_path:
                self.pipe.load_lora(self.args.lora_path, self.args.lora_scale, merge=True)
            self.lora_applied = True
        if sampler == "teacher" and self.lora_applied and self.args.lora_path:
            raise RuntimeError("the teacher must be sampled before the student's LoRA is merged into the weights")
        return self.pipe

    def release(self) -> None:
        """Drop the model (frees its memory before OCR)."""
        self.pipe = None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def image_paths(folder: Path, prompt: EvalPrompt, count: int) -> list[Path]:
    return [folder / f"{prompt.key}_{k}.jpg" for k in range(count)]


def is_generated(folder: Path, prompt: EvalPrompt, count: int) -> bool:
    sidecar = _read_json(folder / f"{prompt.key}.json")
    return (sidecar is not None and sidecar.get("fingerprint") == prompt.fingerprint()
            and all(p.is_file() for p in image_paths(folder, prompt, count)))


def check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    """Images in ``folder`` are reused only when they were made with the same settings."""
    path = folder / "settings.json"
    previous = _read_json(path)
    if previous is not None and previous != settings and not overwrite:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise SystemExit(f"error: {folder} holds images made with other settings ({', '.join(changed)}); "
                         "use another --output_dir or pass --overwrite to regenerate them")
    write_json(settings, path)


def generation_settings(spec: ModelSpec, options: GenerationOptions, args: argparse.Namespace) -> dict:
    settings = {"sampler": spec.sampler, "steps": spec.steps, "eta": spec.eta, **dataclasses.asdict(options),
                "config": str(args.config), "teacher_ckpt": args.teacher_ckpt or "random init (init rule)",
                "dtype": args.dtype, "font_path": str(args.font_path), "text_phrase": EVAL_TEXT_PHRASE}
    if spec.sampler == "teacher":
        settings["guidance_scale"] = spec.guidance_scale
    else:
        settings.update(lora_path=args.lora_path or None, lora_scale=args.lora_scale)
    return settings


def run_model(spec: ModelSpec, prompts: Sequence[EvalPrompt], pool: ModelPool, options: GenerationOptions,
              folder: Path, overwrite: bool, progress: bool) -> int:
    """Generate the images of every prompt not already in ``folder``; returns how many prompts ran.

    The first timed prompt follows a one-step warm-up call (kernel selection, lazy loads), so every
    recorded time is a steady-state one.
    """
    todo = [p for p in prompts if overwrite or not is_generated(folder, p, options.num_images)]
    warmed = False
    for prompt in tqdm(todo, desc=f"generate {spec.name}", disable=not progress):
        pipe = pool.pipeline(spec.sampler)
        if not warmed:
            generate_images(pipe, prompt, spec, dataclasses.replace(options, num_images=options.batch_size),
                            steps=spec.warmup_steps)
            warmed = True
        try:
            images, seconds = generate_images(pipe, prompt, spec, options)
        except InferenceInputError as exc:
            raise SystemExit(f"error: {prompt.img_name} (record {prompt.index}): {exc}") from exc
        for path, image in zip(image_paths(folder, prompt, options.num_images), images):
            Image.fromarray(image).save(path, quality=JPEG_QUALITY)
        sidecar = {"img_name": prompt.img_name, "fingerprint": prompt.fingerprint(), "seed": options.seed,
                   "num_images": options.num_images, "device": str(pipe.device),
                   "seconds": {k: round(v, 5) for k, v in seconds.items()},
                   "seconds_per_image": round(seconds["total"] / options.num_images, 5)}
        write_json(sidecar, folder / f"{prompt.key}.json")
    return len(todo)


def timing_summary(folder: Path, prompts: Sequence[EvalPrompt], num_images: int) -> dict:
    """Mean seconds per image, end to end and per stage, over the prompts' recorded generations."""
    records = [r for r in (_read_json(folder / f"{p.key}.json") for p in prompts) if r and "seconds" in r]
    if not records:
        return {"prompts_timed": 0, "seconds_per_image": None}
    stages = sorted({k for r in records for k in r["seconds"]} - {"total"})

    def per_image(stage: str) -> float:
        return round(float(np.mean([r["seconds"].get(stage, 0.0) for r in records])) / num_images, 5)

    return {
        "prompts_timed": len(records),
        "seconds_per_image": per_image("total"),
        "stage_seconds_per_image": {stage: per_image(stage) for stage in stages},
        "devices": sorted({str(r.get("device")) for r in records}),
    }


def read_generated(folder: Path, count: int, resolution: int) -> Callable[[EvalPrompt], list[np.ndarray]]:
    def load(prompt: EvalPrompt) -> list[np.ndarray]:
        images = []
        for path in image_paths(folder, prompt, count):
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
            if image.shape[:2] != (resolution, resolution):
                raise SystemExit(f"error: {path} is {image.shape[1]}x{image.shape[0]}, "
                                 f"expected {resolution}x{resolution}")
            images.append(image)
        return images
    return load


