"""OCR evaluation of the student (and the teacher): Sen.ACC, NED and seconds per image on a benchmark JSON.

AnyText2's protocol (``docs/evaluation.md``): every prompt of an AnyText-benchmark / AnyWord-format JSON
is generated ``--num_images`` times (4) from one seed, every text line is cut out of every image with
its ground-truth polygon and recognised, and Sen.ACC / NED are averaged over all lines of all images,
overall and per language. Recognition is PP-OCRv4 (``rapidocr_onnxruntime``, recognition only) instead
of AnyText2's DuGuang model, so absolute numbers are comparable between runs of this script, not with
the paper's table.

    python -m student_model_v2.eval_ocr --config models_yaml/anytext2_sd15.yaml \\
        --teacher_ckpt models/anytext_v2.0.ckpt --lora_path RUN/checkpoint-final \\
        --benchmark_json benchmark/laion_word/test1k.json --with_teacher --output_dir outputs/eval_laion
    python -m student_model_v2.eval_ocr --images_from_dataset      # upper bound: the demo data's own images

Writes to ``--output_dir``: ``images/<model>/<img>_<k>.jpg`` (+ one ``<img>.json`` with seed and
timings per prompt; reused when the run is repeated with the same settings), ``lines_<model>.jsonl``
(every line's prediction and scores), ``metrics.json``, ``report.md``, ``metrics.png`` and
``grids/grid_<n>.png`` (prompt | teacher | student, with what the OCR read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import numpy as np
from tqdm import tqdm

from student_model_v2.anytext2.config import MODELS_YAML_DIR
from student_model_v2.data.anytext_record import load_image
from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH, FontError, GlyphFont
from student_model_v2.data.json_index import DatasetFileError
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.distillation.samplers import StudentSampling, plan_student_sampling
from student_model_v2.evaluation.generate import (
    DTYPES,
    EVAL_TEXT_PHRASE,
    GenerationOptions,
    ModelPool,
    ModelSpec,
    check_settings,
    generation_settings,
    read_generated,
    run_model,
    timing_summary,
)
from student_model_v2.evaluation.line_ocr import LineReader
from student_model_v2.evaluation.ocr_metrics import LineScore, Normalization, load_dictionary, score_line, summarize
from student_model_v2.evaluation.prompts import EvalPrompt, load_prompts
from student_model_v2.evaluation.report import GridCell, GridRow, write_chart, write_grids, write_json, write_report
from student_model_v2.inference.checks import check_adapter_flag, check_steps
from student_model_v2.inference.inputs import DEFAULT_N_PROMPT, InferenceInputError
from student_model_v2.training.args import DEFAULT_DATASET

DEFAULT_CONFIG = MODELS_YAML_DIR / "anytext2_sd15.yaml"
DEFAULT_CKPT = "models/anytext_v2.0.ckpt"
EVAL_A_PROMPT = "best quality, extremely detailed"
"""AnyText2's evaluation suffix (``caption + ', best quality, extremely detailed'``), not the demo's longer one."""


def dictionary_name(choice: str, benchmark_json: Path, language: str) -> str:
    """``auto``: AnyText2's per-benchmark dictionary when the file is a laion (en) / wukong (ch) one,
    else per line (Latin: en, everything else: ch)."""
    if choice != "auto":
        return choice
    path = str(benchmark_json).lower()
    if "laion" in path:
        return "en"
    if "wukong" in path:
        return "ch"
    return "en" if language == "Latin" else "ch"


# --------------------------------------------------------------------------------------------------
# OCR scoring


def read_dataset(resolution: int) -> Callable[[EvalPrompt], list[np.ndarray]]:
    """The record's own image, resized (squashed) to ``resolution`` like its polygons."""
    def load(prompt: EvalPrompt) -> list[np.ndarray]:
        return [load_image(prompt.image_path, resolution)[0]]
    return load


def score_model(name: str, prompts: Sequence[EvalPrompt], load: Callable[[EvalPrompt], list[np.ndarray]],
                reader: LineReader, dictionary_choice: str, benchmark_json: Path, normalization: Normalization,
                progress: bool, num_grids: int = 0) -> tuple[list[dict], list[LineScore], list[np.ndarray]]:
    """Every line of every image read and scored: rows for ``lines_<model>.jsonl``, the scores, and the
    first image of the first ``num_grids`` prompts (for the grids, so no image is read twice)."""
    rows, scores, firsts = [], [], []
    for index, prompt in enumerate(tqdm(prompts, desc=f"ocr {name}", disable=not progress)):
        images = load(prompt)
        if index < num_grids:
            firsts.append(images[0])
        for k, image in enumerate(images):
            reads = reader.read_lines(image, [line.polygon for line in prompt.lines])
            for j, (line, (pred, confidence)) in enumerate(zip(prompt.lines, reads)):
                dictionary = load_dictionary(dictionary_name(dictionary_choice, benchmark_json, line.language))
                score = score_line(pred, line.text, line.language, dictionary, normalization)
                unreadable = "".join(dict.fromkeys(c for c in score.gt_normalized if c not in reader.characters))
                scores.append(score)
                rows.append({"prompt": prompt.key, "img_name": prompt.img_name, "image": k, "line": j,
                             "confidence": round(confidence, 4), "ocr_cannot_output": unreadable, **score.to_json()})
    return rows, scores, firsts


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m student_model_v2.eval_ocr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="model YAML (models_yaml/anytext2_tiny.yaml for tests)")
    model.add_argument("--teacher_ckpt", default=DEFAULT_CKPT,
                       help="AnyText2 checkpoint; an empty string builds the random init-rule teacher (tests only)")
    model.add_argument("--trust_checkpoint", action="store_true", help="allow pickled objects in an old .ckpt")
    model.add_argument("--lora_path", default=None,
                       help="student adapter folder; without it the student is the base model sampled with LCM")
    model.add_argument("--lora_scale", type=float, default=1.0)
    model.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    model.add_argument("--font_path", default=str(DEFAULT_FONT_PATH), help="glyph font (glyphs and font hints)")

    data = parser.add_argument_group("benchmark")
    data.add_argument("--benchmark_json", default=DEFAULT_DATASET,
                      help="AnyText-benchmark / AnyWord-format JSON (or .jsonl with its .meta.json)")
    data.add_argument("--images_from_dataset", action="store_true",
                      help="score the dataset's own images instead of generated ones (validates crop + OCR + metric)")
    data.add_argument("--limit", type=int, default=0, help="evaluate the first N usable prompts (0: all)")
    data.add_argument("--resolution", type=int, default=512, help="generated (and scored) image size")
    data.add_argument("--max_lines", type=int, default=20, help="lines per prompt (AnyText2's evaluation: 20)")
    data.add_argument("--max_chars", type=int, default=20, help="characters per line, ground truth included")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--num_images", type=int, default=4, help="images per prompt (AnyText2: 4)")
    gen.add_argument("--batch_size", type=int, default=0, help="images per pipeline call (0: num_images)")
    gen.add_argument("--seed", type=int, default=100, help="seed of every prompt (AnyText2: 100)")
    gen.add_argument("--with_teacher", action="store_true", help="also generate and score the teacher")
    gen.add_argument("--student_steps", type=int, default=None,
                     help="student steps (default: the adapter's phase count for a PCM adapter, else 4)")
    gen.add_argument("--teacher_steps", type=int, default=20)
    gen.add_argument("--guidance_scale", type=float, default=7.5, help="teacher CFG scale")
    gen.add_argument("--eta", type=float, default=0.0, help="teacher DDIM eta")
    gen.add_argument("--a_prompt", default=EVAL_A_PROMPT, help="appended to every image caption")
    gen.add_argument("--n_prompt", default=DEFAULT_N_PROMPT, help="teacher's negative (uncond) caption")

    ocr = parser.add_argument_group("OCR and metrics")
    ocr.add_argument("--dictionary", choices=["auto", "ch", "en"], default="auto",
                     help="character ids for NED (auto: by benchmark file name, else Latin lines en, others ch)")
    ocr.add_argument("--keep_spaces", action="store_true", help="compare whitespace too (default: removed)")
    ocr.add_argument("--ignore_case", action="store_true", help="case-insensitive comparison (default: exact case)")
    ocr.add_argument("--ocr_threads", type=int, default=1, help="ONNX Runtime threads of the recogniser (0: all cores)")

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default="outputs/eval_ocr")
    out.add_argument("--num_grids", type=int, default=8, help="prompts shown in the sample grids")
    out.add_argument("--overwrite", action="store_true", help="regenerate images even when they exist")
    out.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.images_from_dataset and args.with_teacher:
        raise SystemExit("error: --images_from_dataset scores the dataset's images; drop --with_teacher")
    for name in ("num_images", "student_steps", "teacher_steps", "max_lines", "max_chars"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if args.batch_size < 0 or args.limit < 0 or args.num_grids < 0:
        raise SystemExit("error: --batch_size, --limit and --num_grids cannot be negative")
    if args.resolution < 64 or args.resolution % 64:
        raise SystemExit(f"error: --resolution must be a positive multiple of 64, got {args.resolution}")
    if args.images_from_dataset:
        return
    try:  # the adapter against the model's LoRA set (file headers and a meta-device skeleton), and the step bounds
        if args.lora_path:
            check_adapter_flag("--lora_path", args.config, args.lora_path)
        if args.with_teacher:
            check_steps("--teacher_steps", args.teacher_steps, teacher=True)
    except InferenceInputError as exc:
        raise SystemExit(f"error: {exc}") from exc
    student_sampling(args)


def student_sampling(args: argparse.Namespace) -> StudentSampling:
    """The student's sampler and steps from its adapter record (``distillation.json``), or a clear error."""
    try:
        info = AdapterInfo.load(args.lora_path) if args.lora_path else None
        return plan_student_sampling("auto", args.student_steps, info)
    except ValueError as exc:  # AdapterInfoError is a ValueError too
        raise SystemExit(f"error: --lora_path {args.lora_path} / --student_steps {args.student_steps}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images to score: one model's generations (with their timings) or the dataset's own images."""

    name: str
    label: str
    load: Callable[[EvalPrompt], list[np.ndarray]]
    timing: dict = field(default_factory=dict)
    spec: ModelSpec | None = None


def student_label(spec: ModelSpec, has_lora: bool, sampler: str = "lcm") -> str:
    return f"student ({spec.steps} {sampler.upper()} steps, {'LoRA' if has_lora else 'no LoRA'})"


def generated_sets(args: argparse.Namespace, prompts: Sequence[EvalPrompt], output_dir: Path,
                   progress: bool) -> list[ImageSet]:
    """Generate (or reuse) the teacher's and the student's images; the teacher first (see ModelPool)."""
    batch_size = min(args.batch_size or args.num_images, args.num_images)
    options = GenerationOptions(num_images=args.num_images, batch_size=batch_size, seed=args.seed,
                                resolution=args.resolution, a_prompt=args.a_prompt, n_prompt=args.n_prompt)
    plan = student_sampling(args)
    specs = [ModelSpec("student", "student", plan.steps, warmup_steps=plan.steps if plan.name == "pcm" else 1)]
    if args.with_teacher:
        specs.insert(0, ModelSpec("teacher", "teacher", args.teacher_steps, args.guidance_scale, args.eta))
    pool = ModelPool(args)
    sets = []
    try:
        for spec in specs:
            folder = output_dir / "images" / spec.name
            check_settings(folder, generation_settings(spec, options, args), args.overwrite)
            generated = run_model(spec, prompts, pool, options, folder, args.overwrite, progress)
            label = (f"teacher ({spec.steps} DDIM steps, CFG {spec.guidance_scale:g})" if spec.sampler == "teacher"
                     else student_label(spec, bool(args.lora_path), plan.name))
            timing = {"generated_now": generated, **timing_summary(folder, prompts, args.num_images)}
            images = read_generated(folder, args.num_images, args.resolution)
            sets.append(ImageSet(spec.name, label, images, timing, spec))
    except InferenceInputError as exc:
        raise SystemExit(f"error: {exc}") from exc
    finally:
        pool.release()
    return sets


def evaluate(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict:
    """Run the evaluation described by parsed arguments (``argv``: the command line, recorded in the
    metrics); returns the metrics, which are also written to disk."""
    check_arguments(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    benchmark_json = Path(args.benchmark_json)
    issues: Counter = Counter()
    try:
        font = GlyphFont(args.font_path)
        prompts = load_prompts(benchmark_json, resolution=args.resolution, max_lines=args.max_lines,
                               max_chars=args.max_chars, font=font, limit=args.limit,
                               need_images=args.images_from_dataset, issues=issues)
    except (FileNotFoundError, FontError, DatasetFileError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if not prompts:
        raise SystemExit(f"error: {benchmark_json} has no record with a usable text line (issues: {dict(issues)})")
    progress = not args.no_progress
    if args.images_from_dataset:
        sets = [ImageSet("dataset", "dataset images (ground truth)", read_dataset(args.resolution))]
    else:
        sets = generated_sets(args, prompts, output_dir, progress)
    num_images = 1 if args.images_from_dataset else args.num_images
    normalization = Normalization(strip_whitespace=not args.keep_spaces, ignore_case=args.ignore_case)

    reader = LineReader(args.ocr_threads)
    results: dict[str, dict] = {}
    rows_by_set: dict[str, list[dict]] = {}
    grid_images: dict[str, list[np.ndarray]] = {}
    for image_set in sets:
        rows, scores, grid_images[image_set.name] = score_model(
            image_set.name, prompts, image_set.load, reader, args.dictionary, benchmark_json, normalization, progress,
            args.num_grids)
        with open(output_dir / f"lines_{image_set.name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        rows_by_set[image_set.name] = rows
        spec = image_set.spec
        results[image_set.name] = {
            "label": image_set.label, "sampler": spec.sampler if spec else None, "steps": spec.steps if spec else None,
            "images": len(prompts) * num_images,
            "lines_ocr_cannot_output": sum(bool(r["ocr_cannot_output"]) for r in rows),
            **summarize(scores), "timing": image_set.timing,
        }
    teacher_s = results.get("teacher", {}).get("timing", {}).get("seconds_per_image")
    student_s = results.get("student", {}).get("timing", {}).get("seconds_per_image")
    generated = not args.images_from_dataset
    metrics = {
        "command": "python -m student_model_v2.eval_ocr " + shlex.join(argv),
        "mode": "generated" if generated else "dataset",
        "benchmark_json": str(benchmark_json),
        "prompts": len(prompts),
        "lines": sum(len(p.lines) for p in prompts),
        "images_per_prompt": num_images,
        "resolution": args.resolution,
        "teacher_ckpt": (args.teacher_ckpt or "random init (init rule)") if generated else None,
        "lora_path": args.lora_path if generated else None,
        "dtype": args.dtype if generated else None,
        "protocol": {
            "recognizer": "PP-OCRv4 rec (rapidocr_onnxruntime), recognition only",
            "crop": "GT polygon mask -> min-area rectangle, deskewed; rotated 90 deg CCW when h > 1.2 w",
            "normalization": dataclasses.asdict(normalization),
            "dictionary": args.dictionary, "max_lines": args.max_lines, "max_chars": args.max_chars,
            "seed": args.seed, "a_prompt": args.a_prompt, "text_caption_phrase": EVAL_TEXT_PHRASE,
        },
        "models": results,
        "speedup": round(teacher_s / student_s, 3) if teacher_s and student_s else None,
        "issues": dict(sorted(issues.items())),
    }
    write_json(metrics, output_dir / "metrics.json")
    write_chart(metrics, output_dir / "metrics.png", font)
    rows = [grid_row(index, prompt, sets, rows_by_set, grid_images)
            for index, prompt in enumerate(prompts[: args.num_grids])]
    grids = write_grids(rows, [s.label for s in sets], output_dir / "grids", font)
    write_report(metrics, output_dir / "report.md", "metrics.png", [g.relative_to(output_dir) for g in grids])
    return metrics


def grid_row(index: int, prompt: EvalPrompt, sets: Sequence[ImageSet], rows_by_set: dict[str, list[dict]],
             grid_images: dict[str, list[np.ndarray]]) -> GridRow:
    """Prompt ``index`` and, per image set, its first image with what the OCR read on it."""
    cells = []
    for image_set in sets:
        reads = [(r["pred"], r["gt"], r["sen_acc"] == 1.0) for r in rows_by_set[image_set.name]
                 if r["prompt"] == prompt.key and r["image"] == 0]
        cells.append(GridCell(grid_images[image_set.name][index], reads))
    return GridRow(prompt.caption, [(line.text, line.polygon) for line in prompt.lines], cells)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    metrics = evaluate(args, argv)
    summary = {name: {"line_reads": m["overall"]["lines"], "sen_acc": m["overall"]["sen_acc"],
                      "ned": m["overall"]["ned"], "seconds_per_image": m["timing"].get("seconds_per_image")}
               for name, m in metrics["models"].items()}
    print(json.dumps({"output_dir": args.output_dir, "models": summary, "speedup": metrics["speedup"]}, indent=1,
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
