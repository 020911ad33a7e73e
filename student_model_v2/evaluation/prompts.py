"""Benchmark records (AnyText-benchmark / AnyWord JSON) turned into evaluation prompts.

A prompt is what both generation and scoring need: the image caption, and the lines to draw and read
— ground-truth text and polygon, already in the frame of the generated image. The record parsing is
the training pipeline's (``anytext_record.parse_annotations``: polygon checks, frame scaling, text cut
to ``max_chars``, lines the glyph font cannot draw), so a line means the same thing in training and
evaluation. On top of it, a line is skipped (and counted) when the free-form inference request cannot
express it: a ``"`` inside the text, a box too small for the text, text rendered outside the image.
Polygons are clamped into the image, which the inference request requires.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.anytext_record import PLACEHOLDER, find_image, image_roots, parse_annotations
from ..data.glyph_render import GlyphFont, clip_polygon, render_glyphs
from ..data.json_index import JsonIndex

ASSUMED_FRAME = (512, 512)
"""Stored-image size assumed when the image is not available (the AnyText benchmark's images are 512x512)."""


@dataclass(frozen=True, eq=False)
class EvalLine:
    """One scored line: ground-truth text (cut to max_chars), language, polygon in the output frame."""

    text: str
    language: str
    polygon: np.ndarray


@dataclass(frozen=True, eq=False)
class EvalPrompt:
    """One benchmark record: what is generated from it and which lines are scored."""

    index: int
    key: str
    img_name: str
    caption: str
    lines: tuple[EvalLine, ...]
    image_path: Path | None

    def fingerprint(self) -> str:
        """Changes whenever what is generated from this prompt changes (stale images are regenerated)."""
        payload = [self.caption, [[line.text, np.round(line.polygon, 2).tolist()] for line in self.lines]]
        return hashlib.sha1(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def _stored_size(path: Path, issues: Counter) -> tuple[int, int] | None:
    """(width, height) from the image header; None, counted, when the file is not a readable image or its
    header claims more pixels than Pillow's decompression-bomb limit (one such file must not end a run)."""
    try:
        with Image.open(path) as img:
            return img.size
    except Image.DecompressionBombError:
        issues["record.image_too_large"] += 1
    except (UnidentifiedImageError, OSError):
        issues["record.bad_image"] += 1
    return None


def _usable_lines(parsed_lines: Sequence, font: GlyphFont, resolution: int, issues: Counter) -> list[EvalLine]:
    """Lines the free-form pipeline can draw; each skip is counted (see docs/evaluation.md)."""
    lines = []
    for line in parsed_lines:
        if '"' in line.text:
            issues["line.double_quote"] += 1  # the pipeline's prompt syntax cannot express a '"' inside a text
            continue
        polygon = clip_polygon(line.polygon, resolution, resolution)
        try:
            visible = render_glyphs(font, line.text, polygon).visible_in(resolution, resolution)
        except ValueError:
            issues["line.too_small"] += 1
            continue
        if not visible:
            issues["line.glyph_outside"] += 1
            continue
        lines.append(EvalLine(line.text, line.language, polygon))
    return lines


def load_prompts(benchmark_json: str | Path, *, resolution: int, max_lines: int, max_chars: int, font: GlyphFont,
                 limit: int = 0, need_images: bool = False, issues: Counter | None = None) -> list[EvalPrompt]:
    """The first ``limit`` (0: all) records of the JSON that have a usable line, as :class:`EvalPrompt`.

    Polygons are scaled from the stored image's frame to ``resolution`` (docs/data.md "Frame
    contract"); when the image is absent its frame is assumed to be 512x512 (counted as
    ``fix.assumed_512_frame``) unless ``need_images``, which skips the record instead.
    """
    issues = Counter() if issues is None else issues
    index = JsonIndex(benchmark_json)
    roots = image_roots(index.data_root, index.path)
    prompts: list[EvalPrompt] = []
    keys: set[str] = set()
    for i in range(len(index)):
        if limit and len(prompts) >= limit:
            break
        record = index[i]
        name = record.get("img_name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name:
            issues["record.bad_record"] += 1
            continue
        path = find_image(roots, name)
        if path is None and need_images:
            issues["record.missing_image"] += 1
            continue
        size = ASSUMED_FRAME if path is None else _stored_size(path, issues)
        if size is None:
            continue
        parsed = parse_annotations(record.get("annotations"), image_size=size, resolution=resolution,
                                   max_chars=max_chars, font=font, where=f"{index.path.name}:{name}")
        issues.update(parsed.issues)
        lines = _usable_lines(parsed.lines, font, resolution, issues)
        if len(lines) > max_lines:
            issues["line.over_max_lines"] += len(lines) - max_lines
            lines = lines[:max_lines]
        if not lines:
            issues["record.no_usable_line"] += 1
            continue
        if path is None:
            issues["fix.assumed_512_frame"] += 1
        caption = record.get("caption")
        key = Path(name).stem
        if key in keys:
            key = f"{key}__{i}"
        keys.add(key)
        prompts.append(EvalPrompt(i, key, name, caption.replace(PLACEHOLDER, " ") if isinstance(caption, str) else "",
                                  tuple(lines), path))
    return prompts


