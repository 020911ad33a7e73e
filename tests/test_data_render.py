"""Rendering module: fonts, glyph line, glyphs, positions, font hint, legibility (rapidocr)."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from student_model_v2.data.glyph_render import (
    DEFAULT_FONT_PATH,
    FontError,
    GlyphFont,
    HintAugment,
    colorize,
    fill_polygon,
    font_hint_base,
    glyph_font_size,
    line_geometry,
    occlude_font_hint,
    render_gly_line,
    render_glyphs,
    render_position,
    sample_position_morph,
)
from student_model_v2.data.synthetic import CHINESE_PHRASES, LATIN_WORDS


@pytest.fixture(scope="module")
def font() -> GlyphFont:
    return GlyphFont(DEFAULT_FONT_PATH)


def _rect(cx, cy, w, h, angle_deg):
    """Corners of a w x h box centred at (cx, cy), baseline rotated counter-clockwise on screen."""
    a = np.radians(angle_deg)
    along, across = np.array([np.cos(a), -np.sin(a)]), np.array([np.sin(a), np.cos(a)])
    c = np.array([cx, cy])
    return np.array([c - along * w / 2 - across * h / 2, c + along * w / 2 - across * h / 2,
                     c + along * w / 2 + across * h / 2, c - along * w / 2 + across * h / 2], np.float32)


def _ink_inside(patch, polygon, size=512, grow=3) -> float:
    canvas = patch.to_canvas(size, size) > 0
    region = cv2.dilate(fill_polygon(polygon, size, size).to_canvas(size, size), np.ones((2 * grow + 1,) * 2, np.uint8))
    return float((canvas & (region > 0)).sum() / max(canvas.sum(), 1))


def test_missing_font_path_fails_with_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ttf"):
        GlyphFont(tmp_path / "nope.ttf")
    empty = tmp_path / "empty.ttf"
    empty.write_bytes(b"")
    with pytest.raises(FontError, match="empty"):
        GlyphFont(empty)
    junk = tmp_path / "junk.ttf"
    junk.write_bytes(b"not a font at all" * 10)
    with pytest.raises(FontError, match="junk.ttf"):
        GlyphFont(junk)


def test_relative_font_path_resolves_against_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert GlyphFont("font/NotoSansCJKsc-Regular-subset.otf").path == Path(DEFAULT_FONT_PATH).resolve()


def test_missing_glyph_detection(font):
    assert font.missing_chars("Hello 欢迎光临 한국 あ") == []
    assert font.missing_chars("price € 5 ضض") == ["€", "ض"]
    assert font.has_ink("A") and not font.has_ink("   ")


def test_faces_are_cached_and_hold_no_file_descriptors(font):
    fd_dir = Path("/proc/self/fd")
    before = len(list(fd_dir.iterdir())) if fd_dir.is_dir() else 0
    for k in range(60):
        render_glyphs(font, "字" * (1 + k % 7), _rect(256, 256, 40 + 7 * k, 12 + k, 0))
    assert font.get(33) is font.get(33), "one FreeType face per size, reused"
    if fd_dir.is_dir():
        assert len(list(fd_dir.iterdir())) == before


def test_font_pickles_as_path_and_reopens(font):
    clone = pickle.loads(pickle.dumps(font))
    assert clone.path == font.path and clone._faces == {}
    assert np.array_equal(render_gly_line(clone, "abc"), render_gly_line(font, "abc"))


def test_gly_line_is_binary_fitted_and_centred(font):
    strip = render_gly_line(font, "Hi")
    assert strip.shape == (80, 512) and strip.dtype == np.uint8
    assert set(np.unique(strip)) == {0, 1}
    long = render_gly_line(font, "the quick brown fox jumps")  # 25 chars: width-limited
    cols = np.flatnonzero(long.any(0))
    assert cols[0] > 0 and cols[-1] < 511, "text must not overflow the strip"
    assert cols[-1] - cols[0] > 0.8 * 512, "text is scaled up to fill the width"
    rows = np.flatnonzero(long.any(1))
    assert abs((rows[0] + rows[-1]) / 2 - 40) < 8
    assert not render_gly_line(font, " ").any()


def test_glyphs_black_background_and_colour(font):
    poly = _rect(200, 100, 300, 60, 0)
    patch = render_glyphs(font, "Colour", poly)
    img = colorize(patch, (200, 40, 0), 512, 512)
    assert img.shape == (3, 512, 512) and img.dtype == np.float32
    ink = img.max(0) > 0
    assert 0.01 < ink.mean() < 0.2
    full = patch.data[patch.data == 255].size
    assert full > 0
    full_px = np.argwhere(img[0] >= 200 / 255 - 1e-6)
    assert len(full_px) and np.allclose(img[:, full_px[0][0], full_px[0][1]], [200 / 255, 40 / 255, 10 / 255])
    assert _ink_inside(patch, poly) > 0.98
    white = colorize(patch, (500, 500, 500), 512, 512)
    assert white.max() == pytest.approx(1.0) and np.allclose(white[0], white[1])
    black = colorize(patch, (0, 0, 0), 512, 512)
    assert black.max() == pytest.approx(10 / 255), "black text stays non-zero (upstream clamps to >= 10)"


def test_vertical_line_stacks_characters(font):
    poly = _rect(256, 256, 60, 260, 0)
    geom = line_geometry(poly)
    assert geom.vertical and geom.angle == 0.0
    patch = render_glyphs(font, "欢迎光临", poly)
    canvas = patch.to_canvas(512, 512) > 0
    ys, xs = np.nonzero(canvas)
    assert ys.max() - ys.min() > 3 * (xs.max() - xs.min()), "characters are stacked top-down"
    assert ys.max() - ys.min() > 0.8 * 260, "free height is spread between characters"
    assert _ink_inside(patch, poly) > 0.98


@pytest.mark.parametrize("angle", [30.0, -25.0, 75.0])
def test_rotated_lines_follow_the_polygon(font, angle):
    poly = _rect(256, 256, 300, 50, angle)
    geom = line_geometry(poly)
    assert not geom.vertical, "a box tilted away from the axes renders as rotated horizontal text"
    assert abs(abs(geom.angle) - abs(angle)) < 1.0
    assert line_geometry(poly[::-1]).angle == pytest.approx(geom.angle), "corner order does not matter"
    patch = render_glyphs(font, "Rotate 旋转", poly)
    assert _ink_inside(patch, poly) > 0.97
    ys, xs = np.nonzero(patch.to_canvas(512, 512))
    _, vectors = np.linalg.eigh(np.cov(xs, ys))
    vx, vy = vectors[:, -1]  # principal axis of the ink: the baseline direction (works for steep lines too)
    ink_angle = np.degrees(np.arctan2(-vy, vx))
    assert abs((ink_angle - angle + 90.0) % 180.0 - 90.0) < 5.0


def test_glyph_scale_doubles_the_canvas(font):
    poly = _rect(100, 100, 150, 40, 0)
    one = render_glyphs(font, "AB", poly)
    two = render_glyphs(font, "AB", poly, scale=2)
    assert _ink_inside(two, poly * 2, size=1024) > 0.98
    assert (two.data > 0).sum() > 3 * (one.data > 0).sum()


def _upstream_glyph_size(font, text, long, short):
    """Reference (spec of upstream ``draw_glyph2``): binary search for the largest size whose horizontal
    bounding box fits ``long`` x ``short``, over sizes 1 .. int(short) - 1 (1 when none fits)."""
    lo, hi, best = 1, int(short) - 1, 1
    while lo <= hi:
        mid = (lo + hi) // 2
        left, top, right, bottom = font.get(mid).getbbox(text)
        if right - left <= long and bottom - top <= short:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def test_glyph_font_size_equals_upstream_on_random_boxes(font):
    rng = np.random.default_rng(2024)
    mismatches = []
    for i in range(400):
        short = float(rng.uniform(6.0, 90.0))  # non-integer box heights: where a ceil-based bound is 1 px too large
        long = short * float(rng.uniform(1.0, 10.0))
        pool = LATIN_WORDS if i % 2 else CHINESE_PHRASES
        text = pool[int(rng.integers(len(pool)))]
        got, want = glyph_font_size(font, text, long, short), _upstream_glyph_size(font, text, long, short)
        if got != want:
            mismatches.append((text, round(long, 2), round(short, 2), got, want))
    assert not mismatches, mismatches[:10]


def test_degenerate_box_raises(font):
    with pytest.raises(ValueError):
        render_glyphs(font, "abc", np.array([[0, 0], [100, 0], [100, 0.2], [0, 0.2]], np.float32))


def test_position_morphology_and_table():
    poly = _rect(256, 256, 200, 60, 10)
    base = render_position(poly, 512, 512).to_canvas(512, 512)
    assert set(np.unique(base)) == {0, 1}
    grown = render_position(poly, 512, 512, "dilate2").to_canvas(512, 512)
    shrunk = render_position(poly, 512, 512, "erode1").to_canvas(512, 512)
    assert grown.sum() > base.sum() > shrunk.sum() and (grown >= base).all() and (shrunk <= base).all()
    edge = render_position(_rect(5, 5, 60, 30, 0), 512, 512, "dilate1")  # clipped at the border
    assert edge.to_canvas(512, 512)[0, 0] == 1
    assert [sample_position_morph(u, False) for u in (0.1, 0.75, 0.85, 0.92, 0.97)] == [
        "none", "dilate1", "erode1", "dilate2", "erode2"]
    assert [sample_position_morph(u, True) for u in (0.85, 0.97)] == ["dilate2", "none"]


def test_font_hint_marks_dark_strokes_and_occlusion_cuts_a_band(font):
    image = np.full((512, 512, 3), 235, np.uint8)
    poly = _rect(256, 256, 320, 70, 0)
    text = render_glyphs(font, "Strokes", poly).to_canvas(512, 512)
    image[text > 128] = 20
    base = font_hint_base(image, poly)
    hint = base.to_canvas(512, 512)
    assert set(np.unique(hint)) <= {0, 1}
    assert (hint & (text > 128)).sum() > 0.6 * (text > 128).sum()
    assert (hint & ~cv2.dilate((text > 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)).sum() < 50
    half = occlude_font_hint(base, poly, 512, 512, area_ratio=0.5, offset=0.0).to_canvas(512, 512)
    assert 0.3 * hint.sum() < half.sum() < 0.7 * hint.sum()
    assert not half[:, 256 - 160:256 - 10].any(), "offset 0 puts the band at the start of the line"
    assert np.array_equal(occlude_font_hint(base, poly, 512, 512, 1.0, 0.3).data, base.data)
    jittered = font_hint_base(image, poly, HintAugment(8.0, 5.0, -5.0, 1.05))
    assert jittered.data.shape == base.data.shape and not np.array_equal(jittered.data, base.data)


def _recognizer():
    from student_model_v2.evaluation.line_ocr import load_recognizer
    return load_recognizer(threads=1)


def test_gly_line_is_legible_to_ocr(font):
    """PP-OCRv4 (recognition only) reads back >= 95 % of 100 random Chinese and Latin lines exactly.

    Strips are cropped to their ink box plus 8 px (what a detector hands a recogniser) and shown dark
    on light; PP-OCR hallucinates characters in wide blank margins otherwise.
    """
    rng = np.random.default_rng(1234)
    lines = []
    for i in range(100):
        k = int(rng.integers(1, 4))
        if i % 2:
            lines.append(" ".join(LATIN_WORDS[j] for j in rng.integers(len(LATIN_WORDS), size=k))[:20].strip())
        else:
            lines.append("".join(CHINESE_PHRASES[j] for j in rng.integers(len(CHINESE_PHRASES), size=k))[:20])
    crops = []
    for text in lines:
        strip = render_gly_line(font, text)
        assert set(np.unique(strip)) == {0, 1}
        ys, xs = np.nonzero(strip)
        crop = strip[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9]
        crops.append(np.repeat(np.where(crop > 0, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    results, _ = _recognizer()(crops)
    read = ["".join(r[0].split()) for r in results]
    exact = sum(r == "".join(t.split()) for r, t in zip(read, lines))
    assert exact >= 95, [(t, r) for t, r in zip(lines, read) if r != "".join(t.split())]
