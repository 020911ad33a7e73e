"""User input for inference turned into plain values: prompts, positions, colours, images.

Everything here is model-free and raises :class:`InferenceInputError` with a message meant for the
person who typed the input (the CLI prints it, the demo shows it), never a traceback.

AnyText2 conventions kept (``anytext2_model.md`` §12):

* Prompts: curly quotes become ``"``; every ``"…"`` span is one text line and is replaced by a
  placeholder. Upstream inserts a bare ``*``, which turns ``reads "A", "B"`` into ``reads *, *``
  where ``*,`` is a different CLIP token; here each placeholder is written as `` * `` so every one
  tokenises to id 265. A ``*`` outside quotes would also be read as a placeholder and is removed.
* Position masks are white text areas on black; connected components under 20 pixels are dropped;
  lines are ordered top-down (``↕``) or left-right (``↔``) on a 102-pixel grid; each component's
  polygon is the largest contour simplified by ``approxPolyDP`` (epsilon 1 % of the perimeter) and its
  line mask is the component with that polygon filled in.
* Colours are ``'r,g,b'`` on 0-255; ``500,500,500`` (or nothing) means "unspecified".
* Edit images are clipped to [1, 255], made 3-channel, downscaled so the long side is at most 1024,
  then each side is floored to a multiple of 64.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from ..data.glyph_render import COLOR_SENTINEL, as_polygon, fill_polygon

PLACEHOLDER = "*"
MAX_CHARS = 20
SIZE_MULTIPLE = 64
EDIT_MAX_LENGTH = 1024
MASK_THRESHOLD = 254
MIN_COMPONENT_AREA = 20
SORT_GAP = 102
SORT_PRIORITIES = ("↕", "↔")

DEFAULT_A_PROMPT = ("best quality, extremely detailed,4k, HD, supper legible text,  clear text edges,  clear strokes, "
                    "neat writing, no watermarks")
DEFAULT_N_PROMPT = ("low-res, bad anatomy, extra digit, fewer digits, cropped, worst quality, low quality, watermark, "
                    "unreadable text, messy words, distorted text, disorganized writing, advertising picture")
UNSPECIFIED_COLOR = (COLOR_SENTINEL,) * 3


class InferenceInputError(ValueError):
    """Input the pipeline cannot use; the message is written for the end user."""


@dataclass
class ParsedPrompt:
    """A prompt with its quoted texts cut out: ``caption`` has one stand-alone ``*`` per text."""

    caption: str
    texts: list[str]
    warnings: list[str] = field(default_factory=list)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """AnyText2's ``modify_prompt`` with placeholders that always tokenise to CLIP id 265."""
    if not isinstance(prompt, str):
        raise InferenceInputError(f"the prompt must be a string, got {type(prompt).__name__}")
    prompt = prompt.replace("“", '"').replace("”", '"')
    parts = re.split(r'"(.*?)"', prompt)
    outside, texts = parts[0::2], parts[1::2]
    warnings = []
    if any(PLACEHOLDER in part for part in outside):
        warnings.append(f"removed '{PLACEHOLDER}' outside quotes from the prompt (it marks where a quoted text goes)")
        outside = [part.replace(PLACEHOLDER, " ") for part in outside]
    if outside[-1].count('"'):
        warnings.append('the prompt has an unmatched double quote; the text after it is not a text line')
    caption = f" {PLACEHOLDER} ".join(outside)
    return ParsedPrompt(" ".join(caption.split()), texts, warnings)


def append_prompt(caption: str, added: str) -> str:
    """AnyText2's cond image caption ``caption + ', ' + added``, without gluing a final ``*`` to the comma."""
    separator = " , " if caption.endswith(PLACEHOLDER) else ", "
    return caption + separator + added


def scrub_placeholders(text: str, name: str, warnings: list[str]) -> str:
    """Remove ``*`` from a prompt that has no quoted texts of its own (added / negative prompt)."""
    if PLACEHOLDER in text:
        warnings.append(f"removed '{PLACEHOLDER}' from the {name} (it would be read as a text placeholder)")
        return text.replace(PLACEHOLDER, " ")
    return text


def validate_texts(texts: Sequence[str], max_chars: int = MAX_CHARS) -> tuple[list[str], list[str]]:
    """(texts cut to ``max_chars``, warnings); an empty or blank text is an error."""
    out, warnings = [], []
    for index, text in enumerate(texts, start=1):
        if not text.strip():
            raise InferenceInputError(f'text line {index} is empty ("{text}"): put the words to draw between the quotes')
        if len(text) > max_chars:
            warnings.append(f'text line {index} "{text}" is longer than {max_chars} characters and was cut to '
                            f'"{text[:max_chars]}"')
            text = text[:max_chars]
        out.append(text)
    return out, warnings


def parse_color(value: object, line: int | None = None) -> tuple[int, int, int]:
    """RGB on 0-255, or the 500 sentinel for "unspecified".

    Accepts None / "" / "none" (unspecified), ``'r,g,b'``, ``'#rrggbb'``, CSS names, ``'rgba(r, g, b, a)'``
    (what Gradio colour pickers return) and 3-sequences. Any channel of 500 or more means unspecified.
    """
    where = f" for line {line}" if line is not None else ""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "unspecified")):
        return UNSPECIFIED_COLOR
    try:
        if isinstance(value, str):
            text = value.strip()
            if text.lower().startswith("rgb"):
                channels = [float(v) for v in text[text.index("(") + 1 : text.rindex(")")].split(",")[:3]]
            elif "," in text:
                channels = [float(v) for v in text.split(",")]
            else:
                channels = [float(v) for v in ImageColor.getrgb(text)[:3]]
        else:
            channels = [float(v) for v in value]  # type: ignore[union-attr]
    except (ValueError, TypeError) as exc:
        raise InferenceInputError(f"cannot read colour {value!r}{where}: use 'r,g,b' with values 0-255, "
                                  "'#rrggbb', or 500,500,500 for unspecified") from exc
    if len(channels) != 3 or not all(np.isfinite(channels)):
        raise InferenceInputError(f"colour {value!r}{where} must have exactly three channels")
    if any(c >= COLOR_SENTINEL for c in channels):
        return UNSPECIFIED_COLOR
    if any(c < 0 or c > 255 for c in channels):
        raise InferenceInputError(f"colour {value!r}{where} has a channel outside 0-255")
    return tuple(int(round(c)) for c in channels)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# positions


@dataclass(frozen=True, eq=False)
class Position:
    """One text position: its polygon (pixels, x right, y down) and its line mask (H, W) uint8 {0, 1}."""

    polygon: np.ndarray
    mask: np.ndarray


def polygons_from_spec(spec: object) -> list[np.ndarray]:
    """Polygons from a JSON-like list: each entry is ``[[x, y], ...]`` (3+ points) or a box ``[x0, y0, x1, y1]``."""
    if not isinstance(spec, (list, tuple)):
        raise InferenceInputError("positions must be a list of polygons [[x, y], ...] or boxes [x0, y0, x1, y1]")
    polygons = []
    for index, entry in enumerate(spec, start=1):
        try:
            flat = np.asarray(entry, dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise InferenceInputError(f"position {index} is not a list of numbers: {entry!r}") from exc
        if flat.ndim == 1 and flat.shape[0] == 4:
            x0, y0, x1, y1 = flat
            if x1 <= x0 or y1 <= y0:
                raise InferenceInputError(f"box {index} {entry!r} needs x0 < x1 and y0 < y1")
            flat = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        try:
            polygons.append(as_polygon(flat))
        except ValueError as exc:
            raise InferenceInputError(f"position {index}: {exc}") from exc
    return polygons


def check_polygons_inside(polygons: Sequence[np.ndarray], width: int, height: int) -> None:
    """Every vertex must lie in the image (edges included) and every polygon must have an area."""
    for index, poly in enumerate(polygons, start=1):
        xs, ys = poly[:, 0], poly[:, 1]
        if xs.min() < 0 or ys.min() < 0 or xs.max() > width or ys.max() > height:
            raise InferenceInputError(
                f"position {index} reaches outside the {width}x{height} image (x {xs.min():.0f}..{xs.max():.0f}, "
                f"y {ys.min():.0f}..{ys.max():.0f})")
        _, (w, h), _ = cv2.minAreaRect(poly)
        if min(w, h) < 1.0 or abs(cv2.contourArea(poly)) < 1.0:
            raise InferenceInputError(f"position {index} has no area (its points are on one line)")


def positions_from_polygons(polygons: Sequence[np.ndarray], width: int, height: int) -> list[Position]:
    """Each polygon with its line mask, filled by the training pipeline's :func:`fill_polygon`."""
    check_polygons_inside(polygons, width, height)
    return [Position(poly, fill_polygon(poly, height, width).to_canvas(height, width)) for poly in polygons]


def binarize_mask(mask: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """(H, W) uint8 {0, 255}: first channel of the mask above ``threshold`` (AnyText2 uses 254)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise InferenceInputError(f"a position mask must be an (H, W) or (H, W, C) image, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        mask = np.clip(mask, 0, 255).astype(np.uint8)
    return np.where(mask > threshold, 255, 0).astype(np.uint8)


def find_polygon(component: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(polygon of the largest contour, component with that polygon filled in) of a {0, 255} mask."""
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    largest = max(contours, key=cv2.contourArea)
    poly = cv2.approxPolyDP(largest, 0.01 * cv2.arcLength(largest, True), True).reshape(-1, 2)
    filled = component.copy()
    cv2.drawContours(filled, [poly.reshape(-1, 1, 2)], -1, 255, -1)
    return poly.astype(np.float32), filled


def positions_from_mask(mask: np.ndarray, sort_priority: str = "↕") -> list[Position]:
    """Text positions drawn as white areas on black, one per connected component, in reading order."""
    if sort_priority not in SORT_PRIORITIES:
        raise InferenceInputError(f"sort priority must be one of {SORT_PRIORITIES}, got {sort_priority!r}")
    binary = binarize_mask(mask)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(binary)
    found = []
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] < MIN_COMPONENT_AREA:
            continue
        cx, cy = centroids[label]
        key = (cy // SORT_GAP, cx // SORT_GAP) if sort_priority == "↕" else (cx // SORT_GAP, cy // SORT_GAP)
        found.append((key, np.where(labels == label, 255, 0).astype(np.uint8)))
    found.sort(key=lambda item: item[0])
    positions = []
    for _, component in found:
        poly, filled = find_polygon(component)
        if len(poly) < 3:
            poly = cv2.boxPoints(cv2.minAreaRect(np.argwhere(filled > 0)[:, ::-1].astype(np.float32))).astype(np.float32)
        positions.append(Position(poly, (filled > 0).astype(np.uint8)))
    return positions


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a position mask like upstream (bilinear, before the 254 threshold)."""
    mask = np.asarray(mask)
    if mask.shape[:2] == (height, width):
        return mask
    return cv2.resize(np.ascontiguousarray(mask), (width, height))


# --------------------------------------------------------------------------------------------------
# images


def load_image_file(path: str | Path, what: str = "image") -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (an alpha channel is dropped, as AnyText2's ``check_channels``)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceInputError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise InferenceInputError(f"{what} {path} is too large to decode safely: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InferenceInputError(f"cannot read {what} {path}: {exc}") from exc
    if array.size == 0:
        raise InferenceInputError(f"{what} {path} is empty (zero pixels)")
    return np.ascontiguousarray(array)


def as_rgb_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 from a grey, RGB or RGBA array (AnyText2's ``check_channels``)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise InferenceInputError(f"the {what} must be an (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def resize_to_multiple(image: np.ndarray, max_length: int = EDIT_MAX_LENGTH, multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """AnyText2's ``resize_image``: downscale to ``max_length`` on the long side, floor sides to ``multiple``."""
    height, width = image.shape[:2]
    if max(height, width) > max_length:
        scale = max_length / max(height, width)
        image = cv2.resize(image, (int(round(width * scale)), int(round(height * scale))))
        height, width = image.shape[:2]
    new_w, new_h = width - width % multiple, height - height % multiple
    if new_w == 0 or new_h == 0:
        raise InferenceInputError(f"the edit image is {width}x{height}; both sides must be at least {multiple} pixels")
    return cv2.resize(image, (new_w, new_h))


def prepare_edit_image(image: np.ndarray) -> np.ndarray:
    """The reference image as AnyText2 edits it: 3-channel uint8 in [1, 255], sides multiples of 64."""
    return resize_to_multiple(as_rgb_image(image, "edit image").clip(1, 255))


def check_image_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise InferenceInputError(f"image {name} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")


def load_mask_file(path: str | Path, what: str, invert: bool = False) -> np.ndarray:
    """A mask image file with white text areas; ``invert`` for black-on-white drawings such as AnyText2's
    example files."""
    mask = load_image_file(path, what)
    return 255 - mask if invert else mask


def parse_positions_argument(value: str, invert: bool = False) -> list[np.ndarray] | np.ndarray:
    """``--positions``: a JSON file or JSON text of polygons/boxes, or a mask image file.

    Returns polygons, or the mask image (see :func:`load_mask_file`).
    """
    path = Path(value)
    looks_like_json = value.lstrip().startswith("[")
    if not looks_like_json and path.suffix.lower() != ".json":
        return load_mask_file(path, "position mask", invert)
    try:
        text = value if looks_like_json else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InferenceInputError(f"cannot read positions file {path}: {exc}") from exc
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InferenceInputError(f"positions are not valid JSON ({exc}); expected e.g. "
                                  "[[x0, y0, x1, y1], [[x, y], [x, y], [x, y], [x, y]]]") from exc
    return polygons_from_spec(spec)
