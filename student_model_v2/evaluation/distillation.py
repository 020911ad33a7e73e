"""Student-teacher latent gaps (see ``eval_distillation.py`` for the command line).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..anytext2.model import AnyText2Model
from ..data.dataset import AnyTextDataset, collate_fn, make_splits
from ..distillation.conditioning import encode_batch
from ..distillation.lora import adapters_disabled
from ..distillation.samplers import sample_student_lcm, sample_teacher_ddim


def latent_gaps(model: AnyText2Model, peft_model: nn.Module, batches: Sequence[dict], seeds: Sequence[int],
                args: argparse.Namespace) -> dict[str, float]:
    """Mean latent MSE to the teacher reference, per sampler, over batches x seeds."""
    totals = {"student_lcm": 0.0, "untrained_student_lcm": 0.0, "teacher_ddim_few": 0.0}
    count = 0
    for batch in batches:
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            with adapters_disabled(peft_model):
                encoded = encode_batch(model, batch, args.negative_prompt, generator)
                shape = encoded.latents.shape
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
                reference = sample_teacher_ddim(model, encoded.cond, encoded.uncond, args.teacher_steps,
                                                args.guidance_scale, latents=noise)
                few = sample_teacher_ddim(model, encoded.cond, encoded.uncond, args.student_steps,
                                          args.guidance_scale, latents=noise)
                untrained = sample_student_lcm(model, encoded.cond, args.student_steps,
                                               generator=torch.Generator().manual_seed(seed + 2),
                                               original_inference_steps=args.num_inference_steps, latents=noise)
            student = sample_student_lcm(model, encoded.cond, args.student_steps,
                                         generator=torch.Generator().manual_seed(seed + 2),
                                         original_inference_steps=args.num_inference_steps, latents=noise)
            totals["student_lcm"] += float(((student - reference) ** 2).mean())
            totals["untrained_student_lcm"] += float(((untrained - reference) ** 2).mean())
            totals["teacher_ddim_few"] += float(((few - reference) ** 2).mean())
            count += 1
    return {key: value / count for key, value in totals.items()}


def held_out_batches(run: argparse.Namespace, batch_size: int, data_seed: int) -> list[dict]:
    """The run's own val + test samples (same files, resolution and split), edit mode and font-hint
    augmentation off so every evaluation sees the same conditioning."""
    dataset = AnyTextDataset(run.dataset_json, resolution=run.resolution, max_lines=run.max_lines,
                             max_chars=run.max_chars, font_path=run.font_path,
                             font_dir=getattr(run, "font_dir", "") or None, seed=data_seed,  # absent before --font_dir
                             mask_img_prob=0.0, font_hint_randaug=False)
    splits = make_splits(dataset, (run.train_ratio, run.val_ratio, run.test_ratio), run.split_seed)
    held = [splits["val"][i] for i in range(len(splits["val"]))] + [splits["test"][i] for i in range(len(splits["test"]))]
    if not held:
        raise SystemExit("no held-out samples: the run's val/test ratios leave none")
    return [collate_fn(held[i : i + batch_size]) for i in range(0, len(held), batch_size)]


def training_args(adapter: Path) -> argparse.Namespace:
    """The flags the adapter was trained with (``args.json`` the trainer writes into its run folder)."""
    path = adapter.parent / "args.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: evaluate a checkpoint folder inside a trainer run folder")
    run = argparse.Namespace(**json.loads(path.read_text()))
    if run.use_mock_dataset:
        raise SystemExit(f"{adapter}: trained on the mock dataset, which has no held-out files to evaluate on")
    return run
