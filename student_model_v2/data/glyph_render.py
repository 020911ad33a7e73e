"""Glyph rendering shared by the training data pipeline and inference.

Everything here works on plain numpy arrays, polygons and strings — never on a dataset record — so
inference can build AnyText2's conditioning with exactly the code the teacher was trained with.

Why things are shaped the way they are:

* Fonts are opened once per process (one FreeType face per size, cached) because reopening the file
  for every size query is what produced "cannot open resource" in the original toolkit.
* Renders are returned as :class:`Patch` objects (a small uint8 array plus its top-left corner in the
  canvas) so per-line work stays at line size; callers expand a patch to a full canvas only when a
  full-size tensor is needed. Patches are also what the LMDB cache stores.
* The text direction comes from the polygon's long edge, not from OpenCV's version-dependent
  ``minAreaRect`` angle convention.
* A character the font lacks is reported by :meth:`GlyphFont.missing_chars`; callers must skip such
  lines instead of rendering empty boxes.
* Text is laid out with Pillow's RAQM engine (HarfBuzz shaping, bidi, kerning — what upstream's Pillow
  used) when this Pillow has libraqm, detected once per process; otherwise with BASIC, which cannot
  shape complex scripts, so :meth:`GlyphFont.can_layout` refuses those lines rather than drawing them
  unshaped and reversed.
* :class:`FontSet` is the font (or folder of fonts, upstream's ``rand_font``) lines are drawn in.

Coordinates are pixels in the canvas being drawn (x right, y down). Angles are degrees,
counter-clockwise as seen on screen, as in ``PIL.Image.rotate``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from ..anytext2.config import REPO_ROOT

logger = logging.getLogger(__name__)

DEFAULT_FONT_PATH = REPO_ROOT / "font" / "NotoSansCJKsc-Regular-subset.otf"
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
LAYOUTS = {"raqm": ImageFont.Layout.RAQM, "basic": ImageFont.Layout.BASIC}

GLY_LINE_HEIGHT = 80
GLY_LINE_WIDTH = 512
COLOR_SENTINEL = 500
"""AnyText2's "no colour" value per channel; the teacher learned ``[500, 500, 500]`` as that input."""

_REF_SIZE = 64
_PROBE_SIZE = 24
_NOTDEF_PROBE = "\U0010fffd"  # plane-16 private use: no real font maps it, so it renders .notdef


class FontError(RuntimeError):
    """A font file that exists but cannot be used (empty, unknown format), or a font folder without fonts."""


@functools.lru_cache(maxsize=None)
def detect_layout() -> str:
    """``"raqm"`` when this Pillow has libraqm, else ``"basic"``; checked once per process and reported once."""
    if features.check("raqm"):
        logger.info("glyph layout: RAQM (libraqm %s): complex scripts are shaped, Latin is kerned as upstream",
                    features.version("raqm"))
        return "raqm"
    logger.warning("glyph layout: BASIC (this Pillow has no libraqm): lines in complex scripts (Arabic, Hebrew, "
                   "Indic, Thai, ...) are skipped and counted as line.complex_script; install libraqm for them")
    return "basic"


# Scripts whose letters change shape with their neighbours, reorder, or stack marks: BASIC layout garbles them.
_COMPLEX_RANGES = (
    (0x0590, 0x08FF),  # Hebrew, Arabic, Syriac, Arabic Supplement, Thaana, NKo, Samaritan, Mandaic, Arabic Ext.
    (0x0900, 0x0DFF),  # Devanagari, Bengali, Gurmukhi, Gujarati, Oriya, Tamil, Telugu, Kannada, Malayalam, Sinhala
    (0x0E00, 0x0FFF),  # Thai, Lao, Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x18AF),  # Khmer, Mongolian
    (0xA8E0, 0xA8FF),  # Devanagari Extended
    (0xFB1D, 0xFDFF),  # Hebrew and Arabic presentation forms
    (0xFE70, 0xFEFF),  # Arabic presentation forms B
)


def needs_shaping(text: str) -> bool:
    """True when ``text`` has a character of a complex script (by Unicode block, or a right-to-left bidi class)."""
    for ch in text:
        code = ord(ch)
        if any(lo <= code <= hi for lo, hi in _COMPLEX_RANGES):
            return True
        if unicodedata.bidirectional(ch) in ("R", "AL"):
            return True
    return False


class GlyphFont:
    """One font file, loaded lazily once per process, with a FreeType face cached per size.

    Pickling keeps only the path and layout, so DataLoader workers reopen the font on first use instead of
    sharing FreeType state across processes. ``layout`` is ``"raqm"`` or ``"basic"``; None takes
    :func:`detect_layout` (tests force ``"basic"`` to exercise a Pillow without libraqm).
    """

    def __init__(self, path: str | os.PathLike[str], layout: str | None = None) -> None:
        resolved = resolve_font_path(path)
        if not resolved.is_file():
            raise FileNotFoundError(f"font file not found: {resolved} (given as {str(path)!r})")
        if resolved.stat().st_size == 0:
            raise FontError(f"font file is empty (0 bytes): {resolved}")
        layout = detect_layout() if layout is None else layout
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if layout == "raqm" and not features.check("raqm"):
            raise FontError("RAQM layout requested but this Pillow has no libraqm")
        self.path = resolved
        self.layout = layout
        self._reset()
        self.get(_REF_SIZE)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._faces: dict[int, ImageFont.FreeTypeFont] = {}
        self._has_char: dict[str, bool] = {}
        self._notdef: tuple | None = None
        self._probe_face: ImageFont.FreeTypeFont | None = None
        self._sha1: str | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "layout": self.layout}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.layout = state["layout"]
        self._reset()

    def get(self, size: int) -> ImageFont.FreeTypeFont:
        """The face at ``size`` pixels (at least 1), created on first use in this process."""
        if self._pid != os.getpid():
            self._reset()
        size = max(1, int(size))
        face = self._faces.get(size)
        if face is None:
            try:
                face = ImageFont.truetype(str(self.path), size, layout_engine=LAYOUTS[self.layout])
            except OSError as exc:
                raise FontError(f"cannot load font {self.path} at size {size}: {exc}") from exc
            self._faces[size] = face
        return face

    @property
    def sha1(self) -> str:
        """Content hash: identifies the font across machines and paths (used by the LMDB meta)."""
        if self._sha1 is None:
            self._sha1 = hashlib.sha1(self.path.read_bytes()).hexdigest()
        return self._sha1

    def _signature(self, ch: str) -> tuple:
        """What one character draws as, with BASIC layout whatever the font renders with: the question is
        whether the font maps it (its cmap), and RAQM shapes a lone character, drawing a combining mark or
        a Thai vowel the font lacks as an empty zero-width glyph unlike .notdef, i.e. as "present"."""
        if self._probe_face is None:
            self._probe_face = ImageFont.truetype(str(self.path), _PROBE_SIZE, layout_engine=ImageFont.Layout.BASIC)
        face = self._probe_face
        mask = face.getmask(ch)
        return mask.size, bytes(mask), face.getbbox(ch)

    def has_char(self, ch: str) -> bool:
        """True when the font maps ``ch`` to a real glyph (whitespace always counts as present)."""
        if ch.isspace():
            return True
        known = self._has_char.get(ch)
        if known is None:
            if self._notdef is None:
                self._notdef = self._signature(_NOTDEF_PROBE)
            known = self._signature(ch) != self._notdef
            self._has_char[ch] = known
        return known

    def has_ink(self, text: str) -> bool:
        """True when ``text`` draws at least one pixel (not only spaces or zero-width characters)."""
        left, top, right, bottom = self.get(_PROBE_SIZE).getbbox(text)
        return right > left and bottom > top

    def missing_chars(self, text: str) -> list[str]:
        """Characters of ``text`` the font cannot draw, in first-occurrence order."""
        return [ch for ch in dict.fromkeys(text) if not self.has_char(ch)]

    def can_layout(self, text: str) -> bool:
        """False when ``text`` needs shaping (complex script) and this font lays out with BASIC."""
        return self.layout == "raqm" or not needs_shaping(text)


class FontSet:
    """The fonts text lines are drawn in: one font (the default) or every font file in a folder.

    With several fonts each line gets one chosen among the fonts that have all its characters —
    upstream's ``rand_font``. The choice is a hash of (``key``, text), where the caller's key names the
    line (record content + annotation index), so it is reproducible, the same in every worker, rank and
    epoch, and the same in the LMDB build and the online path (a cached render matches the online one).
    """

    def __init__(self, fonts: Sequence[GlyphFont], source: Path) -> None:
        if not fonts:
            raise FontError(f"no font files ({', '.join(FONT_SUFFIXES)}) in {source}")
        layouts = {f.layout for f in fonts}
        if len(layouts) != 1:
            raise ValueError(f"fonts of one set must share a layout, got {sorted(layouts)}")
        self.fonts = tuple(sorted(fonts, key=lambda f: f.path.name))
        self.path = source
        self.layout = layouts.pop()

    @classmethod
    def load(cls, font_path: str | os.PathLike[str] = DEFAULT_FONT_PATH,
             font_dir: str | os.PathLike[str] | None = None, layout: str | None = None) -> "FontSet":
        """Every font of ``font_dir`` when given (``font_path`` is then unused), else the one ``font_path``.

        A folder's font that cannot be opened (empty, not a font) is an error naming it, not a silent gap.
        """
        if font_dir is None:
            font = GlyphFont(font_path, layout)
            return cls([font], font.path)
        folder = resolve_font_path(font_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"font folder not found: {folder} (given as {str(font_dir)!r})")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FONT_SUFFIXES)
        return cls([GlyphFont(p, layout) for p in files], folder)

    @property
    def primary(self) -> GlyphFont:
        return self.fonts[0]

    def __len__(self) -> int:
        return len(self.fonts)

    def covering(self, text: str) -> list[GlyphFont]:
        """Fonts that have every character of ``text``, in name order."""
        return [f for f in self.fonts if not f.missing_chars(text)]

    def choose(self, text: str, key: str) -> GlyphFont | None:
        """The font line ``key`` with ``text`` is drawn in; None when no font of the set covers the text."""
        candidates = self.covering(text)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        digest = hashlib.sha1(f"{key}\x00{text}".encode("utf-8")).digest()
        return candidates[int.from_bytes(digest[:8], "little") % len(candidates)]

    def manifest(self) -> list[dict[str, str]]:
        """Name and content sha1 of every font (recorded in the LMDB meta)."""
        return [{"name": f.path.name, "sha1": f.sha1} for f in self.fonts]

    @property
    def sha1(self) -> str:
        """Identifies the set across machines and paths: the font's content hash for one font, else a hash
        of the manifest (names and content hashes)."""
        if len(self.fonts) == 1:
            return self.fonts[0].sha1
        return hashlib.sha1(json.dumps(self.manifest(), sort_keys=True).encode("utf-8")).hexdigest()


def as_font_set(font: "GlyphFont | FontSet") -> FontSet:
    """``font`` as a :class:`FontSet` (a single font becomes a one-font set)."""
    return font if isinstance(font, FontSet) else FontSet([font], font.path)


def resolve_font_path(path: str | os.PathLike[str]) -> Path:
    """Absolute font path; a relative path is tried against the CWD, then against the repo root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    return (REPO_ROOT / candidate).resolve()


@dataclass(frozen=True, eq=False)
class Patch:
    """A uint8 array ``data`` (h, w) whose top-left pixel sits at (x, y) of a larger canvas.

    The patch may extend past the canvas; :meth:`paste_max` and :meth:`to_canvas` clip it.
    """

    data: np.ndarray
    x: int
    y: int

    def _overlap(self, height: int, width: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
        h, w = self.data.shape[:2]
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + w, width), min(self.y + h, height)
        if x1 <= x0 or y1 <= y0:
            return None
        canvas = (slice(y0, y1), slice(x0, x1))
        local = (slice(y0 - self.y, y1 - self.y), slice(x0 - self.x, x1 - self.x))
        return canvas, local

    def paste_max(self, canvas: np.ndarray) -> None:
        """Union the patch into ``canvas`` (h, w) in place (element-wise maximum)."""
        overlap = self._overlap(*canvas.shape[:2])
        if overlap is not None:
            dst, src = overlap
            np.maximum(canvas[dst], self.data[src], out=canvas[dst])

    def to_canvas(self, height: int, width: int) -> np.ndarray:
        """The patch on an otherwise zero uint8 canvas of the given size."""
        canvas = np.zeros((height, width), np.uint8)
        self.paste_max(canvas)
        return canvas

    def visible_in(self, height: int, width: int) -> bool:
        """True when some non-zero pixel of the patch lands inside a height x width canvas."""
        overlap = self._overlap(height, width)
        return overlap is not None and bool(self.data[overlap[1]].any())


def empty_patch() -> Patch:
    return Patch(np.zeros((0, 0), np.uint8), 0, 0)


@dataclass(frozen=True, eq=False)
class LineGeometry:
    """Oriented text box of one line, derived from its polygon's minimum-area rectangle.

    ``long``/``short`` are the rectangle's side lengths, ``angle`` the baseline direction of
    horizontal text (0 when ``vertical``), ``direction`` the unit vector of the long side and
    ``box`` the rectangle's four corners.
    """

    cx: float
    cy: float
    long: float
    short: float
    angle: float
    vertical: bool
    direction: tuple[float, float]
    box: np.ndarray


def as_polygon(polygon: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Polygon as a float32 (N, 2) array; raises ValueError when it is not a finite N>=3 point list."""
    arr = np.asarray(polygon, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
        raise ValueError(f"polygon must be at least 3 [x, y] points, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("polygon has non-finite coordinates")
    return arr.astype(np.float32)


def line_geometry(polygon: np.ndarray, vert_ang: float = 10.0) -> LineGeometry:
    """Box, direction and vertical flag of a text line (AnyText2's rule, made version-independent).

    A line is vertical when its rectangle is within ``vert_ang`` degrees of the image axes and its
    axis-aligned extent is at least as tall as wide; a tall box tilted further renders as rotated
    horizontal text.
    """
    poly = as_polygon(polygon)
    (cx, cy), _, _ = rect = cv2.minAreaRect(poly)
    box = cv2.boxPoints(rect).astype(np.float32)
    e1, e2 = box[1] - box[0], box[2] - box[1]
    n1, n2 = float(np.hypot(*e1)), float(np.hypot(*e2))
    edge, long_side, short_side = (e1, n1, n2) if n1 >= n2 else (e2, n2, n1)
    dx, dy = float(edge[0]), float(edge[1])
    if dx < 0 or (dx == 0 and dy > 0):
        dx, dy = -dx, -dy
    norm = math.hypot(dx, dy) or 1.0
    direction = (dx / norm, dy / norm)
    angle = math.degrees(math.atan2(-dy, dx))
    off_axis = min(abs(angle) % 90.0, 90.0 - abs(angle) % 90.0)
    extent_w = float(box[:, 0].max() - box[:, 0].min())
    extent_h = float(box[:, 1].max() - box[:, 1].min())
    vertical = off_axis < vert_ang and extent_h >= extent_w
    return LineGeometry(float(cx), float(cy), long_side, short_side, 0.0 if vertical else angle,
                        vertical, direction, box)


def _text_size(face: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = face.getbbox(text)
    return right - left, bottom - top


def fit_font_size(font: GlyphFont, text: str, max_w: float, max_h: float, upper: int) -> int:
    """Largest size in [1, upper] at which ``text`` fits in max_w x max_h (1 if none does).

    Starts from a linear estimate at a reference size and walks a few sizes, instead of the
    original's ~9-step binary search over freshly created font variants.
    """
    upper = max(1, int(upper))
    w0, h0 = _text_size(font.get(_REF_SIZE), text)
    if w0 <= 0 or h0 <= 0:
        raise ValueError(f"text {text!r} has no visible glyphs")

    def fits(size: int) -> bool:
        w, h = _text_size(font.get(size), text)
        return w <= max_w and h <= max_h

    size = min(upper, max(1, int(_REF_SIZE * min(max_w / w0, max_h / h0))))
    while size > 1 and not fits(size):
        size -= 1
    while size < upper and fits(size + 1):
        size += 1
    return size


def glyph_font_size(font: GlyphFont, text: str, long: float, short: float) -> int:
    """Font size of a ``glyphs`` line in a ``long`` x ``short`` box: AnyText2's rule, the largest size
    up to ``int(short) - 1`` at which the horizontal string fits the box (1 if none does)."""
    return fit_font_size(font, text, long, short, max(1, int(short) - 1))


def _spaced(text: str, count: int) -> str:
    return (" " * count).join(text)


def _letter_spacing(face: ImageFont.FreeTypeFont, text: str, max_w: float, max_h: float) -> int:
    """Spaces between characters that still fit, AnyText2 style: 0 if even 99 fit or none fit."""
    if len(text) < 2:
        return 0

    def fits(count: int) -> bool:
        w, h = _text_size(face, _spaced(text, count))
        return w <= max_w and h <= max_h

    if not fits(1):
        return 0
    if fits(99):
        return 0
    w0, _ = _text_size(face, text)
    w1, _ = _text_size(face, _spaced(text, 1))
    step = max(w1 - w0, 1)
    count = min(98, max(1, int((max_w - w0) // step)))
    while count > 1 and not fits(count):
        count -= 1
    while count < 98 and fits(count + 1):
        count += 1
    return count


def render_glyphs(font: GlyphFont, text: str, polygon: np.ndarray, *, scale: float = 1.0,
                  vert_ang: float = 10.0, add_space: bool = True) -> Patch:
    """Coverage mask (0-255) of ``text`` laid out in ``polygon``'s box, as AnyText2's ``glyphs``.

    ``polygon`` is in the target image's pixel frame; the patch is in the glyph canvas frame, which is
    ``scale`` times larger (``glyph_scale``). The font size is the largest at which the horizontal
    string fits the box; vertical lines stack characters top-down and spread the free height between
    them; horizontal lines get AnyText2's inter-letter spaces. Use :func:`colorize` to make the
    (3, H, W) glyph image. Raises ValueError for a degenerate box or invisible text.
    """
    geom = line_geometry(as_polygon(polygon) * np.float32(scale), vert_ang)
    if geom.short < 1.0:
        raise ValueError(f"polygon box too small to hold text: {geom.long:.1f} x {geom.short:.1f} px")
    size = glyph_font_size(font, text, geom.long, geom.short)
    face = font.get(size)
    if geom.vertical:
        return _render_vertical(face, text, geom, add_space)
    if add_space:
        text = _spaced(text, _letter_spacing(face, text, geom.long, geom.short))
    left, top, right, bottom = face.getbbox(text)
    layer = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(layer).text((1 - left, 1 - top), text, font=face, fill=255)
    if geom.angle != 0.0:
        layer = layer.rotate(geom.angle, resample=Image.Resampling.NEAREST, expand=True)
    x0 = int(round(geom.cx - layer.width / 2.0))
    y0 = int(round(geom.cy - layer.height / 2.0))
    return Patch(np.asarray(layer, dtype=np.uint8), x0, y0)


def _render_vertical(face: ImageFont.FreeTypeFont, text: str, geom: LineGeometry, add_space: bool) -> Patch:
    boxes = [face.getbbox(ch) for ch in text]
    heights = [b[3] - b[1] for b in boxes]
    x_min, y_min = float(geom.box[:, 0].min()), float(geom.box[:, 1].min())
    col_w = float(geom.box[:, 0].max()) - x_min
    col_h = float(geom.box[:, 1].max()) - y_min
    extra = 0
    total = sum(heights)
    if add_space and len(text) > 1 and total < col_h:
        extra = int((col_h - total) // (len(text) - 1))
    height = max(math.ceil(col_h), total + extra * (len(text) - 1)) + 2
    layer = Image.new("L", (math.ceil(col_w) + 2, height), 0)
    draw = ImageDraw.Draw(layer)
    y = 1.0
    for ch, (left, top, right, _), h in zip(text, boxes, heights):
        x = 1.0 + col_w / 2.0 - (left + right) / 2.0
        draw.text((round(x), round(y - top)), ch, font=face, fill=255)
        y += h + extra
    return Patch(np.asarray(layer, dtype=np.uint8), int(math.floor(x_min)) - 1, int(math.floor(y_min)) - 1)


def glyph_color(color: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Fill colour of a glyph as float32 RGB in [10/255, 1]: AnyText2 draws the 500 sentinel (and
    unknown colours) white and keeps black text non-zero so the glyph map marks it."""
    if color is None:
        return np.ones(3, np.float32)
    rgb = np.asarray(color, dtype=np.float32).reshape(3)
    if rgb.mean() < 0:
        rgb = np.full(3, 255.0, np.float32)
    return np.clip(rgb, 10.0, 255.0) / 255.0


def colorize(patch: Patch, color: Sequence[float] | np.ndarray | None, height: int, width: int) -> np.ndarray:
    """Glyph image (3, height, width) float32 in [0, 1]: the patch's text in ``color`` on black."""
    out = np.zeros((3, height, width), np.float32)
    overlap = patch._overlap(height, width)
    if overlap is not None:
        dst, src = overlap
        alpha = patch.data[src].astype(np.float32) * (1.0 / 255.0)
        rgb = glyph_color(color)
        for c in range(3):
            np.multiply(alpha, rgb[c], out=out[c][dst])
    return out


def render_gly_line(font: GlyphFont, text: str, width: int = GLY_LINE_WIDTH,
                    height: int = GLY_LINE_HEIGHT) -> np.ndarray:
    """The OCR strip (height, width) uint8 in {0, 1}: ``text`` horizontal, binary (no anti-aliasing),
    scaled so it fills 90 % of the strip in its tighter dimension, centred. Blank text gives zeros."""
    strip = Image.new("1", (width, height), 0)
    if text.strip():
        w0, h0 = _text_size(font.get(50), text)
        ratio = min(width * 0.9 / max(w0, 5), height * 0.9 / max(h0, 5))
        size = max(1, int(50 * ratio))
        face = font.get(size)
        left, top, right, bottom = face.getbbox(text)
        while size > 1 and (right - left > width or bottom - top > height):
            size -= 1
            face = font.get(size)
            left, top, right, bottom = face.getbbox(text)
        x = (width - (right - left)) // 2 - left
        y = (height - (bottom - top)) // 2 - top
        ImageDraw.Draw(strip).text((x, y), text, font=face, fill=1)
    return np.asarray(strip, dtype=np.uint8)


POSITION_MORPH_OPS = ("none", "dilate1", "erode1", "dilate2", "erode2")


def sample_position_morph(u: float, small: bool) -> str:
    """AnyText2's random position-mask morphology for a uniform draw ``u`` (erosion skipped for
    small lines; a small line in [0.8, 0.9) falls through to the 2x dilation, as upstream)."""
    if u < 0.7:
        return "none"
    if u < 0.8:
        return "dilate1"
    if u < 0.9 and not small:
        return "erode1"
    if u < 0.95:
        return "dilate2"
    if not small:
        return "erode2"
    return "none"


def is_small_line(polygon: np.ndarray, resolution: int) -> bool:
    """Upstream's "small" test: a rectangle side under 20 px at 512 (scaled with the resolution)."""
    _, (w, h), _ = cv2.minAreaRect(as_polygon(polygon))
    limit = 20.0 * resolution / 512.0
    return w < limit or h < limit


_KERNEL3 = np.ones((3, 3), np.uint8)


def _int_points(polygon: np.ndarray) -> np.ndarray:
    return np.round(polygon).astype(np.int32).reshape(-1, 1, 2)


def fill_polygon(polygon: np.ndarray, height: int, width: int, margin: int = 0) -> Patch:
    """Filled polygon {0, 1} on a patch covering its bounding box plus ``margin``, clipped to the canvas."""
    pts = _int_points(as_polygon(polygon))
    x0 = max(int(pts[..., 0].min()) - margin, 0)
    y0 = max(int(pts[..., 1].min()) - margin, 0)
    x1 = min(int(pts[..., 0].max()) + margin + 1, width)
    y1 = min(int(pts[..., 1].max()) + margin + 1, height)
    if x1 <= x0 or y1 <= y0:
        return empty_patch()
    crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(crop, [pts - np.array([x0, y0], np.int32)], 1)
    return Patch(crop, x0, y0)


def render_position(polygon: np.ndarray, height: int, width: int, morph: str = "none") -> Patch:
    """Position mask {0, 1} of one line: the filled polygon with an optional 3x3 dilation/erosion."""
    if morph not in POSITION_MORPH_OPS:
        raise ValueError(f"unknown morphology {morph!r}; expected one of {POSITION_MORPH_OPS}")
    patch = fill_polygon(polygon, height, width, margin=3)
    if morph == "none" or patch.data.size == 0:
        return patch
    op = cv2.dilate if morph.startswith("dilate") else cv2.erode
    return Patch(op(patch.data, _KERNEL3, iterations=int(morph[-1])), patch.x, patch.y)


def clip_polygon(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Copy of the polygon with every point clamped into the canvas (used by the font hint)."""
    poly = as_polygon(polygon).copy()
    np.clip(poly[:, 0], 0, width - 1, out=poly[:, 0])
    np.clip(poly[:, 1], 0, height - 1, out=poly[:, 1])
    return poly


@dataclass(frozen=True)
class HintAugment:
    """Geometric jitter of the font-hint crop (upstream ``font_hint_randaug``): rotation in degrees,
    translation in pixels and scale, all applied with replicated borders and the crop size kept."""

    angle: float
    tx: float
    ty: float
    scale: float

    @staticmethod
    def sample(rng: np.random.Generator) -> "HintAugment":
        return HintAugment(float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10)),
                           float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1)))

    def apply(self, crop: np.ndarray) -> np.ndarray:
        h, w = crop.shape[:2]
        border = cv2.BORDER_REPLICATE
        rot = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), self.angle, 1.0)
        out = cv2.warpAffine(crop, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)
        shift = np.float32([[1, 0, self.tx], [0, 1, self.ty]])
        out = cv2.warpAffine(out, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)
        sw, sh = max(1, int(w * self.scale)), max(1, int(h * self.scale))
        out = cv2.resize(out, (sw, sh), interpolation=cv2.INTER_LINEAR)
        if self.scale >= 1:
            top, left = (sh - h) // 2, (sw - w) // 2
            return out[top:top + h, left:left + w]
        top, left = (h - sh) // 2, (w - sw) // 2
        return cv2.copyMakeBorder(out, top, h - sh - top, left, w - sw - left, border)


def font_hint_base(image: np.ndarray, polygon: np.ndarray, augment: HintAugment | None = None) -> Patch:
    """Dark strokes {0, 1} of the image inside the line's polygon (AnyText2's font hint before occlusion).

    ``image`` is the (H, W, 3) uint8 RGB target. The polygon is clamped into the image, its bounding
    box cropped (optionally jittered by ``augment``), then Gaussian adaptive threshold (block 11,
    C = 2) marks dark strokes; light text on a dark background comes out as an outline, as upstream.
    """
    height, width = image.shape[:2]
    poly = clip_polygon(polygon, height, width)
    mask = fill_polygon(poly, height, width)
    if mask.data.size == 0:
        return mask
    h, w = mask.data.shape
    crop = image[mask.y:mask.y + h, mask.x:mask.x + w]
    if augment is not None:
        crop = augment.apply(crop)
    gray = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    thr = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2)
    return Patch(((thr == 0) & (mask.data > 0)).astype(np.uint8), mask.x, mask.y)


def occlude_font_hint(base: Patch, polygon: np.ndarray, height: int, width: int,
                      area_ratio: float, offset: float) -> Patch:
    """Zero a band across the line so only ``area_ratio`` of its length keeps its hint.

    The band spans the whole short side; it is ``(1 - area_ratio)`` of the long side long and starts
    ``offset`` (in [0, 1]) of the way along the remaining length, as upstream's random occlusion.
    """
    if base.data.size == 0:
        return base
    geom = line_geometry(clip_polygon(polygon, height, width))
    band = geom.long * (1.0 - area_ratio)
    if band < 0.5:
        return base
    along = np.array(geom.direction, np.float64)
    across = np.array([-along[1], along[0]]) * (geom.short / 2.0)
    start = np.array([geom.cx, geom.cy]) - along * (geom.long / 2.0 - offset * (geom.long - band))
    mid = start + along * (band / 2.0)
    half = along * (band / 2.0)
    corners = np.array([mid - half - across, mid + half - across, mid + half + across, mid - half + across])
    data = base.data.copy()
    cv2.fillPoly(data, [_int_points(corners - np.array([base.x, base.y]))], 0)
    return Patch(data, base.x, base.y)
