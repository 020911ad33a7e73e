"""Which distillation method does what it claims? One table over several runs, on the same evidence.

For the held-out samples of the runs (the same samples, seeds and initial noise for every model), the teacher's
N-step CFG DDIM trajectory on the training solver grid is the reference (N = the runs' ``num_inference_steps``).
Each model gets a row:

* trajectory-consistency error (TCE), one column per one-step function: "one step to x0" (x̂0, an LCM
  student's own boundary-scaled f) and "jump to M-phase edges" for every PCM phase count M compared, applied
  at the teacher's trajectory points, MSE to the trajectory where the function is meant to land (its end, or
  the phase's lower edge) — what consistency distillation optimises; every model gets every column;
* end-sample distance at 1, 2, 4, 8 steps of its own sampler (LCM, or PCM in exactly its phase count) to the
  teacher's N-step sample, as latent MSE and as MSE after the best per-sample scale (amplitude alone cannot win);
* controls: the teacher's DDIM with CFG at the same step counts and the untrained student (adapters off).

Students sample with their run's ``control_strength`` and ``attnx_scale``. The objective (lcm, pcm,
x0_regression) and phase count come from each checkpoint's ``distillation.json``; model, data and split from
each run's ``args.json`` (they must agree between the runs).

Usage: ``python -m student_model_v2.eval_distillation --adapter RUN_A/checkpoint-final RUN_B/checkpoint-final
--output_json out/distillation_eval.json`` (the markdown table goes next to it, ``.md``).
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
from student_model_v2.evaluation.distillation import (
    STEP_COUNTS,
    DistillationEvaluation,
    check_comparable,
    held_out_batches,
    markdown_table,
    student_row,
    training_args,
)
from student_model_v2.evaluation.report import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, type=Path, nargs="+",
                        help="checkpoint folders of trainer runs (e.g. a v2_2, a v2_4 and a v2_5 run)")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_samples", type=int, default=0, help="held-out samples to use (0 = all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS),
                        help="sampling step counts of the end-sample comparison")
    parser.add_argument("--guidance_scale", type=float, default=7.5,
                        help="teacher CFG scale s of the reference trajectory and the teacher rows (LCM w = s - 1)")
    parser.add_argument("--output_json", default="", help="JSON report; the markdown table is written next to it")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if any(k < 1 for k in args.steps):
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    try:  # a wrong folder fails in seconds: the adapters' files first, then their fit to the runs' model config
        for adapter in args.adapter:
            read_adapter(adapter)
        runs = [(adapter, training_args(adapter)) for adapter in args.adapter]
        for adapter, adapter_run in runs:
            check_adapter(adapter_run.config, adapter)
    except AdapterError as exc:
        print(f"error: --adapter {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    check_comparable(runs)
    rows = [student_row(AdapterInfo.load(adapter), adapter) for adapter in args.adapter]
    run = runs[0][1]
    if run.teacher_ckpt:
        model = load_teacher(run.config, run.teacher_ckpt, trust_pickle=run.trust_checkpoint)
    else:
        model = build_random_teacher(run.config)
    batches = held_out_batches(run, args.batch_size, args.data_seed, args.max_samples)
    phase_counts = sorted({row.num_phases for row in rows if row.objective == "pcm"})
    evaluation = DistillationEvaluation.prepare(model, batches, args.seeds, run, args.guidance_scale, args.steps,
                                                phase_counts)
    evaluation.add_teacher()
    evaluation.add_untrained()
    for (adapter, adapter_run), row in zip(runs, rows):
        peft_model = load_lora(model, adapter)
        peft_model.eval()
        scalings = (adapter_run.sigma_data, adapter_run.timestep_scaling) if row.objective == "lcm" else None
        evaluation.add_student(row, adapter_run.control_strength, adapter_run.attnx_scale, scalings)
        model = peft_model.unload()  # the base weights again, for the next adapter
    report = evaluation.report()
    report.update(adapters=[str(a) for a in args.adapter], random_init_teacher=model.is_random_init,
                  seeds=args.seeds, held_out_samples=sum(len(b["img_caption"]) for b in batches))
    table = markdown_table(report)
    print(table)
    if args.output_json:
        path = write_json(report, args.output_json)
        path.with_suffix(".md").write_text(_markdown_report(report, table), encoding="utf-8")
    else:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def _markdown_report(report: dict, table: str) -> str:
    teacher = "random-init tiny teacher" if report["random_init_teacher"] else "trained teacher"
    return (f"# Distillation evaluation\n\nReference: the {teacher}'s {report['teacher_steps']}-step DDIM with CFG "
            f"{report['guidance_scale']:g} on the solver grid; {report['held_out_samples']} held-out samples x "
            f"{len(report['seeds'])} seeds; control_strength {report['control_strength']:g}, attnx_scale "
            f"{report['attnx_scale']:g}. TCE = trajectory-consistency error (latent MSE of a one-step function at the "
            f"teacher's trajectory points to the trajectory where it should land: its end for \"one step to x0\", "
            f"the phase's lower edge for a phase jump); end samples: latent MSE / MSE after the best "
            f"per-sample scale to the teacher's {report['teacher_steps']}-step sample (— = not served).\n\n"
            + table)


if __name__ == "__main__":
    main()
