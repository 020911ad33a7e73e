"""From one AnyText2 JSON record to the pieces a training sample is made of.

Shared by the dataset (online path) and the LMDB cache builder, so both parse annotations, load
images and render lines identically — the cached and online tensors can only agree if they come from
the same functions. Nothing here uses torch.

Frame contract: polygons in the JSON are pixel coordinates of the *stored* image. Images are resized
(squashed, like upstream) to ``resolution x resolution`` and polygons are scaled by the same factors,
so non-square or non-512 images are handled correctly (upstream silently assumed 512x512 frames).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .glyph_render import (
    COLOR_SENTINEL,
    REPO_ROOT,
    FontSet,
    GlyphFont,
    Patch,
    as_font_set,
    as_polygon,
    fill_polygon,
    font_hint_base,
    render_gly_line,
    render_glyphs,
)

logger = logging.getLogger(__name__)

LANGUAGES = ("Latin", "Chinese", "Chinese_sim", "Chinese_tra", "Japanese", "Korean", "Arabic", "Hindi", "Bangla")
TEXT_CAPTION_PHRASES = ("Text says ", "Image with words ", "The picture reads ", "Captions are ",
                        "Texts are ", "Text:  ")
"""AnyText2's text-caption openings (its missing comma fused 'Text: ' and ' ' into the last one)."""
PLACEHOLDER = "*"
FAKE_LINE_POLYGON_512 = ((10, 10), (100, 10), (100, 100), (10, 100))
"""Where upstream puts the empty line of a text-free image (512 frame), keeping DDP ranks in step."""


class SampleError(Exception):
    """A record that cannot become a training sample; ``kind`` is the counter name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------------
# images


def image_roots(data_root: str, json_path: Path) -> list[Path]:
    """Directories to look for images of one annotation file, most likely first.

    A relative ``data_root`` is relative to the JSON file's directory. AnyWord-3M files carry the
    authors' absolute paths; those are remapped under ``$ANYTEXT2_DATASET_ROOT`` (default
    ``<repo>/dataset``) using the published layout.
    """
    root = Path(data_root).expanduser() if data_root else Path(".")
    if not root.is_absolute():
        return [(json_path.parent / root).resolve()]
    if root.is_dir():
        return [root]
    base = Path(os.environ.get("ANYTEXT2_DATASET_ROOT", REPO_ROOT / "dataset")).expanduser()
    text = root.as_posix() + "/"
    out: list[Path] = []
    ocr = re.search(r"/ocr_data/([^/]+)/", text)
    wukong = re.search(r"/wukong_word/([^/]+)/", text)
    if ocr:
        out.append(base / "ocr_data" / ocr.group(1) / ocr.group(1) / "images")
    elif wukong:
        out.append(base / wukong.group(1) / wukong.group(1) / "imgs")
    elif "/laion_word/" in text:
        out.extend(base / "laion" / f"laion_p{k}" / "imgs" for k in range(1, 6))
    out = [p for p in out if p.is_dir()]
    return out or [root]


def find_image(roots: Sequence[Path], img_name: str) -> Path | None:
    for root in roots:
        candidate = root / img_name
        if candidate.is_file():
            return candidate
    return None


def _to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 for any PIL mode: 16-bit and float greyscale are rescaled rather than clipped,
    transparency is composited on white rather than dropped to its (often black) colour."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)  # exact for 16-bit values; F images are float32 already
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:
            arr = arr / 257.0
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image(path: Path, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as (resolution, resolution, 3) uint8 RGB plus its stored (width, height).

    Raises SampleError('missing_image' | 'image_too_large' | 'bad_image'); 'image_too_large' is an image
    whose header claims more pixels than Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
    """
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except FileNotFoundError as exc:
        raise SampleError("missing_image", f"image not found: {path}") from exc
    except Image.DecompressionBombError as exc:
        raise SampleError("image_too_large", f"image {path} is too large to decode safely: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleError("bad_image", f"cannot decode image {path}: {exc}") from exc
    h0, w0 = rgb.shape[:2]
    if w0 == 0 or h0 == 0:
        raise SampleError("bad_image", f"image has zero size: {path}")
    return np.ascontiguousarray(squash_to(rgb, resolution)), (w0, h0)


def squash_to(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """(h, w, 3) image resized to resolution x resolution, ignoring the aspect ratio as upstream does;
    area filtering when it shrinks so small text does not alias."""
    h0, w0 = rgb.shape[:2]
    if (w0, h0) == (resolution, resolution):
        return rgb
    interp = cv2.INTER_AREA if w0 * h0 > resolution * resolution else cv2.INTER_LINEAR
    return cv2.resize(rgb, (resolution, resolution), interpolation=interp)


# --------------------------------------------------------------------------------------------------
# captions


def truncate_caption(caption: str, max_words: int, rng: np.random.Generator) -> str:
    """AnyText2's caption truncation: keep 500 characters; past ``max_words`` words keep the first
    sentence and add randomly chosen other sentences until the budget, cutting the last one."""
    caption = caption[:500]
    if max_words <= 0 or len(caption.split()) <= max_words:
        return caption
    sentences = caption.split(".")
    first = sentences[0].strip()
    rest = sentences[1:]
    words = first.split()
    if len(words) >= max_words:
        return " ".join(words[:max_words])
    out, count = first, len(words)
    while count < max_words and rest:
        chosen = rest.pop(int(rng.integers(len(rest)))).split()
        if count + len(chosen) > max_words:
            chosen = chosen[:max_words - count] + ["."]
        if chosen:
            out += ". " + " ".join(chosen)
            count += len(chosen)
    return out


def image_caption(caption: object, wm_score: object, rng: np.random.Generator, *, max_words: int = 128,
                  cap_watermark: bool = True) -> str:
    """``img_caption``: placeholder ``*`` scrubbed (the embedding manager would rewrite it), the
    watermark tag appended when the record has ``wm_score``, then truncated. A missing or non-string
    caption counts as empty (the dataset counts the latter as ``fix.bad_caption``)."""
    text = caption if isinstance(caption, str) else ""
    text = text.replace(PLACEHOLDER, " ")
    if cap_watermark and isinstance(wm_score, (int, float)) and not isinstance(wm_score, bool):
        text += " with watermarks " if wm_score > 0.5 else " no watermarks "
    return truncate_caption(text + ". ", max_words, rng)


def text_caption(n_lines: int, phrase: str) -> str:
    """``text_caption`` with one stand-alone ``*`` per line: ``'Captions are * , * . '``.

    The spaces matter: CLIP tokenises ``*`` as id 265 only when it is its own word (``*,`` is 41895).
    """
    return phrase + " , ".join([PLACEHOLDER] * n_lines) + " . "


# --------------------------------------------------------------------------------------------------
# annotations

_SCRIPT_RANGES = (
    ("Korean", ((0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F))),
    ("Japanese", ((0x3040, 0x30FF),)),
    ("Chinese", ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))),
    ("Arabic", ((0x0600, 0x06FF), (0x0750, 0x077F))),
    ("Hindi", ((0x0900, 0x097F),)),
    ("Bangla", ((0x0980, 0x09FF),)),
)
_t2s = None


def _is_traditional(text: str) -> bool:
    global _t2s
    if _t2s is None:
        import opencc
        _t2s = opencc.OpenCC("t2s")
    return _t2s.convert(text) != text


def guess_language(text: str) -> str:
    """Language from the characters' scripts (for records with a missing or unknown language)."""
    for name, ranges in _SCRIPT_RANGES:
        if any(lo <= ord(ch) <= hi for ch in text for lo, hi in ranges):
            return name
    return "Latin"


def normalize_language(language: object, text: str) -> tuple[str, bool]:
    """(AnyText2 language label, whether it was guessed). ``Chinese`` becomes ``Chinese_tra`` when
    OpenCC's traditional-to-simplified conversion changes the text, else ``Chinese_sim``."""
    guessed = not (isinstance(language, str) and language in LANGUAGES)
    lang = guess_language(text) if guessed else language
    if lang == "Chinese":
        lang = "Chinese_tra" if _is_traditional(text) else "Chinese_sim"
    return lang, guessed


def parse_color(value: object) -> tuple[tuple[int, int, int], bool]:
    """(RGB 0-255, or the 500 sentinel; whether the value was malformed)."""
    sentinel = (COLOR_SENTINEL,) * 3
    if value is None:
        return sentinel, False
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        return sentinel, True
    if any(v >= COLOR_SENTINEL for v in value):
        return sentinel, False
    return tuple(int(min(max(round(v), 0), 255)) for v in value), False


@dataclass(frozen=True, eq=False)
class LineAnn:
    """One usable text line: polygon in the resolution frame, text already cut to max_chars, and the font
    it is drawn in (None only for the blank stand-in line)."""

    ann_index: int
    polygon: np.ndarray
    text: str
    language: str
    color: tuple[int, int, int]
    font: GlyphFont | None = None


@dataclass
class ParsedAnnotations:
    lines: list[LineAnn] = field(default_factory=list)
    ignore_polygons: list[np.ndarray] = field(default_factory=list)
    """Areas to keep out of the loss: ``valid: false`` lines and lines skipped for their content."""
    issues: Counter = field(default_factory=Counter)


_warned: Counter = Counter()


def _warn_skip(counter: str, where: str, text: str, reason: str) -> None:
    """Log the first 20 skips of each kind per process; the counters keep the full count."""
    _warned[counter] += 1
    if _warned[counter] <= 20:
        logger.warning("%s: skipping line %r: %s%s", where, text, reason,
                       f" (further warnings suppressed, see the {counter} counter)" if _warned[counter] == 20 else "")


def _missing_reason(fonts: FontSet, text: str) -> str:
    if len(fonts) == 1:
        return f"the font {fonts.primary.path.name} lacks {''.join(fonts.primary.missing_chars(text))}"
    return f"no font in {fonts.path} has all of its characters"


def parse_annotations(annotations: object, *, image_size: tuple[int, int], resolution: int, max_chars: int,
                      font: GlyphFont | FontSet, where: str = "", record_key: str = "") -> ParsedAnnotations:
    """Usable lines of a record, in JSON order, with every problem counted in ``issues``.

    Each line gets its font from the set (:meth:`FontSet.choose`, keyed by ``record_key`` and the
    annotation index, so pass :func:`record_cache_key` for reproducible choices with several fonts).

    Counters: ``line.bad_annotation``, ``line.bad_polygon`` (not >= 3 finite points),
    ``line.degenerate_polygon`` (no area), ``line.polygon_outside`` (less than half of it inside the image),
    ``line.empty_text``, ``line.missing_glyphs`` (no font has all its characters), ``line.complex_script``
    (needs shaping and Pillow has no RAQM layout); and non-skipping fixes ``fix.text_truncated``,
    ``fix.unknown_language``, ``fix.bad_color``. Content-skipped lines keep their area out of the loss.
    """
    fonts = as_font_set(font)
    out = ParsedAnnotations()
    if annotations is None:
        return out
    if not isinstance(annotations, list):
        out.issues["line.bad_annotation"] += 1
        return out
    sx, sy = resolution / image_size[0], resolution / image_size[1]
    for j, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            out.issues["line.bad_annotation"] += 1
            continue
        try:
            polygon = as_polygon(ann.get("polygon")) * np.array([sx, sy], np.float32)
        except (ValueError, TypeError):
            out.issues["line.bad_polygon"] += 1
            continue
        _, (rw, rh), _ = cv2.minAreaRect(polygon)
        area = abs(cv2.contourArea(polygon))
        if min(rw, rh) < 1.0 or area < 1.0:
            out.issues["line.degenerate_polygon"] += 1
            continue
        if int(fill_polygon(polygon, resolution, resolution).data.sum()) < 0.5 * area:
            out.issues["line.polygon_outside"] += 1
            continue
        if ann.get("valid", True) is False:
            out.ignore_polygons.append(polygon)
            continue
        text = ann.get("text")
        if not isinstance(text, str) or not text.strip():
            out.issues["line.empty_text"] += 1
            out.ignore_polygons.append(polygon)
            continue
        if len(text) > max_chars:
            out.issues["fix.text_truncated"] += 1
            text = text[:max_chars]
        line_font = fonts.choose(text, f"{record_key}:{j}")
        if line_font is None:
            out.issues["line.missing_glyphs"] += 1
            _warn_skip("line.missing_glyphs", where, text, _missing_reason(fonts, text))
            out.ignore_polygons.append(polygon)
            continue
        if not line_font.can_layout(text):
            out.issues["line.complex_script"] += 1
            _warn_skip("line.complex_script", where, text, "complex script and Pillow has no RAQM layout (libraqm)")
            out.ignore_polygons.append(polygon)
            continue
        if not line_font.has_ink(text):
            out.issues["line.empty_text"] += 1
            out.ignore_polygons.append(polygon)
            continue
        language, guessed = normalize_language(ann.get("language"), text)
        if guessed:
            out.issues["fix.unknown_language"] += 1
        color, bad_color = parse_color(ann.get("color"))
        if bad_color:
            out.issues["fix.bad_color"] += 1
        out.lines.append(LineAnn(j, polygon, text, language, color, line_font))
    return out


def fake_line(resolution: int) -> LineAnn:
    """Upstream's stand-in line for an image without usable text: blank text, no colour, a fixed box."""
    poly = np.array(FAKE_LINE_POLYGON_512, np.float32) * np.float32(resolution / 512.0)
    return LineAnn(-1, poly, " ", "Latin", (COLOR_SENTINEL,) * 3)


# --------------------------------------------------------------------------------------------------
# per-line renders (what the LMDB cache stores)


@dataclass(frozen=True)
class RenderOptions:
    """Everything a line render depends on besides the line itself; stored in the LMDB meta."""

    resolution: int = 512
    max_chars: int = 20
    glyph_scale: float = 1.0
    vert_ang: float = 10.0
    add_space: bool = True


@dataclass(frozen=True, eq=False)
class LineRender:
    """CPU-heavy per-line renders: glyph coverage (glyph canvas frame), OCR strip, font-hint base."""

    glyph: Patch
    gly_line: np.ndarray
    hint_base: Patch


def render_line_text(line: LineAnn, opts: RenderOptions) -> tuple[Patch, np.ndarray]:
    """(glyph coverage in the glyph canvas frame, OCR strip) of one line, in the line's font."""
    if line.font is None:
        raise ValueError(f"line {line.text!r} has no font (the blank stand-in line is not rendered)")
    glyph = render_glyphs(line.font, line.text, line.polygon, scale=opts.glyph_scale, vert_ang=opts.vert_ang,
                          add_space=opts.add_space)
    return glyph, render_gly_line(line.font, line.text)


def render_line(line: LineAnn, image: np.ndarray, opts: RenderOptions) -> LineRender:
    """Everything the cache stores for a line (the online path calls the same functions)."""
    glyph, strip = render_line_text(line, opts)
    return LineRender(glyph=glyph, gly_line=strip, hint_base=font_hint_base(image, line.polygon))


def record_cache_key(record: dict) -> str:
    """LMDB key of a record: a hash of its image name and annotations, so it survives moving or
    renaming the dataset files and changes whenever what is rendered changes."""
    payload = json.dumps([record.get("img_name"), record.get("annotations")], sort_keys=True,
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()
