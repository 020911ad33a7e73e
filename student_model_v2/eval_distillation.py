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
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

from student_model_v2.anytext2.checkpoint import build_random_teacher, load_teacher
from student_model_v2.distillation.adapter_check import AdapterError, check_adapter, read_adapter
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.distillation.lora import load_lora
from student_model_v2.evaluation.distillation import held_out_batches, latent_gaps, training_args
from student_model_v2.evaluation.report import write_json


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
    try:  # a wrong folder fails in seconds: the adapter's files first, then its fit to the run's model config
        read_adapter(args.adapter)
        run = training_args(args.adapter)
        check_adapter(run.config, args.adapter)
    except AdapterError as exc:
        print(f"error: --adapter {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    # the grid the adapter records (distillation.json); the run's flag for folders written before it existed
    info = AdapterInfo.load(args.adapter)
    args.num_inference_steps = info.num_inference_steps if info is not None else run.num_inference_steps
    args.negative_prompt = run.negative_prompt
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
