"""AnyText2 inference: the teacher (20-step DDIM with CFG) or the LCM-LoRA student (4 steps, no CFG).

The counterpart of the original ``ms_wrapper_v2.py``, built for a UI or a script to call::

    pipe = AnyText2Pipeline.from_pretrained("models_yaml/anytext2_sd15.yaml", "models/anytext_v2.0.ckpt",
                                            lora_path="checkpoints/checkpoint-final")
    result = pipe(TextRequest(prompt='a shop sign that reads "OPEN"', positions=[[96, 200, 416, 300]]),
                  SamplingOptions(num_images=4, seed=100))
    result.images            # list of (H, W, 3) uint8
    result.glyph_image       # debug renders: glyphs with their polygons, and the font hint
    result.font_hint_image

Two stages, so each can be used (and tested) alone: :func:`build_conditioning` turns a request into
AnyText2's per-line renders and captions with no model involved (the same rendering functions as the
training data pipeline), and :meth:`AnyText2Pipeline.generate` encodes, samples and decodes them.
Every problem with the input raises :class:`InferenceInputError` with a message for the user.

AnyText2's optional model swaps (another SD1.5 base model, community LoRAs merged with a ratio;
``model_swaps.py``) are given to :meth:`AnyText2Pipeline.from_pretrained` or changed later with
:meth:`AnyText2Pipeline.set_model_swaps`, which rebuilds the model from its recipe and re-applies the
student LoRA, as the original did after every reload.

Conditioning is built once per request at batch 1 and shared by all images (AnyText2 builds identical
rows for every image): OCR, CLIP, the masked-image VAE encode and the WriteNet run once, only the UNet
and the decoder see ``num_images`` rows. Random draws come from one CPU generator seeded with the
request's seed, in AnyText2's order (masked-image posterior, initial latents, then sampler noise), so a
seed gives the same images on any device up to kernel round-off.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from ..anytext2.acceleration import Acceleration, accelerate_model, mark_step
from ..anytext2.config import REPO_ROOT, ConfigError
from ..anytext2.model import AnyText2Model, TextInfo
from ..anytext2.ocr_preprocess import crop_image
from ..data.glyph_render import (
    COLOR_SENTINEL,
    DEFAULT_FONT_PATH,
    GLY_LINE_HEIGHT,
    GLY_LINE_WIDTH,
    FontError,
    GlyphFont,
    colorize,
    font_hint_base,
    render_gly_line,
    render_glyphs,
)
from ..distillation.adapter_check import AdapterError, check_adapter
from ..distillation.adapter_info import AdapterInfo, AdapterInfoError, training_grid
from ..distillation.conditioning import UncondCaptionCache
from ..distillation.lora import adapters_disabled, load_lora
from ..distillation.samplers import StudentSampling, plan_student_sampling
from .cache import BlankLatentCache, is_blank_masked_image
from .checks import check_steps, check_student_steps
from .fast_sampling import ddim_steps, run_student, run_teacher, student_steps, to_device
from .inputs import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    MAX_CHARS,
    PLACEHOLDER,
    InferenceInputError,
    Position,
    append_prompt,
    as_rgb_image,
    check_image_size,
    check_polygons_inside,
    find_polygon,
    parse_color,
    parse_prompt,
    polygons_from_spec,
    positions_from_mask,
    positions_from_polygons,
    prepare_edit_image,
    resize_mask,
    scrub_placeholders,
    validate_texts,
)
from .model_swaps import ModelRecipe, load_swapped_teacher, normalise_swaps
from .revise_position import revise_line_masks

STUDENT_STEPS = 4
TEACHER_STEPS = 20
MAX_SEED = 99_999_999
HOLLOW_NOISE_PATH = REPO_ROOT / "font" / "bg_noise.png"

# "student" = "auto": the sampler the adapter's distillation.json calls for (PCM for a v2_5 adapter, else LCM)
Sampler = Literal["student", "auto", "lcm", "pcm", "tcd", "teacher"]


@dataclass
class LineStyle:
    """Attributes of one text line, index-aligned with the quoted texts.

    ``font``: a font file for the font hint, or None for AnyText2's "No Font". ``mimic_image`` +
    ``mimic_mask`` ("Mimic From Image"): an RGB image and a mask (white, or the alpha channel of an
    RGBA array) over text whose style to copy; exclusive with ``font``. ``color``: ``'r,g,b'``,
    ``'#rrggbb'``, ``'rgba(...)'`` or a 3-sequence; None means unspecified (AnyText2's 500 value).
    The glyphs themselves are always drawn in the pipeline's glyph font, as AnyText2 does.
    """

    font: str | os.PathLike[str] | None = None
    color: str | Sequence[float] | None = None
    mimic_image: np.ndarray | None = None
    mimic_mask: np.ndarray | None = None


@dataclass
class TextRequest:
    """What to draw and where.

    ``prompt`` describes the image; its quoted spans (``"…"``) become placeholders. ``text_prompt``
    holds the lines to draw in quotes (e.g. ``'that reads "Hello", "world"'``); when None the prompt
    serves as both, as in AnyText v1. ``positions``: polygons ``[[x, y], ...]`` or boxes
    ``[x0, y0, x1, y1]`` in output pixels (edit mode: pixels of ``edit_image`` as given), or a mask
    image with white text areas on black. An ``edit_image`` (RGB) switches to edit mode: the image is
    resized to multiples of 64 (long side at most 1024) and the positions are repainted.
    ``revise_position`` (generation only, as upstream) fits each line's position to its rendered glyphs.
    """

    prompt: str
    text_prompt: str | None = None
    positions: Sequence[Any] | np.ndarray | None = None
    line_styles: Sequence[LineStyle] = ()
    width: int = 512
    height: int = 512
    edit_image: np.ndarray | None = None
    a_prompt: str = DEFAULT_A_PROMPT
    n_prompt: str = DEFAULT_N_PROMPT
    sort_priority: str = "↕"
    font_hollow: bool = False
    revise_position: bool = False

    @property
    def mode(self) -> str:
        return "edit" if self.edit_image is not None else "gen"


@dataclass
class SamplingOptions:
    """How to sample. ``steps`` None means 20 for the teacher and the adapter's own count for the student
    (its phase count for a PCM adapter, else 4); a count the adapter cannot serve is refused.

    ``sampler``: ``teacher``, or a student sampler: ``student``/``auto`` (chosen from the adapter's
    ``distillation.json``), ``lcm``, ``pcm`` or ``tcd`` (stochasticity ``gamma``, LCM adapters).

    ``guidance_scale`` and ``eta`` apply to the teacher only (the student distilled guidance in).
    ``seed`` -1 draws a random seed (reported in the result). ``anytext2_ddim_grid`` uses AnyText2's
    DDIM timesteps (more than ``steps`` when ``steps`` does not divide 1000) so teacher images match
    upstream exactly; ``batch_cfg`` False runs cond and uncond as separate UNet calls like upstream.
    """

    sampler: Sampler = "student"
    steps: int | None = None
    guidance_scale: float = 7.5
    eta: float = 0.0
    strength: float = 1.0
    attnx_scale: float = 1.0
    num_images: int = 1
    seed: int = -1
    anytext2_ddim_grid: bool = False
    batch_cfg: bool = True
    gamma: float = 0.3

    def resolved_steps(self) -> int:
        """The step count as given, or its default (the student's default of a plain LCM adapter)."""
        if self.steps is not None:
            return int(self.steps)
        return TEACHER_STEPS if self.sampler == "teacher" else STUDENT_STEPS


@dataclass
class Conditioning:
    """AnyText2's inputs for one request at batch 1 (NCHW float32 tensors on the CPU).

    Per line ``j``: ``glyphs[j]`` ``[1,3,H,W]``, ``gly_line[j]`` ``[1,1,80,512]``, ``positions[j]``
    ``[1,1,H,W]``, ``colors[j]`` ``[1,3]`` (RGB/255, 500/255 unspecified). ``hint`` is the union of all
    positions (extra positions included), ``masked_image`` the edit image with the hint painted to -1
    (all -1 when generating). ``mimic_crops[j]`` (CHW 0..255) replaces line j's font-hint crop.
    Captions: cond = (``image_caption``, ``text_caption``), uncond = (``negative_caption``, "").
    """

    texts: list[str]
    image_caption: str
    text_caption: str
    negative_caption: str
    glyphs: list[torch.Tensor]
    gly_line: list[torch.Tensor]
    positions: list[torch.Tensor]
    colors: list[torch.Tensor]
    font_hint: torch.Tensor
    hint: torch.Tensor
    masked_image: torch.Tensor
    mode: str
    polygons: list[np.ndarray] = field(default_factory=list)
    mimic_crops: list[torch.Tensor | None] | None = None
    glyph_image: np.ndarray | None = None
    font_hint_image: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.masked_image.shape[-2])

    @property
    def width(self) -> int:
        return int(self.masked_image.shape[-1])

    def text_info(self, masked_x: torch.Tensor, device: torch.device | None = None) -> TextInfo:
        """The model's per-line inputs. With ``device`` the glyph renders (WriteNet's input) and the font hint
        (style crops: per-pixel warps) are copied there first (pinned, non-blocking on CUDA). The glyph lines
        and positions stay on the CPU: the embedding manager moves the glyph lines to the device in one batch
        for their OCR preprocessing, and reads the positions' boxes on the host, where they already are."""
        glyphs = self.glyphs if device is None else [to_device(g, device) for g in self.glyphs]
        font_hint = self.font_hint if device is None else to_device(self.font_hint, device)
        mimic = [list(self.mimic_crops)] if self.mimic_crops and any(c is not None for c in self.mimic_crops) else None
        return TextInfo(glyphs=glyphs, gly_line=self.gly_line, positions=self.positions, colors=self.colors,
                        font_hint=font_hint, masked_x=masked_x, n_lines=[len(self.texts)], mimic_images=mimic)

    def describe(self) -> str:
        """The prompts with the texts put back in place of the placeholders (for logs and the UI)."""
        def fill(caption: str) -> str:
            for text in self.texts:
                caption = caption.replace(PLACEHOLDER, f'"{text}"', 1)
            return caption

        return f"{fill(self.image_caption)} | {fill(self.text_caption)}"


@dataclass
class InferenceResult:
    """Images (``num_images`` x (H, W, 3) uint8), debug renders, the seed used, warnings and seconds
    per stage (``prepare`` rendering, ``encode`` OCR/CLIP/VAE-encode, ``sample``, ``decode``, ``total``)."""

    images: list[np.ndarray]
    glyph_image: np.ndarray | None
    font_hint_image: np.ndarray | None
    seed: int
    sampler: str
    steps: int
    warnings: list[str]
    timings: dict[str, float]
    prompt: str
    student_sampler: str | None = None  # the student sampler that ran (lcm | pcm | tcd), None for the teacher


def to_uint8_image(decoded: torch.Tensor) -> np.ndarray:
    """AnyText2's decode to pixels: x*127.5+127.5, clipped, truncated to uint8 (NCHW -> NHWC)."""
    pixels = (decoded.float().permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255)
    return pixels.to(torch.uint8).cpu().numpy()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_seed(seed: int) -> int:
    if seed is None or int(seed) < 0:
        return random.SystemRandom().randint(0, MAX_SEED)
    return int(seed)


# --------------------------------------------------------------------------------------------------
# conditioning (no model)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """(C, H, W) or (H, W) float array -> [1, C, H, W] float32 tensor."""
    array = np.asarray(array, np.float32)
    if array.ndim == 2:
        array = array[None]
    return torch.from_numpy(np.ascontiguousarray(array))[None]


def mimic_style_crop(image: np.ndarray, mask: np.ndarray, line: int) -> torch.Tensor:
    """"Mimic From Image": the dark strokes inside the masked text region, deskewed (CHW 0..255).

    Uses the training pipeline's font-hint thresholding on the masked region, then the recogniser's
    crop, as AnyText2 does for ``font_hint_mimic_imgs``.
    """
    image = as_rgb_image(image, f"mimic image of line {line}")
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 3] if mask.shape[2] == 4 else mask[..., 0]
    if mask.shape != image.shape[:2]:
        raise InferenceInputError(f"the mimic mask of line {line} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                  f"{image.shape[1]}x{image.shape[0]}")
    binary = np.where(mask > 127, 255, 0).astype(np.uint8)
    if not binary.any():
        raise InferenceInputError(f"the mimic mask of line {line} selects nothing: paint over the text to imitate")
    polygon, filled = find_polygon(binary)
    strokes = font_hint_base(image, polygon).to_canvas(*image.shape[:2]).astype(np.float32) * 255.0
    source = torch.from_numpy(strokes)[None].repeat(3, 1, 1)
    return crop_image(source, filled)


def hollow_font_hint(font_hint: np.ndarray, noise_gray: np.ndarray) -> np.ndarray:
    """AnyText2's "hollow font" on a font hint (H, W, 0..255): a one-pixel outline around the strokes and a
    thresholded noise texture cut into the strokes and laid over the background. It imitates the
    outlined, textured hints that light-on-dark training text gets from adaptive thresholding."""
    height, width = font_hint.shape
    background = cv2.resize(noise_gray, (width, height))
    background[background < 230] = 0
    background = cv2.adaptiveThreshold(background, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2)
    strokes = font_hint.astype(np.uint8)
    ring = cv2.dilate(strokes, np.ones((3, 3), np.uint8)) - cv2.dilate(strokes, np.ones((2, 2), np.uint8))
    result = np.clip(font_hint.astype(np.float64) - background + ring, 0, 255)
    background[strokes > 0] = 0
    return np.clip(result + background, 0, 255)


def load_hollow_noise(path: str | os.PathLike[str] = HOLLOW_NOISE_PATH) -> np.ndarray:
    noise = cv2.imread(str(path))
    if noise is None:
        raise InferenceInputError(f"the hollow font needs AnyText2's noise texture {path} (not bundled: copy "
                                  "font/bg_noise.png from the AnyText2 release), or turn the hollow font off")
    return cv2.cvtColor(noise, cv2.COLOR_BGR2GRAY)


def _resolve_positions(request: TextRequest, width: int, height: int,
                       source_size: tuple[int, int] | None) -> list[Position]:
    """Positions in the output frame; ``source_size`` (w, h) is the edit image's size before resizing."""
    spec = request.positions
    if spec is None:
        return []
    if isinstance(spec, np.ndarray):
        if source_size is not None:
            spec = resize_mask(spec, width, height)
        elif spec.shape[:2] != (height, width):
            raise InferenceInputError(f"the position mask is {spec.shape[1]}x{spec.shape[0]} but the image is "
                                      f"{width}x{height}")
        return positions_from_mask(spec, request.sort_priority)
    polygons = polygons_from_spec(spec)
    if source_size is not None:
        check_polygons_inside(polygons, *source_size)
        factor = np.array([width / source_size[0], height / source_size[1]], np.float32)
        polygons = [p * factor for p in polygons]
    return positions_from_polygons(polygons, width, height)


def build_conditioning(
    request: TextRequest,
    glyph_font: GlyphFont,
    font_loader: Callable[[str | os.PathLike[str]], GlyphFont] | None = None,
    hollow_noise: Callable[[], np.ndarray] = load_hollow_noise,
    max_chars: int = MAX_CHARS,
) -> Conditioning:
    """AnyText2's conditioning for a request (``ms_wrapper.py`` semantics, see the module docstrings).

    ``glyph_font`` draws the glyphs and OCR strips; ``font_loader`` opens the per-line hint fonts.
    """
    font_loader = font_loader or GlyphFont
    warnings: list[str] = []
    image_prompt = parse_prompt(request.prompt)
    text_prompt = image_prompt if request.text_prompt is None else parse_prompt(request.text_prompt)
    warnings += image_prompt.warnings + (text_prompt.warnings if text_prompt is not image_prompt else [])
    texts, cut = validate_texts(text_prompt.texts, max_chars)
    warnings += cut
    if len(image_prompt.texts) > len(texts):
        raise InferenceInputError(f"the image prompt quotes {len(image_prompt.texts)} texts but the text prompt has only "
                                  f"{len(texts)}; quote each line to draw in the text prompt")
    a_prompt = scrub_placeholders(request.a_prompt, "added prompt", warnings)
    n_prompt = scrub_placeholders(request.n_prompt, "negative prompt", warnings)

    source_size = None
    if request.edit_image is not None:
        original = as_rgb_image(request.edit_image, "edit image")
        source_size = (original.shape[1], original.shape[0])
        edit_image = prepare_edit_image(original)
        height, width = edit_image.shape[:2]
    else:
        width, height = request.width, request.height
        check_image_size(width, height)
        edit_image = None
    positions = _resolve_positions(request, width, height, source_size)
    mask_given = isinstance(request.positions, np.ndarray)
    if mask_given and not positions and (texts or request.edit_image is not None):
        raise InferenceInputError(f"the {'edit' if request.edit_image is not None else 'position'} mask is empty (all "
                                  "black): paint the text areas white (black-on-white masks need inverting)")
    if request.edit_image is not None and not positions:
        raise InferenceInputError("editing needs a mask (or polygons) marking the text areas to repaint")
    if len(positions) < len(texts):
        found = f"{len(positions)} position{'s' if len(positions) != 1 else ''}"
        raise InferenceInputError(f"the prompt has {len(texts)} quoted text{'s' if len(texts) != 1 else ''} but "
                                  f"{found} {'was' if len(positions) == 1 else 'were'} given; give one position per text")
    if len(positions) > len(texts):
        warnings.append(f"{_count(len(positions), 'position')} for {_count(len(texts), 'quoted text')}: the extra "
                        f"{_count(len(positions) - len(texts), 'position')} will be repainted without text; quote one "
                        "text per position in the prompt, or remove the extra positions")
    styles = list(request.line_styles)
    if len(styles) > len(texts):
        warnings.append(f"{_count(len(styles), 'line style')} for {_count(len(texts), 'quoted text')}: the extra "
                        "styles are ignored")
    styles += [LineStyle()] * (len(texts) - len(styles))

    glyphs, gly_lines, line_masks, colors, mimic_crops = [], [], [], [], []
    font_hint = np.zeros((height, width), np.float32)
    glyph_sum = np.zeros((3, height, width), np.float32)
    for index, (text, position, style) in enumerate(zip(texts, positions, styles), start=1):
        missing = glyph_font.missing_chars(text)
        if missing:
            raise InferenceInputError(f'text line {index} "{text}": the glyph font {glyph_font.path.name} has no '
                                      f"glyph for {''.join(missing)!r}")
        if not glyph_font.can_layout(text):
            raise InferenceInputError(f'text line {index} "{text}": a complex script needs RAQM text layout and this '
                                      "Pillow has no libraqm (training skips such lines too)")
        try:
            patch = render_glyphs(glyph_font, text, position.polygon, add_space=True)
        except ValueError as exc:
            raise InferenceInputError(f'text line {index} "{text}": position {index} is too small to hold it '
                                      f"({exc})") from exc
        if not patch.visible_in(height, width):
            raise InferenceInputError(f'text line {index} "{text}" falls outside the image at position {index}')
        color = parse_color(style.color, index)
        glyph = colorize(patch, color, height, width)
        glyphs.append(_tensor(glyph))
        gly_lines.append(_tensor(render_gly_line(glyph_font, text).astype(np.float32)))
        line_masks.append(_tensor(position.mask.astype(np.float32)))
        colors.append(torch.tensor([color], dtype=torch.float32) / 255.0)
        glyph_sum += glyph * 255.0
        if style.mimic_image is not None or style.mimic_mask is not None:
            if style.font is not None:
                raise InferenceInputError(f"text line {index}: choose either a font or an image to mimic, not both")
            if style.mimic_image is None or style.mimic_mask is None:
                raise InferenceInputError(f"text line {index}: mimicking a font needs both an image and a mask")
            mimic_crops.append(mimic_style_crop(style.mimic_image, style.mimic_mask, index))
            continue
        mimic_crops.append(None)
        if style.font is not None:
            try:
                font = font_loader(style.font)
            except (FileNotFoundError, FontError) as exc:
                raise InferenceInputError(f"text line {index}: {exc}") from exc
            missing = font.missing_chars(text)
            if missing:
                raise InferenceInputError(f'text line {index} "{text}": the font {font.path.name} has no glyph for '
                                          f"{''.join(missing)!r}")
            coverage = render_glyphs(font, text, position.polygon, add_space=True).to_canvas(height, width)
            font_hint += coverage * np.float32(1.0 / 255.0)  # colorize()'s white channel, without the other two
    np.clip(font_hint, 0.0, 1.0, out=font_hint)
    if request.font_hollow and font_hint.any():
        font_hint = (hollow_font_hint(font_hint * 255.0, hollow_noise()) / 255.0).astype(np.float32)

    if not texts:
        texts = [" "]
        glyphs = [_tensor(np.zeros((3, height, width), np.float32))]
        gly_lines = [_tensor(np.zeros((1, GLY_LINE_HEIGHT, GLY_LINE_WIDTH), np.float32))]
        line_masks = [_tensor(np.zeros((height, width), np.float32))]
        colors = [torch.full((1, 3), COLOR_SENTINEL / 255.0)]
        mimic_crops = [None]
    if request.revise_position and request.mode == "gen":
        line_masks, revise_warnings = revise_line_masks(glyphs, line_masks, texts)
        warnings += revise_warnings
    elif request.revise_position:
        warnings.append("Revise Position applies to generation only; editing keeps the drawn positions")
    hint = np.zeros((height, width), np.float32)
    for position in positions:
        np.maximum(hint, position.mask, out=hint)
    if edit_image is None:
        masked = np.full((height, width, 3), -1.0, np.float32)  # a black reference, masked or not, is -1
    else:
        masked = np.clip(edit_image.astype(np.float32) / 127.5 - 1.0 - 10.0 * hint[..., None], -1.0, 1.0)
    return Conditioning(
        texts=texts,
        image_caption=append_prompt(image_prompt.caption, a_prompt),
        text_caption=text_prompt.caption,
        negative_caption=n_prompt,
        glyphs=glyphs, gly_line=gly_lines, positions=line_masks, colors=colors,
        font_hint=_tensor(font_hint), hint=_tensor(hint), masked_image=_tensor(masked.transpose(2, 0, 1)),
        mode=request.mode, polygons=[p.polygon for p in positions[: len(texts)]], mimic_crops=mimic_crops,
        glyph_image=debug_glyph_image(glyph_sum, [p.polygon for p in positions[: len(texts)]]),
        font_hint_image=np.repeat((font_hint * 255.0).astype(np.uint8)[..., None], 3, axis=2),
        warnings=warnings,
    )


def _count(number: int, noun: str) -> str:
    """``1 position``, ``2 positions``, ``0 quoted texts``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def debug_glyph_image(glyph_sum: np.ndarray, polygons: Sequence[np.ndarray]) -> np.ndarray:
    """The glyph renders (summed, 0..255, CHW) as one (H, W, 3) uint8 image with each line's polygon outlined.

    Outlines are drawn in white after clipping, which equals upstream's drawing them into each line's render
    before summing: every pixel of an outline reaches 255 either way.
    """
    image = np.ascontiguousarray(np.clip(glyph_sum, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    for polygon in polygons:
        cv2.drawContours(image, [np.round(polygon).astype(np.int32).reshape(-1, 1, 2)], 0, (255, 255, 255), 1)
    return image


def conditioning_from_sample(sample: dict[str, Any], negative_prompt: str = DEFAULT_N_PROMPT) -> Conditioning:
    """Conditioning of one dataset sample (``AnyTextDataset`` / ``MockAnyTextDataset`` item), captions as trained."""
    n = int(sample["n_lines"])
    glyphs = [g[None].float() for g in sample["glyphs"][:n]]
    glyph_image = np.clip(sum(g[0].numpy().transpose(1, 2, 0) for g in glyphs) * 255.0, 0, 255).astype(np.uint8)
    font_hint = sample["font_hint"][None].float()
    return Conditioning(
        texts=list(sample["texts"][:n]),
        image_caption=sample["img_caption"].replace(PLACEHOLDER, " "),
        text_caption=sample["text_caption"],
        negative_caption=negative_prompt,
        glyphs=glyphs,
        gly_line=[g[None].float() for g in sample["gly_line"][:n]],
        positions=[p[None].float() for p in sample["positions"][:n]],
        colors=[c[None].float() for c in sample["color"][:n]],
        font_hint=font_hint,
        hint=sample["hint"][None].float(),
        masked_image=sample["masked_img"][None].float(),
        mode="edit" if bool((sample["masked_img"] > -1).any()) else "gen",
        glyph_image=glyph_image,
        font_hint_image=np.repeat((font_hint[0, 0].numpy() * 255.0).astype(np.uint8)[..., None], 3, axis=2),
    )


# --------------------------------------------------------------------------------------------------
# the pipeline

STUDENT_SAMPLER_NAMES = ("student", "auto", "lcm", "pcm", "tcd")


def _adapter_info(path: str | os.PathLike[str]) -> AdapterInfo | None:
    """The adapter's training record (None for folders written before it existed)."""
    try:
        return AdapterInfo.load(path)
    except AdapterInfoError as exc:
        raise InferenceInputError(f"cannot read the LoRA's training record: {exc}") from exc


def attach_student_lora(model: AnyText2Model, path: str | os.PathLike[str], scale: float,
                        merge: bool) -> tuple[AnyText2Model, Any]:
    """``model`` with a student adapter folder applied, and the peft handle (None once merged).

    Merged, the adapter is folded into the weights; unmerged, it stays separate, scaled by ``scale``, and
    the handle switches it off for the teacher.
    """
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = load_lora(model, path)
    except AdapterError as exc:
        raise InferenceInputError(f"student LoRA {exc}") from exc
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as exc:
        raise InferenceInputError(f"cannot apply the LoRA {path}: {exc}") from exc
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.scaling):
                module.set_scale(adapter, scale)
    if merge:
        return peft_model.merge_and_unload().eval(), None
    return model.eval(), peft_model


def build_model(recipe: ModelRecipe) -> tuple[AnyText2Model, Any, list[str]]:
    """The recipe's model on the CPU: the teacher with its swaps (``model_swaps.py``), then the student
    LoRA applied as recorded; also the peft handle and the swap notes."""
    if recipe.lora_path:  # a wrong adapter fails in seconds, before the teacher is loaded
        try:
            check_adapter(recipe.config, recipe.lora_path)
        except AdapterError as exc:
            raise InferenceInputError(f"student LoRA {exc}") from exc
        except ConfigError as exc:
            raise InferenceInputError(str(exc)) from exc
    model, notes = load_swapped_teacher(recipe)
    peft = None
    if recipe.lora_path:
        model, peft = attach_student_lora(model, recipe.lora_path, recipe.lora_scale, recipe.lora_merged)
    return model, peft, notes


class AnyText2Pipeline:
    """One AnyText2 model serving the student (LoRA on) and, unless the LoRA is merged, the teacher.

    ``load_lora(merge=True)`` folds the adapter into the weights (fastest student; the teacher is then
    gone); ``merge=False`` keeps it separate with a scale, and teacher sampling disables it.

    A pipeline from :meth:`from_pretrained` keeps the :class:`ModelRecipe` it was built from, so
    :meth:`set_model_swaps` can rebuild it with another base model or other community LoRAs
    (``model_swaps.py``) and re-apply the student LoRA as it was; ``swap_notes`` describe the swaps.
    """

    def __init__(self, model: AnyText2Model, font_path: str | os.PathLike[str] = DEFAULT_FONT_PATH) -> None:
        self.model = model
        self.recipe: ModelRecipe | None = None
        self.swap_notes: list[str] = []
        try:
            self.glyph_font = GlyphFont(font_path)
        except (FileNotFoundError, FontError) as exc:
            raise InferenceInputError(f"glyph font: {exc}") from exc
        self._fonts: dict[str, GlyphFont] = {str(self.glyph_font.path): self.glyph_font}
        self._peft = None
        self._blank_latents = BlankLatentCache()
        self._uncond_captions = UncondCaptionCache()
        self.lora_path: str | None = None
        self.lora_scale = 1.0
        self.lora_merged = False
        self.adapter_info: AdapterInfo | None = None
        self.acceleration: Acceleration | None = None
        self._acceleration_request: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(
        cls,
        config: str | os.PathLike[str],
        teacher_ckpt: str | os.PathLike[str] | None = None,
        lora_path: str | os.PathLike[str] | None = None,
        *,
        lora_scale: float = 1.0,
        merge_lora: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        font_path: str | os.PathLike[str] = DEFAULT_FONT_PATH,
        trust_checkpoint: bool = False,
        base_model_path: str | os.PathLike[str] | None = None,
        community_loras: Sequence[tuple[str | os.PathLike[str], float]] = (),
        compile: bool = False,
        compile_mode: str | None = None,
        channels_last: bool = False,
    ) -> "AnyText2Pipeline":
        """Build from a YAML and a checkpoint (no checkpoint: the random init-rule teacher, for tests),
        optionally with another SD1.5 base model and community LoRAs ``[(path, ratio), ...]`` merged in.
        ``compile``/``compile_mode``/``channels_last``: see :meth:`accelerate` (off by default: not bit-exact)."""
        base_model_path, community_loras = normalise_swaps(base_model_path, community_loras)
        recipe = ModelRecipe(str(config), str(teacher_ckpt) if teacher_ckpt else None, dtype,
                             torch.device(device) if device else default_device(), trust_checkpoint,
                             base_model_path, community_loras, str(lora_path) if lora_path else None,
                             float(lora_scale), bool(lora_path) and bool(merge_lora))
        model, peft, notes = build_model(recipe)
        pipe = cls(model, font_path)
        pipe._install(model, peft, notes, recipe)
        if compile or channels_last:
            pipe.accelerate(compile=compile, compile_mode=compile_mode, channels_last=channels_last)
        return pipe

    def accelerate(self, *, compile: bool, compile_mode: str | None = None, channels_last: bool,
                   backend: str = "inductor") -> Acceleration:
        """Channels-last weights and/or ``torch.compile`` for the UNet, WriteNet and VAE decoder
        (``anytext2/acceleration.py``); kept for the model a LoRA merge or a model swap puts in place later.
        Compiled graphs are built on first use per shape, so the first request at a size is slow."""
        self._acceleration_request = dict(compile=compile, compile_mode=compile_mode, channels_last=channels_last,
                                          backend=backend)
        self.acceleration = accelerate_model(self.model, **self._acceleration_request)
        return self.acceleration

    def _reaccelerate(self) -> None:
        if self._acceleration_request is not None:
            self.acceleration = accelerate_model(self.model, **self._acceleration_request)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def has_lora(self) -> bool:
        return self.lora_path is not None

    @property
    def can_sample_teacher(self) -> bool:
        return not self.lora_merged

    @property
    def lcm_grid(self) -> int:
        """The student's training grid N (``LCMScheduler.original_inference_steps``), from its adapter folder."""
        return training_grid(self.adapter_info)

    def load_lora(self, path: str | os.PathLike[str], scale: float = 1.0, merge: bool = True) -> None:
        """Apply a student adapter folder (``adapter_config.json`` + weights), scaled by ``scale``."""
        if self.has_lora:
            raise InferenceInputError(f"a student LoRA is already applied ({self.lora_path}); build a new pipeline")
        info = _adapter_info(path)
        self.model, self._peft = attach_student_lora(self.model, path, scale, merge)
        self.lora_path, self.lora_scale, self.lora_merged = str(path), float(scale), bool(merge)
        self.adapter_info = info
        self._reaccelerate()
        if self.recipe is not None:
            self.recipe = replace(self.recipe, lora_path=str(path), lora_scale=float(scale), lora_merged=bool(merge))

    def set_model_swaps(self, base_model_path: str | os.PathLike[str] | None,
                        community_loras: Sequence[tuple[str | os.PathLike[str], float]] = ()) -> list[str]:
        """Use another SD1.5 base model (None: the checkpoint's own) and these community LoRAs ``[(path,
        ratio), ...]``; returns a note per swap. Cheap when nothing changed (a UI may call it on every
        request); otherwise the teacher is rebuilt from the recipe on the CPU, swapped, given the student
        LoRA as before, and only then replaces the current model, which a bad file leaves untouched."""
        base_model_path, community_loras = normalise_swaps(base_model_path, community_loras)
        if self.recipe is None:
            if base_model_path is None and not community_loras:
                return []
            raise InferenceInputError("this pipeline wraps a model built elsewhere, so it cannot reload it with "
                                      "another base model or LoRAs: build it with AnyText2Pipeline.from_pretrained")
        recipe = replace(self.recipe, base_model_path=base_model_path, community_loras=community_loras)
        if recipe == self.recipe:
            return []
        model, peft, notes = build_model(recipe)
        self._install(model, peft, notes, recipe)
        return notes

    def _install(self, model: AnyText2Model, peft: Any, notes: list[str], recipe: ModelRecipe) -> None:
        """Make a model :func:`build_model` built on the CPU the pipeline's; the old one goes first, so the
        device never holds both."""
        self.model = self._peft = None
        if recipe.device.type == "cuda":
            torch.cuda.empty_cache()
        self.model, self._peft = model.to(recipe.device), peft
        self.recipe, self.swap_notes = recipe, notes
        self.lora_path, self.lora_scale, self.lora_merged = recipe.lora_path, recipe.lora_scale, recipe.lora_merged
        self.adapter_info = _adapter_info(recipe.lora_path) if recipe.lora_path else None
        # the caches key on tensor identity, which a rebuilt model may reuse from a freed one
        self._blank_latents, self._uncond_captions = BlankLatentCache(), UncondCaptionCache()
        self._reaccelerate()

    def set_base_model(self, path: str | os.PathLike[str] | None) -> list[str]:
        """:meth:`set_model_swaps` with the current community LoRAs."""
        return self.set_model_swaps(path, self.recipe.community_loras if self.recipe else ())

    def set_community_loras(self, loras: Sequence[tuple[str | os.PathLike[str], float]]) -> list[str]:
        """:meth:`set_model_swaps` with the current base model."""
        return self.set_model_swaps(self.recipe.base_model_path if self.recipe else None, loras)

    def font(self, path: str | os.PathLike[str]) -> GlyphFont:
        """A per-line hint font, opened once per pipeline."""
        key = str(Path(path).expanduser())
        if key not in self._fonts:
            self._fonts[key] = GlyphFont(path)
        return self._fonts[key]

    def prepare(self, request: TextRequest) -> Conditioning:
        return build_conditioning(request, self.glyph_font, self.font)

    @contextlib.contextmanager
    def _weights_for(self, sampler: Sampler) -> Iterator[list[str]]:
        """The teacher runs with the adapters disabled; yields warnings about the weights used."""
        if sampler == "teacher":
            if self.lora_merged:
                raise InferenceInputError("the student LoRA is merged into the weights, so the teacher is not "
                                          "available; load the LoRA unmerged to sample both")
            with adapters_disabled(self._peft) if self._peft is not None else contextlib.nullcontext():
                yield []
            return
        if sampler not in STUDENT_SAMPLER_NAMES:
            raise InferenceInputError(f"sampler must be 'teacher' or one of {', '.join(STUDENT_SAMPLER_NAMES)}, "
                                      f"got {sampler!r}")
        yield [] if self.has_lora else ["no student LoRA is loaded: this is few-step sampling of the base teacher"]

    def student_plan(self, options: SamplingOptions) -> StudentSampling:
        """The student sampler and step count for ``options`` and the loaded adapter's record; refuses with a
        message a sampler or step count the adapter was not trained for."""
        requested = "auto" if options.sampler == "student" else options.sampler
        try:
            return plan_student_sampling(requested, options.steps, self.adapter_info)
        except ValueError as exc:
            where = f" ({self.lora_path})" if self.lora_path else ""
            raise InferenceInputError(f"{exc}{where}") from exc

    def _masked_latent(self, conditioning: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """The masked image's latent; generation mode's blank image reuses its cached VAE moments."""
        if is_blank_masked_image(conditioning.masked_image):
            return self._blank_latents.latent(self.model, conditioning.masked_image, generator).float()
        return self.model.vae_encode(conditioning.masked_image, generator=generator).float()

    def _uncond_contexts(self, conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached uncond CLIP contexts, unless the negative prompt holds placeholders (then per request)."""
        if PLACEHOLDER in conditioning.negative_caption:
            return None
        contexts, _ = self._uncond_captions.get(self.model, conditioning.negative_caption, 1,
                                                (conditioning.height, conditioning.width))
        return contexts

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(self, conditioning: Conditioning, options: SamplingOptions | None = None) -> InferenceResult:
        """Encode, sample and decode ``options.num_images`` images for prepared conditioning."""
        options = options or SamplingOptions()
        if options.num_images < 1:
            raise InferenceInputError(f"the image count must be at least 1, got {options.num_images}")
        if options.sampler != "teacher":
            check_student_steps("steps", options.steps, self.adapter_info)
        plan = None if options.sampler == "teacher" else self.student_plan(options)
        steps = options.resolved_steps() if plan is None else plan.steps
        if plan is None:
            check_steps("steps", steps, teacher=True)
        seed = resolve_seed(options.seed)
        generator = torch.Generator().manual_seed(seed)
        timings: dict[str, float] = {}
        with self._weights_for(options.sampler) as weight_warnings:
            self._sync()
            start = time.perf_counter()
            masked_x = self._masked_latent(conditioning, generator)
            guided = options.sampler == "teacher" and options.guidance_scale != 1.0
            cond, uncond = self.model.encode_conditions(
                conditioning.text_info(masked_x, self.device), [conditioning.image_caption], [conditioning.text_caption],
                conditioning.negative_caption if guided else None,
                self._uncond_contexts(conditioning) if guided else None)
            latent_shape = (options.num_images, self.model.config.latent_channels, *masked_x.shape[-2:])
            latents = torch.randn(latent_shape, generator=generator)
            # the loops' timesteps and scheduler coefficients, Python numbers made before the loop starts
            steps_plan = (ddim_steps(steps, options.eta, self.model.alphas_cumprod, options.anytext2_ddim_grid)
                          if plan is None else student_steps(plan, self.model.alphas_cumprod, options.gamma))
            self._sync()
            timings["encode"] = time.perf_counter() - start
            start = time.perf_counter()
            hook = mark_step if self.acceleration is not None and self.acceleration.cuda_graphs else None
            if options.sampler == "teacher":
                latents = run_teacher(
                    self.model, cond, uncond, steps_plan, latents, generator, options.guidance_scale, options.strength,
                    options.attnx_scale, images_per_condition=options.num_images, batch_cfg=options.batch_cfg,
                    before_unet=hook)
            else:
                latents = run_student(self.model, cond, steps_plan, latents, generator, options.strength,
                                      options.attnx_scale, images_per_condition=options.num_images, before_unet=hook)
            self._sync()
            timings["sample"] = time.perf_counter() - start
            start = time.perf_counter()
            images = to_uint8_image(self.model.vae_decode(latents))
            timings["decode"] = time.perf_counter() - start
        timings["total"] = sum(timings.values())
        return InferenceResult(
            images=list(images), glyph_image=conditioning.glyph_image, font_hint_image=conditioning.font_hint_image,
            seed=seed, sampler=options.sampler, steps=steps, warnings=list(conditioning.warnings) + weight_warnings,
            timings=timings, prompt=conditioning.describe(), student_sampler=plan.name if plan else None,
        )

    def __call__(self, request: TextRequest, options: SamplingOptions | None = None) -> InferenceResult:
        """Prepare and generate; ``timings`` then also holds ``prepare`` and ``total``."""
        start = time.perf_counter()
        conditioning = self.prepare(request)
        prepared = time.perf_counter() - start
        result = self.generate(conditioning, options)
        result.timings["prepare"] = prepared
        result.timings["total"] += prepared
        return result
