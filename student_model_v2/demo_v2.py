"""Gradio demo of the AnyText2 LCM-LoRA student (4-8 steps, no CFG) and its teacher (DDIM with CFG).

The original ``demo_v2.py``'s features on :mod:`student_model_v2.inference.pipeline`: generation and
editing tabs, positions drawn on a canvas (or typed as JSON boxes/polygons), up to five lines with a
font ("No Font", "Mimic From Image" or a font from ``font/``) and a colour each, hollow font, sort
priority, revise position, image count, size, strength, attnx scale, seed, eta, added/negative prompt,
base model path and community "LoRA Path and Ratio" (applied on each Run, the model rebuilt only when they
change), debug view, examples; results are saved to ``--save_dir``. Everything about conditioning,
rendering, sampling and model swaps is the pipeline's; this module only turns widget values into a
:class:`~student_model_v2.inference.pipeline.TextRequest` and
:class:`~student_model_v2.inference.pipeline.SamplingOptions`. Bad input is shown as a message
(``gr.Error`` with the pipeline's :class:`InferenceInputError` text), never as a traceback.

Run (no checkpoint needed: the tiny random-init model, for trying the UI)::

    python -m student_model_v2.demo_v2
    python -m student_model_v2.demo_v2 --model_path models/anytext_v2.0.ckpt \\
        --student_lora_path runs/v2_4/checkpoint-final [--use_ddim_sampler]

No translator and no network access; binds 127.0.0.1 unless ``--host`` (or ``GRADIO_LISTEN``) says
otherwise; Gradio analytics are off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from student_model_v2.anytext2.checkpoint import DTYPES
from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.inference.checks import check_adapter_flag
from student_model_v2.inference.inputs import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    SORT_PRIORITIES,
    UNSPECIFIED_COLOR,
    InferenceInputError,
    as_rgb_image,
    parse_color,
    parse_positions_argument,
    resize_mask,
)
from student_model_v2.inference.model_swaps import LORA_EXAMPLE, format_lora_list, parse_lora_list
from student_model_v2.inference.pipeline import (
    HOLLOW_NOISE_PATH,
    MAX_SEED,
    STUDENT_STEPS,
    TEACHER_STEPS,
    AnyText2Pipeline,
    InferenceResult,
    LineStyle,
    SamplingOptions,
    TextRequest,
    default_device,
)

# Gradio reads this whenever it would send telemetry or check its version: never, in this demo.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "models_yaml" / "anytext2_tiny.yaml"
FULL_CONFIG = REPO_ROOT / "models_yaml" / "anytext2_sd15.yaml"
FONT_DIR = REPO_ROOT / "font"
EXAMPLE_IMAGES = REPO_ROOT / "demodataset" / "imgs"
DEFAULT_SAVE_DIR = "outputs/demo"
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
NO_FONT = "No Font"
MIMIC_FONT = "Mimic From Image"
MAX_LINES = 5
LCM_MIN_STEPS, LCM_MAX_STEPS = 4, 8
TEACHER_MAX_STEPS = 100
DEFAULT_CFG = 7.5
SAMPLER_CHOICES = [("Student: LCM-LoRA, 4-8 steps, no CFG", "student"), ("Teacher: DDIM with CFG", "teacher")]
DARK_STROKE = 120  # a layer without transparency is read as a black-on-white drawing: darker than this is drawn
UNSPECIFIED_PICKS = ((0, 0, 0), (255, 255, 255))  # picker colours that leave the colour to the model (as upstream)

LCM_NOTE = (f"**Student (LCM) mode:** CFG is off (guidance was distilled into the LoRA), steps are limited to "
            f"{LCM_MIN_STEPS}-{LCM_MAX_STEPS}, eta and the negative prompt are not used.")
TEACHER_NOTE = ("**Teacher (DDIM) mode:** classifier-free guidance with the CFG scale and the negative prompt, free "
                "step count.")


# --------------------------------------------------------------------------------------------------
# widget values -> pipeline inputs (no gradio objects, so they can be tested alone)


def bundled_fonts(font_dir: str | os.PathLike[str] = FONT_DIR) -> dict[str, Path]:
    """Font files of ``font_dir`` by file stem, in name order (the per-line font choices)."""
    folder = Path(font_dir)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in FONT_SUFFIXES and p.is_file()}


def drawn_mask(editor_value: dict | None) -> np.ndarray | None:
    """White-on-black (H, W) uint8 mask of what was painted on an image editor, or None when nothing was.

    A layer with transparency counts where it is opaque (the brush); a fully opaque layer is read as a
    black-on-white drawing (AnyText2's example position files), its dark pixels being the drawn areas.
    """
    if not editor_value or not editor_value.get("layers"):
        return None
    mask = None
    for layer in editor_value["layers"]:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4 and (layer[..., 3] < 255).any():
            painted = layer[..., 3]
        else:
            gray = layer if layer.ndim == 2 else layer[..., :3].min(axis=2)
            painted = np.where(gray < DARK_STROKE, 255, 0)
        painted = painted.astype(np.uint8)
        mask = painted if mask is None else np.maximum(mask, painted)
    return mask if mask is not None and mask.any() else None


def positions_from_json(text: str | None) -> list[np.ndarray] | None:
    """Typed positions: a JSON list of boxes ``[x0, y0, x1, y1]`` and/or polygons ``[[x, y], ...]``; blank = none."""
    if text is None or not text.strip():
        return None
    if not text.lstrip().startswith("["):
        raise InferenceInputError("positions must be a JSON list, e.g. [[10, 10, 120, 50]] for one box or "
                                  "[[[10, 10], [120, 12], [118, 50], [8, 48]]] for one polygon")
    return parse_positions_argument(text)


def picked_color(value: Any, line: int) -> tuple[int, int, int] | None:
    """A colour picker's value; pure black or white (the picker's untouched states) mean "unspecified"."""
    rgb = parse_color(value, line)
    return None if rgb in UNSPECIFIED_PICKS or rgb == UNSPECIFIED_COLOR else rgb


def line_styles(fonts: list[str | None], colors: list[Any], mimics: list[dict | None],
                font_paths: dict[str, Path]) -> list[LineStyle]:
    """One :class:`LineStyle` per line slot, trailing default slots dropped."""
    styles = []
    for line, (font, color, mimic) in enumerate(zip(fonts, colors, mimics), start=1):
        style = LineStyle(color=picked_color(color, line))
        if font == MIMIC_FONT:
            if not mimic or mimic.get("background") is None:
                raise InferenceInputError(f"line {line}: '{MIMIC_FONT}' needs an image (upload it below the line's "
                                          "font choice) with the text to imitate painted over")
            image = as_rgb_image(mimic["background"], f"mimic image of line {line}")
            mask = drawn_mask(mimic)
            style.mimic_image = image
            style.mimic_mask = mask if mask is not None else np.zeros(image.shape[:2], np.uint8)
        elif font not in (None, "", NO_FONT):
            if font not in font_paths:
                raise InferenceInputError(f"line {line}: unknown font {font!r}; choose one of "
                                          f"{', '.join([NO_FONT, MIMIC_FONT, *font_paths])}")
            style.font = font_paths[font]
        styles.append(style)
    while styles and all(value is None for value in vars(styles[-1]).values()):
        styles.pop()
    return styles


def sampling_options(sampler: str, steps: float, cfg_scale: float, eta: float, strength: float, attnx_scale: float,
                     image_count: float, seed: float,
                     adapter_info: AdapterInfo | None = None) -> tuple[SamplingOptions, list[str]]:
    """Options for the chosen sampler; the student's rules are enforced here: CFG off, and 4-8 LCM steps, or
    exactly the phase count for a PCM adapter (its ``distillation.json``), which picks its own sampler."""
    notes = []
    steps = int(steps)
    if sampler == "student" and adapter_info is not None and adapter_info.objective == "pcm":
        phases = adapter_info.num_phases
        if steps != phases:
            notes.append(f"the PCM student samples exactly {phases} steps (one per phase): using {phases} "
                         f"instead of {steps}")
        steps, cfg_scale, eta = phases, 1.0, 0.0
    elif sampler == "student":
        clamped = min(max(steps, LCM_MIN_STEPS), LCM_MAX_STEPS)
        if clamped != steps:
            notes.append(f"the LCM student samples {LCM_MIN_STEPS}-{LCM_MAX_STEPS} steps: using {clamped} instead "
                         f"of {steps}")
        steps, cfg_scale, eta = clamped, 1.0, 0.0
    elif sampler != "teacher":
        raise InferenceInputError(f"sampler must be 'student' or 'teacher', got {sampler!r}")
    return SamplingOptions(sampler=sampler, steps=steps, guidance_scale=float(cfg_scale), eta=float(eta),
                           strength=float(strength), attnx_scale=float(attnx_scale), num_images=int(image_count),
                           seed=int(seed)), notes


@dataclass
class UiRequest:
    """The prompt-and-position widgets of one click."""

    mode: str
    img_prompt: str
    text_prompt: str
    positions_json: str
    draw_img: dict | None
    edit_img: dict | None
    sort_priority: str
    width: int
    height: int
    font_hollow: bool
    a_prompt: str
    n_prompt: str


def text_request(ui: UiRequest, styles: list[LineStyle]) -> tuple[TextRequest, list[str]]:
    """The pipeline request of a click, and notes for the user."""
    notes = []
    if ui.mode not in ("gen", "edit"):
        raise InferenceInputError(f"mode must be 'gen' or 'edit', got {ui.mode!r}")
    if not (ui.img_prompt or "").strip():
        raise InferenceInputError("the image prompt is empty: describe the image to generate")
    positions: Any = positions_from_json(ui.positions_json)
    editor = ui.draw_img if ui.mode == "gen" else ui.edit_img
    drawn = drawn_mask(editor)
    if positions is not None and drawn is not None:
        notes.append("positions were both typed (JSON) and drawn: the typed ones are used")
    edit_image = None
    if ui.mode == "edit":
        if not ui.edit_img or ui.edit_img.get("background") is None:
            raise InferenceInputError("editing needs an image: upload one in the Text Editing tab")
        edit_image = as_rgb_image(ui.edit_img["background"], "edit image")
    if positions is None and drawn is not None:
        if ui.mode == "gen" and drawn.shape != (int(ui.height), int(ui.width)):
            drawn = resize_mask(drawn, int(ui.width), int(ui.height))
        positions = drawn
    text_prompt = ui.text_prompt if (ui.text_prompt or "").strip() else None
    return TextRequest(prompt=ui.img_prompt, text_prompt=text_prompt, positions=positions, line_styles=styles,
                       width=int(ui.width), height=int(ui.height), edit_image=edit_image, a_prompt=ui.a_prompt or "",
                       n_prompt=ui.n_prompt or "", sort_priority=ui.sort_priority,
                       font_hollow=bool(ui.font_hollow)), notes


def save_results(save_dir: Path, result: InferenceResult, settings: dict) -> list[Path]:
    """The images as PNG plus one JSON of settings, seed, timings and warnings per click."""
    save_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now():%Y%m%d-%H%M%S-%f}_seed{result.seed}"
    paths = [save_dir / f"{stem}_{k}.png" for k in range(len(result.images))]
    for path, image in zip(paths, result.images):
        Image.fromarray(image).save(path)
    record = {**settings, "images": [p.name for p in paths], "seed": result.seed, "sampler": result.sampler,
              "steps": result.steps, "prompt": result.prompt, "warnings": result.warnings,
              "seconds": {k: round(v, 4) for k, v in result.timings.items()}}
    (save_dir / f"{stem}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    return paths


def grid_canvas(width: int, height: int) -> dict:
    """An empty position canvas: light grey with a 5x5 grid and a red centre mark, as AnyText2's."""
    image = np.full((height, width, 3), 200, np.uint8)
    image[:: max(width // 5, 1)] = 150
    image[:, :: max(width // 5, 1)] = 150
    image[height // 2 - 4: height // 2 + 4, width // 2 - 4: width // 2 + 4] = (200, 0, 0)
    return {"background": image, "layers": [], "composite": None}


# --------------------------------------------------------------------------------------------------
# the Gradio app


def refuse_bad_payloads(component: gr.components.Component) -> gr.components.Component:
    """Make a value Gradio's own checks refuse (an API call with a slider out of range, a non-number, an
    unreadable upload) a message naming the widget, shown to the caller without a server traceback.

    The check wraps the instance's ``preprocess``: a subclass would do, but Gradio writes a ``.pyi`` stub
    beside the source file of every component class it sees defined.
    """
    preprocess = component.preprocess
    label = component.label or component.elem_id or type(component).__name__

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error as exc:
            raise gr.Error(f"'{label}': {exc.message}", title="Invalid input", print_exception=False) from exc
        except (UnidentifiedImageError, OSError, TypeError, ValueError, KeyError, AttributeError) as exc:
            if isinstance(component, gr.ImageEditor):
                raise gr.Error(f"cannot read the image given for '{label}': {exc}. Upload a PNG, JPEG or WebP "
                               "image.", title="Unreadable image", print_exception=False) from exc
            shown = repr(payload) if len(repr(payload)) <= 60 else repr(payload)[:60] + "..."
            raise gr.Error(f"'{label}': cannot use the value {shown} ({exc})", title="Invalid input",
                           print_exception=False) from exc

    component.preprocess = checked
    return component


def image_input(**kwargs: Any) -> gr.ImageMask:
    """An image mask whose unreadable uploads give a clear message instead of Gradio's component error."""
    return refuse_bad_payloads(gr.ImageMask(elem_classes=["keep-margin-strokes"], **kwargs))


def brush_size(width: int, height: int) -> int:
    """Brush diameter in canvas pixels: a twenty-fourth of the shorter side, so a stroke is about a text
    line's height at any canvas size (Gradio's default, 25 px, covers a fifth of a 128-px canvas)."""
    return max(3, round(min(width, height) / 24))


def edit_brush_update(editor: dict | None) -> dict:
    """The edit canvas's brush scaled to the uploaded image, as the draw canvas's is to its size (the
    default brush is sized for neither a small nor a large photo)."""
    background = editor.get("background") if editor else None
    if background is None:
        return gr.update()
    height, width = np.asarray(background).shape[:2]
    return gr.update(brush=gr.Brush(default_size=brush_size(width, height), colors=["#000000"], color_mode="fixed"))


def position_canvas_update(width: float, height: float) -> dict:
    """The draw canvas at a new size: an empty grid of that size with a brush scaled to it."""
    width, height = int(width), int(height)
    return gr.update(value=grid_canvas(width, height), canvas_size=(width, height),
                     brush=gr.Brush(default_size=brush_size(width, height), colors=["#000000"], color_mode="fixed"))


# Gradio's brush ignores a press outside the image (the canvas margin), so a stroke started there was lost
# ("0 positions"). Pixi, which draws the editor, gives a canvas the hovered object's cursor ("move" or
# "none" over the image, "inherit" over the margin); once a press that began in the margin reaches the
# image, this starts the stroke there, so the part inside the image is kept (the margin part is clipped).
MARGIN_STROKES_JS = """
() => {
  let pending = null;
  const MARGIN = ["", "inherit", "auto", "default"];
  const overImage = (editor) => [...editor.querySelectorAll("canvas")].some((c) => !MARGIN.includes(c.style.cursor));
  document.addEventListener("pointerdown", (event) => {
    const editor = event.isTrusted && event.button === 0 && event.target instanceof HTMLCanvasElement
      ? event.target.closest(".keep-margin-strokes") : null;
    pending = editor && !overImage(editor) ? { editor, target: event.target, id: event.pointerId } : null;
  }, true);
  document.addEventListener("pointermove", (event) => {
    if (!pending || event.pointerId !== pending.id) return;
    if (!(event.buttons & 1)) { pending = null; return; }
    const press = pending;
    const at = { clientX: event.clientX, clientY: event.clientY, screenX: event.screenX, screenY: event.screenY };
    setTimeout(() => {  // after the editor has handled this move (and updated its cursor)
      if (pending !== press || !overImage(press.editor)) return;
      pending = null;
      press.target.dispatchEvent(new PointerEvent("pointerdown", { ...at, pointerId: press.id, pointerType: "mouse",
        isPrimary: true, button: 0, buttons: 1, bubbles: true, cancelable: true, composed: true }));
    }, 0);
  }, true);
  for (const type of ["pointerup", "pointercancel"]) {
    document.addEventListener(type, () => { pending = null; }, true);
  }
}
"""


@dataclass
class DemoConfig:
    """What the demo shows beside the pipeline: defaults, where results go, the fonts offered."""

    sampler: str = "student"
    save_dir: Path | None = Path(DEFAULT_SAVE_DIR)
    font_dir: Path = FONT_DIR
    width: int = 512
    height: int = 512
    image_count: int = 4
    model_note: str = ""


class DemoBackend:
    """Runs one click: widget values -> request and options -> pipeline -> gallery, info, saved files."""

    def __init__(self, pipeline: AnyText2Pipeline, config: DemoConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.fonts = bundled_fonts(config.font_dir)

    def run(self, mode: str, img_prompt: str, text_prompt: str, positions_json: str, draw_img: dict | None,
            edit_img: dict | None, sort_priority: str, revise_pos: bool,
            font_1: str, color_1: str, mimic_1: dict | None, font_2: str, color_2: str, mimic_2: dict | None,
            font_3: str, color_3: str, mimic_3: dict | None, font_4: str, color_4: str, mimic_4: dict | None,
            font_5: str, color_5: str, mimic_5: dict | None,
            font_hollow: bool, sampler: str, img_count: float, lcm_steps: float, ddim_steps: float, width: float,
            height: float, strength: float, attnx_scale: float, cfg_scale: float, seed: float, eta: float,
            a_prompt: str, n_prompt: str, show_debug: bool, base_model_path: str,
            lora_path_ratio: str) -> tuple[list, str]:
        """The Run buttons' handler; its parameter names are the API's (``gradio_client`` keyword arguments),
        hence one parameter per widget. Returns the gallery (images, then debug renders) and the details."""
        ui = UiRequest(mode, img_prompt, text_prompt, positions_json, draw_img, edit_img, sort_priority, int(width),
                       int(height), font_hollow, a_prompt, n_prompt)
        try:
            styles = line_styles([font_1, font_2, font_3, font_4, font_5],
                                 [color_1, color_2, color_3, color_4, color_5],
                                 [mimic_1, mimic_2, mimic_3, mimic_4, mimic_5], self.fonts)
            request, notes = text_request(ui, styles)
            request.revise_position = bool(revise_pos)
            if sampler == "teacher" and not self.pipeline.can_sample_teacher:
                raise InferenceInputError("the teacher is not available: the student LoRA is merged into the weights "
                                          "(start the demo with --use_ddim_sampler to keep it separate)")
            steps = lcm_steps if sampler == "student" else ddim_steps
            options, option_notes = sampling_options(sampler, steps, cfg_scale, eta, strength, attnx_scale,
                                                     img_count, seed, self.pipeline.adapter_info)
            swap_notes = self.pipeline.set_model_swaps(base_model_path or None, parse_lora_list(lora_path_ratio))
            result = self.pipeline(request, options)
        except InferenceInputError as exc:
            raise gr.Error(str(exc), title="Invalid input", print_exception=False) from exc
        result.warnings = notes + option_notes + result.warnings
        for note in swap_notes:
            gr.Info(note)
        for warning in dict.fromkeys(result.warnings):
            gr.Warning(warning)
        saved = self._save(result, request, options, mode, revise_pos)
        count = len(result.images)
        gallery = [(image, f"{k + 1}/{count} · seed {result.seed}") for k, image in enumerate(result.images)]
        if show_debug:
            gallery += [(result.glyph_image, "glyphs and positions"), (result.font_hint_image, "font hint")]
        return gallery, self._info(result, request, options, saved)

    def _save(self, result: InferenceResult, request: TextRequest, options: SamplingOptions, mode: str,
              revise_pos: bool) -> list[Path]:
        if self.config.save_dir is None:
            return []
        settings = {"mode": mode, "img_prompt": request.prompt, "text_prompt": request.text_prompt,
                    "size": list(result.images[0].shape[1::-1]), "sort_priority": request.sort_priority,
                    "revise_pos": bool(revise_pos), "font_hollow": request.font_hollow,
                    "a_prompt": request.a_prompt, "n_prompt": request.n_prompt,
                    "guidance_scale": options.guidance_scale, "eta": options.eta, "strength": options.strength,
                    "attnx_scale": options.attnx_scale, "lora_path": self.pipeline.lora_path}
        if self.pipeline.recipe is not None:
            settings["base_model_path"] = self.pipeline.recipe.base_model_path
            settings["community_loras"] = [list(lora) for lora in self.pipeline.recipe.community_loras]
        try:
            return save_results(self.config.save_dir, result, settings)
        except OSError as exc:
            gr.Warning(f"the results could not be saved to {self.config.save_dir}: {exc}")
            return []

    def _info(self, result: InferenceResult, request: TextRequest, options: SamplingOptions, saved: list[Path]) -> str:
        height, width = result.images[0].shape[:2]
        student_sampler = (result.student_sampler or "lcm").upper()
        how = (f"{result.steps} {student_sampler} steps, CFG off" if result.sampler == "student"
               else f"{result.steps} DDIM steps, CFG {options.guidance_scale:g}, eta {options.eta:g}")
        seconds = ", ".join(f"{k} {result.timings[k]:.2f}" for k in ("prepare", "encode", "sample", "decode", "total")
                            if k in result.timings)
        lines = [f"**{result.sampler}** ({how}) · {request.mode} · {width}×{height} · "
                 f"{len(result.images)} image(s) · seed {result.seed}", f"seconds: {seconds}",
                 f"prompt: `{result.prompt}`"]
        lines += [f"model: {note}" for note in self.pipeline.swap_notes]
        lines += [f"warning: {w}" for w in dict.fromkeys(result.warnings)]
        if saved:
            lines.append(f"saved to `{saved[0].parent}` ({saved[0].name.rsplit('_', 1)[0]}_*.png and .json)")
        return "\n\n".join(lines)


@dataclass(frozen=True)
class SamplerWidgets:
    """How the CFG and eta widgets look for one sampler (the LCM rules, visible in the UI). Each sampler has
    its own steps slider (LCM 4-8, DDIM 1-100): Gradio checks a slider's value against its declared range."""

    cfg: float
    guided: bool
    note: str


SAMPLER_WIDGETS = {
    "student": SamplerWidgets(1.0, False, LCM_NOTE),
    "teacher": SamplerWidgets(DEFAULT_CFG, True, TEACHER_NOTE),
}


def _cfg_info(guided: bool) -> str:
    return "classifier-free guidance" if guided else "off in LCM mode"


def _eta_info(guided: bool) -> str:
    return "DDIM noise (0 = deterministic)" if guided else "not used in LCM mode"


def _switch_sampler(sampler: str) -> tuple[Any, Any, Any, Any, Any]:
    """Updates of the two steps sliders, CFG, eta and the note when the sampler changes."""
    look = SAMPLER_WIDGETS[sampler]
    return (gr.update(visible=not look.guided), gr.update(visible=look.guided),
            gr.update(value=look.cfg, interactive=look.guided, info=_cfg_info(look.guided)),
            gr.update(value=0.0, interactive=look.guided, info=_eta_info(look.guided)), gr.update(value=look.note))


def _examples(fonts: list[str]) -> tuple[list[list], list[list], list[list]]:
    """(English generation, Chinese generation, editing) examples; positions are typed, sizes 512."""
    font = fonts[0] if fonts else NO_FONT
    gen_en = [
        ["photo of a coffee shop storefront at dusk, a wooden sign above the door",
         'the sign reads "OPEN", "Fresh Coffee"',
         "[[156, 60, 356, 130], [96, 380, 416, 450]]", 512, 512, "↕", font, NO_FONT, "#c83c1e", "#000000", 7251085],
        ["a birthday cake on a table, top-down view, texts written in cream", '"Happy" "Birthday"',
         "[[40, 200, 240, 280], [270, 200, 480, 280]]", 512, 512, "↔", font, font, "#f0a0b4", "#f0a0b4", 41799568],
        ["a chalkboard menu hanging in a cafe", 'that reads "Soup of the day", "Tomato"',
         "[[[60, 120], [450, 100], [455, 170], [65, 190]], [120, 300, 400, 370]]", 512, 512, "↕", NO_FONT, font,
         "#000000", "#ffffff", 35621187],
    ]
    gen_zh = [
        ["一个精致的中国传统月饼，放在白色盘子里，月饼上面有雕刻的文字", '"中秋" "团圆"',
         "[[176, 150, 336, 250], [176, 270, 336, 370]]", 512, 512, "↕", font, font, "#000000", "#000000", 40091080],
        ["一块木质招牌挂在店门口", '上面写着"咖啡店"', "[[106, 200, 406, 300]]", 512, 512, "↕", font, NO_FONT,
         "#785028", "#000000", 86670233],
    ]
    edit = []
    for name, prompt, text, polygon in [
        ("0000.jpg", "an image with a plain dark background and text", 'that reads "Fresh Milk Shop"',
         "[[[130, 118], [428, 150], [423, 196], [125, 163]]]"),
        ("0007.jpg", "an image with a geometric shapes background and text", '"Harbor Cafe"',
         "[[31, 417, 464, 480]]"),
        ("0003.jpg", "an image with a soft blurred blobs background and text", '"国际学校"', "[[156, 366, 314, 409]]"),
    ]:
        if (EXAMPLE_IMAGES / name).is_file():
            edit.append([prompt, text, str(EXAMPLE_IMAGES / name), polygon, 4, 91498555])
    return gen_en, gen_zh, edit


def build_demo(pipeline: AnyText2Pipeline, config: DemoConfig | None = None) -> gr.Blocks:
    """The demo's page around a loaded pipeline (launch it with :func:`launch`)."""
    config = config or DemoConfig()
    backend = DemoBackend(pipeline, config)
    font_names = list(backend.fonts)
    samplers = SAMPLER_CHOICES if pipeline.can_sample_teacher else SAMPLER_CHOICES[:1]
    sampler_value = config.sampler if pipeline.can_sample_teacher else "student"
    look = SAMPLER_WIDGETS[sampler_value]
    hollow_available = HOLLOW_NOISE_PATH.is_file()

    # delete_cache: uploads and results Gradio keeps in its temp folder are dropped after a day
    with gr.Blocks(title="AnyText2 LCM-LoRA demo", analytics_enabled=False, delete_cache=(86400, 86400),
                   fill_width=True) as demo:
        gr.Markdown("## AnyText2 → 4-step LCM-LoRA student\n" + config.model_note)
        with gr.Row(variant="compact"):
            with gr.Column(scale=3):
                with gr.Accordion("Parameters", open=False):
                    sampler = gr.Radio(samplers, value=sampler_value, label="Sampler",
                                       interactive=len(samplers) > 1)
                    mode_note = gr.Markdown(look.note)
                    with gr.Row(variant="compact"):
                        img_count = gr.Slider(label="Image Count", minimum=1, maximum=12, value=config.image_count,
                                              step=1)
                        lcm_steps = gr.Slider(label=f"Steps (LCM, {LCM_MIN_STEPS}-{LCM_MAX_STEPS})",
                                              minimum=LCM_MIN_STEPS, maximum=LCM_MAX_STEPS, value=STUDENT_STEPS,
                                              step=1, visible=not look.guided)
                        ddim_steps = gr.Slider(label="Steps (DDIM)", minimum=1, maximum=TEACHER_MAX_STEPS,
                                               value=TEACHER_STEPS, step=1, visible=look.guided)
                    with gr.Row(variant="compact"):
                        width = gr.Slider(label="Width", minimum=64, maximum=1024, value=config.width, step=64,
                                          elem_id="width")
                        height = gr.Slider(label="Height", minimum=64, maximum=1024, value=config.height, elem_id="height",
                                           step=64)
                    with gr.Row(variant="compact"):  # two per row: three sliders cramp a 1400-px window
                        strength = gr.Slider(label="Strength", info="WriteNet control scale", minimum=0.0, maximum=2.0,
                                             value=1.0, step=0.01, min_width=240)
                        attnx_scale = gr.Slider(label="AttnX Scale", minimum=0.0, maximum=2.0, value=1.0, step=0.01,
                                                min_width=240)
                    with gr.Row(variant="compact"):
                        cfg_scale = gr.Slider(label="CFG Scale", minimum=0.1, maximum=30.0, value=look.cfg,
                                              step=0.1, interactive=look.guided, info=_cfg_info(look.guided),
                                              min_width=240)
                        eta = gr.Number(label="eta (DDIM)", value=0.0, minimum=0.0, maximum=1.0,
                                        interactive=look.guided, info=_eta_info(look.guided), min_width=240)
                    seed = gr.Slider(label="Seed", info="-1: a random seed, shown with the result", minimum=-1,
                                     maximum=MAX_SEED, value=-1, step=1)
                    with gr.Row(variant="compact"):
                        show_debug = gr.Checkbox(label="Show Debug (glyph and font-hint images, details)", value=True)
                        sort_priority = gr.Radio(list(SORT_PRIORITIES), value="↕", label="Sort Position",
                                                 info="order of drawn positions: ↕ top-down first, ↔ left-right first")
                    with gr.Row(variant="compact"):
                        revise_pos = gr.Checkbox(label="Revise Position", value=False,
                                                 info="fit each drawn position to its rendered text (generation)")
                        font_hollow = gr.Checkbox(
                            label="Use hollow font", value=hollow_available,
                            info="outlined font hint" if hollow_available else
                            f"needs {HOLLOW_NOISE_PATH.relative_to(REPO_ROOT)} from the AnyText2 release (not bundled)")
                    a_prompt = gr.Textbox(label="Added Prompt", value=DEFAULT_A_PROMPT)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=DEFAULT_N_PROMPT,
                                          info="used by the teacher's CFG only")
                    recipe = pipeline.recipe
                    base_model_path = gr.Textbox(
                        label="Base Model Path", value=(recipe.base_model_path or "") if recipe else "",
                        placeholder="/path/to/sd15_model.safetensors", elem_id="base_model_path",
                        info="another SD1.5 checkpoint (LDM format) whose UNet and text encoder replace AnyText2's; "
                             "empty: the checkpoint's own")
                    lora_path_ratio = gr.Textbox(
                        label="LoRA Path and Ratio", value=format_lora_list(recipe.community_loras) if recipe else "",
                        placeholder=LORA_EXAMPLE, elem_id="lora_path_ratio",
                        info="SD1.5 LoRAs (kohya or diffusers files) merged into the base model, as 'path ratio' "
                             "pairs; changing either box reloads the model on the next Run")
                img_prompt = gr.Textbox("", label="Image Prompt", elem_id="img_prompt",
                                        placeholder="Describe the image, e.g.: a cartoon cat holding a sign")
                text_prompt = gr.Textbox("", label="Text Prompt", elem_id="text_prompt",
                                         placeholder='The text to draw, each line in double quotes, e.g.: that reads '
                                                     '"Hello", "world"')
                positions_json = gr.Textbox(
                    "", label="Positions (JSON, optional)", elem_id="positions_json", lines=1,
                    placeholder="[[x0, y0, x1, y1], [[x, y], [x, y], [x, y], [x, y]]]",
                    info="boxes or polygons in image pixels (editing: pixels of the uploaded image), one per line in "
                         "reading order; when given, they replace the drawn positions")
                gr.Markdown("Font and colour of each line. 'No Font' or a pure black/white colour leaves that "
                            "attribute to the model.")
                fonts, colors, mimics = [], [], []
                font_values = [NO_FONT, MIMIC_FONT, *font_names]
                for line in range(1, MAX_LINES + 1):
                    with gr.Row(variant="compact", equal_height=True):
                        fonts.append(gr.Dropdown(font_values, value=NO_FONT, label=f"Font of line {line}", scale=3,
                                                 elem_id=f"font_{line}"))
                        colors.append(gr.ColorPicker(value="#000000", label=f"Colour of line {line}", scale=1,
                                                     min_width=120, elem_id=f"color_{line}"))
                    mimics.append(image_input(label=f"Mimic font of line {line}", sources=["upload", "clipboard"],
                                              transforms=(), layers=False, visible=False,
                                              placeholder="Upload an image and paint over the text whose font to "
                                                          "imitate (best with as many characters)"))
                for font, mimic in zip(fonts, mimics):
                    font.change(lambda value: gr.update(visible=value == MIMIC_FONT), font, mimic,
                                api_visibility="private", queue=False)

                with gr.Tabs():
                    with gr.Tab("Text Generation", id="gen"):
                        gr.Markdown("Draw one stroke area per text line (its length should suit the text), or "
                                    "type the positions above.")
                        draw_img = gr.Sketchpad(value=grid_canvas(config.width, config.height), label="Draw Position",
                                                canvas_size=(config.width, config.height), type="numpy",
                                                transforms=(), layers=False, elem_id="draw_img",
                                                elem_classes=["keep-margin-strokes"],
                                                brush=gr.Brush(default_size=brush_size(config.width, config.height),
                                                               colors=["#000000"], color_mode="fixed"))
                        run_gen = gr.Button("Run!", variant="primary", elem_id="run_gen")
                    with gr.Tab("Text Editing", id="edit"):
                        gr.Markdown("Upload an image and paint over the areas to rewrite (one area per text line), "
                                    "or type the positions above. Mimicking the font of the original text often "
                                    "helps.")
                        edit_img = image_input(label="Image to edit", sources=["upload", "clipboard"], type="numpy",
                                               transforms=(), layers=False, elem_id="edit_img")
                        run_edit = gr.Button("Run!", variant="primary", elem_id="run_edit")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Result", preview=True, columns=2, height=600, format="png",
                                     elem_id="result_gallery")
                info = gr.Markdown("", label="Details", elem_id="result_info")
        # full width, so every column an example sets is shown (in a half-width column the table was cut)
        example_gen_en, example_gen_zh, example_edit = _examples(font_names)
        gen_inputs = [img_prompt, text_prompt, positions_json, width, height, sort_priority, fonts[0], fonts[1],
                      colors[0], colors[1], seed]
        size_at = gen_inputs.index(width), gen_inputs.index(height)

        def example_canvas_update(*values: Any) -> dict:
            """The draw canvas at the size a clicked example set: one update for both sides."""
            return position_canvas_update(*(values[index] for index in size_at))

        with gr.Tabs(elem_id="examples"):
            with gr.Tab("English examples (generation)"):
                gr.Examples(example_gen_en, gen_inputs, draw_img, example_canvas_update, cache_examples=False,
                            run_on_click=True, examples_per_page=5)
            with gr.Tab("Chinese examples (generation)"):
                gr.Examples(example_gen_zh, gen_inputs, draw_img, example_canvas_update, cache_examples=False,
                            run_on_click=True, examples_per_page=5)
            if example_edit:
                with gr.Tab("Editing examples"):
                    gr.Examples(example_edit, [img_prompt, text_prompt, edit_img, positions_json, img_count, seed],
                                cache_examples=False, examples_per_page=5)

        show_debug.change(lambda value: gr.update(visible=value), show_debug, info, api_visibility="private",
                          queue=False)
        sampler.change(_switch_sampler, sampler, [lcm_steps, ddim_steps, cfg_scale, eta, mode_note],
                       api_visibility="private", queue=False)
        # release, not change: an example sets width and height together, and the editor, given a second
        # size while still applying the first, could keep the stale one; the examples send one update each
        gr.on([width.release, height.release], position_canvas_update, [width, height], draw_img,
              trigger_mode="always_last", api_visibility="private", queue=False)
        edit_img.upload(edit_brush_update, edit_img, edit_img, api_visibility="private", queue=False)
        line_inputs = [c for triple in zip(fonts, colors, mimics) for c in triple]
        inputs = [img_prompt, text_prompt, positions_json, draw_img, edit_img, sort_priority, revise_pos,
                  *line_inputs, font_hollow, sampler, img_count, lcm_steps, ddim_steps, width, height, strength,
                  attnx_scale, cfg_scale, seed, eta, a_prompt, n_prompt, show_debug, base_model_path, lora_path_ratio]
        for component in inputs:
            if component not in (edit_img, *mimics):  # image_input() already checks those
                refuse_bad_payloads(component)
        run_gen.click(backend.run, [gr.State("gen"), *inputs], [gallery, info], api_name="generate")
        run_edit.click(backend.run, [gr.State("edit"), *inputs], [gallery, info], api_name="edit")
    demo.queue(default_concurrency_limit=1)  # the pipeline serves one request at a time
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True) -> str:
    """Serve the page (no share link, no browser opened); returns its URL when ``block`` is False."""
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                            prevent_thread_lock=not block, quiet=not block, js=MARGIN_STROKES_JS)
    return url


# --------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model_path", default="",
                        help="AnyText2 checkpoint; empty (default): the tiny random-init model, for trying the UI")
    parser.add_argument("--config", default=None,
                        help=f"model YAML (default: {FULL_CONFIG.relative_to(REPO_ROOT)} with --model_path, "
                             f"else {TINY_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("--student_lora_path", default="", help="student LoRA adapter folder (empty: none)")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--use_ddim_sampler", action="store_true",
                        help="start in teacher mode (DDIM, CFG, free steps); the LoRA is then kept unmerged and "
                             "switched off for the teacher, so both samplers stay selectable")
    parser.add_argument("--trust_checkpoint", action="store_true", help="allow pickled objects in an old .ckpt")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, else fp32")
    parser.add_argument("--font_path", default=str(DEFAULT_FONT_PATH), help="glyph font (glyphs and OCR strips)")
    parser.add_argument("--font_dir", default=str(FONT_DIR), help="folder whose fonts are offered per line")
    parser.add_argument("--save_dir", default=DEFAULT_SAVE_DIR, help="where results are saved; empty: not saved")
    parser.add_argument("--image_size", type=int, default=None,
                        help="default width and height (default: 512, or 128 for the tiny model)")
    parser.add_argument("--image_count", type=int, default=None, help="default image count (default: 4, tiny: 1)")
    parser.add_argument("--host", default="0.0.0.0" if os.environ.get("GRADIO_LISTEN") else "127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 when GRADIO_LISTEN is set)")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Problems found before the (slow) model load."""
    if args.model_path and not Path(args.model_path).is_file():
        raise InferenceInputError(f"--model_path {args.model_path}: no such checkpoint file")
    if args.config and not Path(args.config).is_file():
        raise InferenceInputError(f"--config {args.config}: no such model YAML")
    if args.student_lora_path:  # refused at start-up, with the CLI's message, before the model is built
        check_adapter_flag("--student_lora_path", model_config_path(args), args.student_lora_path)
    if not Path(args.font_path).is_file():
        raise InferenceInputError(f"--font_path {args.font_path}: no such font file")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceInputError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.image_size is not None and (args.image_size < 64 or args.image_size % 64 or args.image_size > 1024):
        raise InferenceInputError(f"--image_size must be a multiple of 64 from 64 to 1024, got {args.image_size}")
    if args.image_count is not None and not 1 <= args.image_count <= 12:
        raise InferenceInputError(f"--image_count must be 1-12, got {args.image_count}")


def model_config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else (FULL_CONFIG if args.model_path else TINY_CONFIG)


def load_pipeline(args: argparse.Namespace) -> AnyText2Pipeline:
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    config = model_config_path(args)
    return AnyText2Pipeline.from_pretrained(
        config, args.model_path or None, args.student_lora_path or None, lora_scale=args.lora_scale,
        merge_lora=not args.use_ddim_sampler, device=device, dtype=dtype, font_path=args.font_path,
        trust_checkpoint=args.trust_checkpoint)


def model_note(args: argparse.Namespace, pipeline: AnyText2Pipeline) -> str:
    config = model_config_path(args).name
    weights = (f"checkpoint `{args.model_path}`" if args.model_path else
               "**random init-rule weights** (tiny test model: the images are noise, the controls all work)")
    lora = (f"student LoRA `{pipeline.lora_path}`" if pipeline.has_lora
            else "no student LoRA (LCM mode samples the base model)")
    return f"Model `{config}`, {weights}; {lora}; {pipeline.device}, {next(pipeline.model.parameters()).dtype}."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        pipeline = load_pipeline(args)
    except InferenceInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tiny = not args.model_path
    size = args.image_size or (128 if tiny else 512)
    config = DemoConfig(sampler="teacher" if args.use_ddim_sampler else "student",
                        save_dir=Path(args.save_dir) if args.save_dir else None, font_dir=Path(args.font_dir),
                        width=size, height=size, image_count=args.image_count or (1 if tiny else 4),
                        model_note=model_note(args, pipeline))
    demo = build_demo(pipeline, config)
    try:
        launch(demo, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
