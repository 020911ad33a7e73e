"""How close the student's few-step samples get to the teacher's many-step samples (latent MSE).

For held-out samples and seeds, from the same initial noise: the teacher's 50-step DDIM with CFG is the
reference; we report the latent MSE to it of (a) the student's 4-step LCM samples, (b) the same
sampler with the LoRA disabled (the untrained student, i.e. before training) and (c) the teacher's own
4-step DDIM with CFG. Distillation works when (a) is below both (b) and (c).

Usage: ``python -m student_model_v2.eval_distillation --adapter RUN/checkpoint-final`` (model, data and
split are the run's own, read from ``RUN/args.json``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .anytext2.checkpoint import build_random_teacher, load_teacher
from .anytext2.model import AnyText2Model
from .dataset_anytext_v2 import AnyTextDataset, collate_fn, make_splits
from .eval_report import write_json
from .samplers import sample_student_lcm, sample_teacher_ddim
from .training.conditioning import encode_batch
from .training.lora import adapters_disabled, load_lora


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
                             max_chars=run.max_chars, font_path=run.font_path, seed=data_seed,
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, type=Path,
                        help="a checkpoint folder of a trainer run; model, data and split come from the run's args.json")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--teacher_steps", type=int, default=50)
    parser.add_argument("--student_steps", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="teacher CFG scale s (LCM w = s - 1)")
    parser.add_argument("--output_json", default="")
    args = parser.parse_args(argv)
    run = training_args(args.adapter)
    args.num_inference_steps, args.negative_prompt = run.num_inference_steps, run.negative_prompt
    if run.teacher_ckpt:
        model = load_teacher(run.config, run.teacher_ckpt, trust_pickle=run.trust_checkpoint)
    else:
        model = build_random_teacher(run.config)
    peft_model = load_lora(model, args.adapter)
    peft_model.eval()
    gaps = latent_gaps(model, peft_model, held_out_batches(run, args.batch_size, args.data_seed), args.seeds, args)
    report = {"latent_mse_to_teacher_%dstep_cfg" % args.teacher_steps: gaps, "adapter": str(args.adapter),
              "random_init_teacher": model.is_random_init, "distillation_helps": gaps["student_lcm"] < min(
                  gaps["untrained_student_lcm"], gaps["teacher_ddim_few"])}
    print(json.dumps(report, indent=1, ensure_ascii=False))
    if args.output_json:
        write_json(report, args.output_json)
    return gaps


if __name__ == "__main__":
    main()
