"""How close the student's few-step samples get to the teacher's many-step samples (latent MSE).

For held-out samples and seeds, from the same initial noise: the teacher's 50-step DDIM with CFG is the
reference; we report the latent MSE to it of (a) the student's 4-step LCM samples, (b) the same
sampler with the LoRA disabled (the untrained student, i.e. before training) and (c) the teacher's own
4-step DDIM with CFG. Distillation works when (a) is below both (b) and (c).

Usage: ``python -m student_model_v2.eval_distillation --adapter RUN/checkpoint-final [--config ...]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .anytext2.checkpoint import build_random_teacher, load_teacher
from .anytext2.config import MODELS_YAML_DIR
from .samplers import sample_student_lcm, sample_teacher_ddim
from .training.args import DEFAULT_DATASET, DEFAULT_NEGATIVE_PROMPT
from .training.conditioning import encode_batch
from .training.lora import adapters_disabled, load_lora
from .dataset_anytext_v2 import AnyTextDataset, collate_fn, make_splits


def latent_gaps(model, peft_model, batches, seeds, args) -> dict[str, float]:
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


def held_out_batches(args) -> list[dict]:
    dataset = AnyTextDataset(args.dataset_json, resolution=args.resolution, seed=args.data_seed,
                             mask_img_prob=0.0, font_hint_randaug=False)
    splits = make_splits(dataset, (args.train_ratio, args.val_ratio, args.test_ratio), args.split_seed)
    held = [splits["val"][i] for i in range(len(splits["val"]))] + [splits["test"][i] for i in range(len(splits["test"]))]
    if not held:
        raise SystemExit("no held-out samples: give the val/test ratios some weight")
    return [collate_fn(held[i : i + args.batch_size]) for i in range(0, len(held), args.batch_size)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (a checkpoint of the trainer)")
    parser.add_argument("--config", default=str(MODELS_YAML_DIR / "anytext2_tiny.yaml"))
    parser.add_argument("--teacher_ckpt", default="")
    parser.add_argument("--dataset_json", nargs="+", default=[DEFAULT_DATASET])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train_ratio", type=float, default=0.9)
    parser.add_argument("--val_ratio", type=float, default=0.05)
    parser.add_argument("--test_ratio", type=float, default=0.05)
    parser.add_argument("--split_seed", type=int, default=42)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--teacher_steps", type=int, default=50)
    parser.add_argument("--student_steps", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="teacher CFG scale s (LCM w = s - 1)")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="training grid N (LCMScheduler origin steps)")
    parser.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT)
    parser.add_argument("--output_json", default="")
    args = parser.parse_args(argv)
    model = load_teacher(args.config, args.teacher_ckpt) if args.teacher_ckpt else build_random_teacher(args.config)
    peft_model = load_lora(model, args.adapter)
    peft_model.eval()
    gaps = latent_gaps(model, peft_model, held_out_batches(args), args.seeds, args)
    report = {"latent_mse_to_teacher_%dstep_cfg" % args.teacher_steps: gaps, "adapter": str(args.adapter),
              "random_init_teacher": model.is_random_init, "distillation_helps": gaps["student_lcm"] < min(
                  gaps["untrained_student_lcm"], gaps["teacher_ddim_few"])}
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return gaps


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
