"""Sample the distilled student (no CFG) — or the teacher — from the command line.

``--sampler auto`` (default) follows the adapter's ``distillation.json``: a v2_5 PCM adapter samples
deterministically with one step per phase (``--num_inference_steps`` must equal its phase count), an LCM or
x0-regression adapter with LCM multistep sampling (4 steps by default); ``lcm``, ``pcm`` and ``tcd`` (with
``--gamma``) force a sampler, and a sampler or step count the adapter was not trained for is refused.

Three modes, picked by the flags:

* dataset sample (default): ``--dataset_json FILE --sample_index I`` or ``--use_mock_dataset``; the
  sample's own captions, glyphs, positions and masked image, as in training;
* free-form generation: ``--prompt 'a shop sign that reads "OPEN"' --positions '[[96, 200, 416, 300]]'``
  (JSON polygons/boxes, a ``.json`` file, or a mask image with white text areas);
* editing: ``--prompt ... --edit_image photo.jpg --edit_mask mask.png`` (white = repaint here).

AnyText2's optional swaps restyle the teacher (and so the student built on it): ``--base_model_path`` loads
another SD1.5 checkpoint's UNet and text encoder over it, ``--community_lora PATH RATIO`` (repeatable)
merges a kohya or diffusers SD1.5 LoRA into them; the student LoRA is applied afterwards.

Writes ``--output_path`` (``<stem>_<k>.png`` for several images), ``<stem>_glyphs.png`` and
``<stem>_font_hint.png`` (debug renders), ``<stem>.json`` (settings, captions, seed, timings, warnings)
and with ``--compare_teacher`` ``<stem>_compare.png``: student | teacher side by side with their
end-to-end timings in the caption. Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import numpy as np
import torch
from PIL import Image, ImageDraw

from student_model_v2.anytext2.acceleration import COMPILE_MODES
from student_model_v2.anytext2.checkpoint import DTYPES
from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH, FontError, GlyphFont
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.distillation.samplers import plan_student_sampling
from student_model_v2.inference.checks import (
    check_adapter_flag,
    check_size,
    check_steps,
    check_student_steps,
    resolve_output_path,
)
from student_model_v2.inference.inputs import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    SORT_PRIORITIES,
    InferenceInputError,
    binarize_mask,
    load_image_file,
    load_mask_file,
    parse_positions_argument,
    parse_prompt,
)
from student_model_v2.inference.model_swaps import normalise_swaps
from student_model_v2.inference.pipeline import (
    AnyText2Pipeline,
    Conditioning,
    InferenceResult,
    LineStyle,
    SamplingOptions,
    TextRequest,
    build_conditioning,
    conditioning_from_sample,
    resolve_seed,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "models_yaml" / "anytext2_sd15.yaml"
DEFAULT_CKPT = "models/anytext_v2.0.ckpt"
DEFAULT_DATASET_JSON = REPO_ROOT / "demodataset" / "annotations" / "demo_data.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML")
    model.add_argument("--teacher_ckpt", default=DEFAULT_CKPT,
                       help="AnyText2 checkpoint; an empty string builds the random init-rule teacher (tests only)")
    model.add_argument("--trust_checkpoint", action="store_true", help="allow pickled objects in an old .ckpt")
    model.add_argument("--lora_path", default=None, help="student adapter folder (required unless --sampler teacher)")
    model.add_argument("--lora_scale", type=float, default=1.0)
    model.add_argument("--no_merge_lora", action="store_true",
                       help="keep the adapter unmerged (slower; the teacher stays available)")
    model.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    model.add_argument("--font_path", default=str(DEFAULT_FONT_PATH), help="glyph font (glyphs and OCR strips)")
    model.add_argument("--base_model_path", default=None,
                       help="another SD1.5 checkpoint (LDM format) whose UNet and text encoder replace the teacher's")
    model.add_argument("--community_lora", nargs=2, action="append", default=[], metavar=("PATH", "RATIO"),
                       help="merge an SD1.5 LoRA (kohya or diffusers file) with this ratio; repeatable")

    speed = parser.add_argument_group("speed (anytext2/acceleration.py; off by default: within float round-off of "
                                      "eager, not bit-exact)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet, WriteNet and VAE decoder (the first request at a size compiles)")
    speed.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                       help="with --compile: reduce-overhead = CUDA graphs for the UNet's fixed-shape sampling calls")
    speed.add_argument("--channels_last", action="store_true",
                       help="channels-last weights for the UNet, WriteNet and VAE decoder (faster convolutions on GPUs)")

    data = parser.add_argument_group("dataset sample")
    data.add_argument("--dataset_json", default=str(DEFAULT_DATASET_JSON))
    data.add_argument("--use_mock_dataset", action="store_true")
    data.add_argument("--sample_index", type=int, default=0, help="taken modulo the dataset length")
    data.add_argument("--resolution", type=int, default=512, help="dataset resolution; default free-form size")

    free = parser.add_argument_group("free-form generation and editing")
    free.add_argument("--prompt", default=None, help='image prompt; quoted spans are the texts to draw')
    free.add_argument("--text_prompt", default=None, help="separate text prompt holding the quoted texts")
    free.add_argument("--positions", default=None,
                      help="JSON polygons [[x,y],...] / boxes [x0,y0,x1,y1] (text or .json file) or a mask image")
    free.add_argument("--invert_positions", action="store_true",
                      help="position/edit masks are black on white (AnyText2's example files)")
    free.add_argument("--sort_priority", choices=SORT_PRIORITIES, default="↕", help="order of mask positions")
    free.add_argument("--width", type=int, default=None)
    free.add_argument("--height", type=int, default=None)
    free.add_argument("--edit_image", default=None, help="image to edit")
    free.add_argument("--edit_mask", default=None, help="mask of the areas to repaint (white)")
    free.add_argument("--fonts", nargs="+", default=[], help="per line: a font file for the font hint, or 'none'")
    free.add_argument("--mimic", nargs=3, action="append", default=[], metavar=("LINE", "IMAGE", "MASK"),
                      help="line (1-based) whose font is copied from the masked text of an image")
    free.add_argument("--colors", nargs="+", default=[], help="per line: 'r,g,b', '#rrggbb' or 'none' (500 = unspecified)")
    free.add_argument("--font_hollow", action="store_true", help="AnyText2's hollow font hint (needs font/bg_noise.png)")
    free.add_argument("--revise_position", action="store_true",
                      help="fit each line's position to its rendered glyphs (generation only, AnyText2's Revise Position)")
    free.add_argument("--a_prompt", default=DEFAULT_A_PROMPT)
    free.add_argument("--n_prompt", default=DEFAULT_N_PROMPT)

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--sampler", choices=["auto", "lcm", "pcm", "tcd", "teacher", "student"], default="auto",
                          help="auto: the adapter's own sampler (PCM for a v2_5 adapter, else LCM); "
                               "student = auto (older name)")
    sampling.add_argument("--num_inference_steps", type=int, default=None,
                          help="student steps: a PCM adapter's phase count (its default), else 1 to the adapter's training grid "
                               "(recorded; 50 when not; default 4)")
    sampling.add_argument("--gamma", type=float, default=0.3, help="TCD stochasticity in [0, 1] (--sampler tcd)")
    sampling.add_argument("--teacher_steps", type=int, default=20, help="teacher DDIM steps, 1 to 1000")
    sampling.add_argument("--guidance_scale", type=float, default=7.5, help="teacher CFG scale")
    sampling.add_argument("--eta", type=float, default=0.0, help="teacher DDIM eta")
    sampling.add_argument("--anytext2_ddim_grid", action="store_true",
                          help="AnyText2's DDIM timesteps (more steps when 1000 %% steps != 0)")
    sampling.add_argument("--strength", type=float, default=1.0, help="WriteNet control scale")
    sampling.add_argument("--attnx_scale", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=-1, help="-1 draws one (recorded in the JSON)")
    sampling.add_argument("--num_images", type=int, default=1)
    sampling.add_argument("--compare_teacher", action="store_true",
                          help="also sample the teacher and write a student | teacher grid with timings")

    parser.add_argument("--output_path", default="student_model_v2/sample.png",
                        help="image file (.png, .jpg, ...) in an existing folder; a folder gets sample.png inside it")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag checked before the (slow) model load (the adapter against the model's config, too).

    ``--output_path`` is resolved in place (a folder gets ``sample.png``) so the run cannot fail at its end.
    """
    if args.compile_mode != "default" and not args.compile:
        raise InferenceInputError(f"--compile_mode {args.compile_mode} needs --compile")
    if args.edit_image and not args.edit_mask and not args.positions:
        raise InferenceInputError("--edit_image needs --edit_mask (white = areas to repaint) or --positions")
    if args.edit_mask and args.positions:
        raise InferenceInputError("give either --edit_mask or --positions, not both")
    if args.edit_mask and not args.edit_image:
        raise InferenceInputError("--edit_mask needs --edit_image")
    if (args.edit_image or args.positions) and args.prompt is None:
        raise InferenceInputError('free-form generation and editing need --prompt with the texts in double quotes')
    if args.sampler != "teacher" and not args.lora_path:
        raise InferenceInputError("--lora_path (the student adapter folder) is required unless --sampler teacher")
    if not 0.0 <= args.gamma <= 1.0:
        raise InferenceInputError(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.compare_teacher and args.sampler == "teacher":
        raise InferenceInputError("--compare_teacher compares the student with the teacher: drop --sampler teacher")
    if args.num_images < 1:
        raise InferenceInputError(f"--num_images {args.num_images}: must be at least 1")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceInputError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    check_size("--resolution", args.resolution)
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None:
            check_size(flag, value)
            if args.edit_image:
                raise InferenceInputError(f"{flag}: editing keeps the edit image's size (floored to multiples of 64); "
                                          f"drop {flag}")
    check_line_flags(args)
    base_model_path, community_loras = normalise_swaps(args.base_model_path, args.community_lora)
    for flag, path in [("--base_model_path", base_model_path)] + [("--community_lora", p) for p, _ in community_loras]:
        if path and not Path(path).is_file():
            raise InferenceInputError(f"{flag} {path}: no such file")
    if not Path(args.config).is_file():
        raise InferenceInputError(f"--config {args.config}: no such model YAML")
    adapter = check_adapter_flag("--lora_path", args.config, args.lora_path) if args.lora_path else None
    if adapter is not None and (args.sampler != "teacher" or args.compare_teacher):
        check_student_sampling(args, adapter.info)
    if args.sampler == "teacher" or args.compare_teacher:
        check_steps("--teacher_steps", args.teacher_steps, teacher=True)
    args.output_path = str(resolve_output_path("--output_path", args.output_path))


def check_student_sampling(args: argparse.Namespace, info: AdapterInfo | None) -> None:
    """The student's step count and sampler against what its adapter was trained for (``distillation.json``)."""
    check_student_steps("--num_inference_steps", args.num_inference_steps, info)
    student_sampler = "auto" if args.sampler in ("student", "teacher") else args.sampler
    try:
        plan_student_sampling(student_sampler, args.num_inference_steps, info)
    except ValueError as exc:
        raise InferenceInputError(f"--sampler {student_sampler} / --num_inference_steps: {exc}") from exc


def check_line_flags(args: argparse.Namespace) -> None:
    """``--fonts``, ``--colors`` and ``--mimic`` give one value per quoted text of the prompt, no more."""
    given = [flag for flag, value in (("--fonts", args.fonts), ("--colors", args.colors), ("--mimic", args.mimic))
             if value]
    if not given:
        return
    if args.prompt is None:
        raise InferenceInputError(f"{given[0]} styles the quoted texts of --prompt; dataset samples keep their own")
    texts = len(parse_prompt(args.text_prompt if args.text_prompt is not None else args.prompt).texts)
    lines = f"1 to {texts}" if texts > 1 else ("1" if texts == 1 else "none: the prompt quotes no text")
    for flag, values in (("--fonts", args.fonts), ("--colors", args.colors)):
        if len(values) > texts:
            raise InferenceInputError(f"{flag} gives {len(values)} values but the prompt quotes {texts} text"
                                      f"{'' if texts == 1 else 's'}: give one per quoted text")
    for line, _, _ in args.mimic:
        if not line.isdigit() or not 1 <= int(line) <= texts:
            raise InferenceInputError(f"--mimic {line}: LINE is the number of a quoted text of the prompt ({lines})")


def line_styles(args: argparse.Namespace) -> list[LineStyle]:
    count = max([len(args.fonts), len(args.colors)] + [int(line) for line, _, _ in args.mimic if line.isdigit()] + [0])
    styles = [LineStyle() for _ in range(count)]
    for index, font in enumerate(args.fonts):
        styles[index].font = None if font.lower() == "none" else font
    for index, color in enumerate(args.colors):
        styles[index].color = color
    for line, image, mask in args.mimic:
        style = styles[int(line) - 1]
        if style.font is not None:
            raise InferenceInputError(f"line {line} has both a font (--fonts) and --mimic; choose one")
        style.mimic_image = load_image_file(image, f"mimic image of line {line}")
        style.mimic_mask = load_image_file(mask, f"mimic mask of line {line}")
    return styles


def text_request(args: argparse.Namespace) -> TextRequest:
    positions = None
    if args.edit_mask:
        positions = load_mask_file(args.edit_mask, "edit mask", args.invert_positions)
        flag = f"--edit_mask {args.edit_mask}"
    elif args.positions:
        positions = parse_positions_argument(args.positions, args.invert_positions)
        flag = f"--positions {args.positions}"
    if isinstance(positions, np.ndarray) and not binarize_mask(positions).any():
        raise InferenceInputError(f"{flag}: the mask is empty (all black); paint the text areas white, or add "
                                  "--invert_positions for black text areas on white")
    size = args.resolution
    if isinstance(positions, np.ndarray) and not args.edit_image:
        size_h, size_w = positions.shape[:2]
    else:
        size_h = size_w = size
    return TextRequest(
        prompt=args.prompt, text_prompt=args.text_prompt, positions=positions, line_styles=line_styles(args),
        width=args.width if args.width is not None else size_w,
        height=args.height if args.height is not None else size_h,
        edit_image=load_image_file(args.edit_image, "edit image") if args.edit_image else None,
        a_prompt=args.a_prompt, n_prompt=args.n_prompt, sort_priority=args.sort_priority, font_hollow=args.font_hollow,
        revise_position=args.revise_position,
    )


def dataset_conditioning(args: argparse.Namespace, seed: int) -> Conditioning:
    from student_model_v2.data.dataset import AnyTextDataset, MockAnyTextDataset
    from student_model_v2.data.json_index import DatasetFileError

    try:
        if args.use_mock_dataset:
            dataset = MockAnyTextDataset(10, resolution=args.resolution, seed=seed)
        else:
            dataset = AnyTextDataset(args.dataset_json, resolution=args.resolution, seed=seed)
        sample = dataset[args.sample_index % len(dataset)]
    except (DatasetFileError, FileNotFoundError, FontError, ValueError) as exc:
        raise InferenceInputError(f"dataset: {exc}") from exc
    conditioning = conditioning_from_sample(sample, args.n_prompt)
    conditioning.warnings += [f"data issue {key}: {count}" for key, count in sample["data_issues"].items()]
    return conditioning


def prepare_conditioning(args: argparse.Namespace, seed: int) -> Conditioning:
    """The conditioning the chosen mode builds (no model needed)."""
    if args.prompt is None:
        return dataset_conditioning(args, seed)
    try:
        glyph_font = GlyphFont(args.font_path)
    except (FileNotFoundError, FontError) as exc:
        raise InferenceInputError(f"glyph font: {exc}") from exc
    return build_conditioning(text_request(args), glyph_font)


def sampling_options(args: argparse.Namespace, sampler: str, seed: int) -> SamplingOptions:
    return SamplingOptions(
        sampler=sampler, steps=args.teacher_steps if sampler == "teacher" else args.num_inference_steps,
        guidance_scale=args.guidance_scale, eta=args.eta, strength=args.strength, attnx_scale=args.attnx_scale,
        num_images=args.num_images, seed=seed, anytext2_ddim_grid=args.anytext2_ddim_grid, gamma=args.gamma,
    )


def run_samplers(args: argparse.Namespace, pipe: AnyText2Pipeline, conditioning: Conditioning,
                 seed: int) -> dict[str, InferenceResult]:
    """The requested runs. With --compare_teacher and a merged LoRA the teacher runs first on the base
    weights, then the LoRA is merged; each timed run follows a one-step warm-up."""
    merge = not args.no_merge_lora
    results: dict[str, InferenceResult] = {}
    if args.compare_teacher:
        if not merge:
            pipe.load_lora(args.lora_path, args.lora_scale, merge=False)
        warm = sampling_options(args, "teacher", seed)
        warm.steps = 1
        pipe.generate(conditioning, warm)
        results["teacher"] = pipe.generate(conditioning, sampling_options(args, "teacher", seed))
        if merge:
            pipe.load_lora(args.lora_path, args.lora_scale, merge=True)
        student = "auto" if args.sampler in ("student", "teacher") else args.sampler
        warm = sampling_options(args, student, seed)
        if pipe.student_plan(warm).name != "pcm":  # a PCM adapter serves exactly its phase count
            warm.steps = 1
        pipe.generate(conditioning, warm)
        results["student"] = pipe.generate(conditioning, sampling_options(args, student, seed))
        return results
    if args.sampler != "teacher":
        pipe.load_lora(args.lora_path, args.lora_scale, merge=merge)
    role = "teacher" if args.sampler == "teacher" else "student"
    results[role] = pipe.generate(conditioning, sampling_options(args, args.sampler, seed))
    return results


def output_paths(output_path: Path, count: int) -> list[Path]:
    if count == 1:
        return [output_path]
    return [output_path.with_name(f"{output_path.stem}_{k}{output_path.suffix}") for k in range(count)]


def compare_grid(student: InferenceResult, teacher: InferenceResult, guidance_scale: float) -> Image.Image:
    """Rows = images; columns = student | teacher; caption with the end-to-end seconds of each run."""
    height, width = student.images[0].shape[:2]
    gap = 4
    rows = [np.concatenate([s, np.full((height, gap, 3), 255, np.uint8), t], axis=1)
            for s, t in zip(student.images, teacher.images)]
    grid = np.concatenate([np.concatenate([r, np.full((gap, r.shape[1], 3), 255, np.uint8)]) for r in rows])[:-gap]
    speedup = teacher.timings["total"] / max(student.timings["total"], 1e-9)
    how = f"{student.steps} {(student.student_sampler or 'lcm').upper()} steps"
    caption = (f"left: student, {how}, {student.timings['total']:.2f} s | "
               f"right: teacher, {teacher.steps} DDIM steps, CFG {guidance_scale:g}, {teacher.timings['total']:.2f} s | "
               f"speed-up {speedup:.1f}x (end to end: encode + sample + decode; seed {student.seed})")
    canvas_w = max(grid.shape[1], 360)
    font = GlyphFont(DEFAULT_FONT_PATH).get(12)
    chars = max(20, int(canvas_w / max(font.getlength("x"), 1)) - 2)
    lines = textwrap.wrap(caption, chars)
    line_h = 16
    canvas = Image.new("RGB", (canvas_w, grid.shape[0] + line_h * len(lines) + 8), "white")
    canvas.paste(Image.fromarray(grid), ((canvas_w - grid.shape[1]) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, grid.shape[0] + 4 + k * line_h), line, fill="black", font=font)
    return canvas


def save_outputs(args: argparse.Namespace, conditioning: Conditioning, results: dict[str, InferenceResult],
                 pipe: AnyText2Pipeline) -> dict:
    output = Path(args.output_path)
    main_result = results.get("student") or results["teacher"]
    images = [str(p) for p in output_paths(output, len(main_result.images))]
    for path, image in zip(images, main_result.images):
        Image.fromarray(image).save(path)
    stem = output.with_suffix("")
    Image.fromarray(conditioning.glyph_image).save(f"{stem}_glyphs.png")
    Image.fromarray(conditioning.font_hint_image).save(f"{stem}_font_hint.png")
    report = {
        "mode": "dataset" if args.prompt is None else conditioning.mode,
        "conditioning_mode": conditioning.mode,
        "images": images,
        "texts": conditioning.texts,
        "image_caption": conditioning.image_caption,
        "text_caption": conditioning.text_caption,
        "negative_caption": conditioning.negative_caption,
        "size": [conditioning.width, conditioning.height],
        "lora_path": args.lora_path, "lora_merged": pipe.lora_merged, "lora_scale": args.lora_scale,
        "teacher_ckpt": args.teacher_ckpt or "random init (init rule)",
        "base_model_path": pipe.recipe.base_model_path,
        "community_loras": [list(lora) for lora in pipe.recipe.community_loras],
        "model_swaps": pipe.swap_notes,
        "device": str(pipe.device), "dtype": args.dtype,
        "compiled": pipe.acceleration.compiled if pipe.acceleration else None,
        "channels_last": bool(pipe.acceleration and pipe.acceleration.channels_last),
        "runs": {name: {"sampler": r.sampler, "student_sampler": r.student_sampler, "steps": r.steps, "seed": r.seed,
                        "seconds": {k: round(v, 4) for k, v in r.timings.items()}, "warnings": r.warnings}
                 for name, r in results.items()},
    }
    if "student" in results and "teacher" in results:
        grid_path = f"{stem}_compare.png"
        compare_grid(results["student"], results["teacher"], args.guidance_scale).save(grid_path)
        report["compare"] = grid_path
        report["speedup"] = round(results["teacher"].timings["total"] / results["student"].timings["total"], 3)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        seed = resolve_seed(args.seed)
        conditioning = prepare_conditioning(args, seed)
        pipe = AnyText2Pipeline.from_pretrained(
            args.config, args.teacher_ckpt or None, device=args.device, dtype=DTYPES[args.dtype],
            font_path=args.font_path, trust_checkpoint=args.trust_checkpoint, base_model_path=args.base_model_path,
            community_loras=args.community_lora, compile=args.compile, compile_mode=args.compile_mode,
            channels_last=args.channels_last)
        results = run_samplers(args, pipe, conditioning, seed)
        report = save_outputs(args, conditioning, results, pipe)
    except InferenceInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warnings = dict.fromkeys(w for r in report["runs"].values() for w in r["warnings"])
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
