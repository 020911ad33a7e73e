"""Font folders (``font_dir``: a covering font per line, upstream's rand_font) and the text layout engine
(RAQM when Pillow has libraqm, BASIC otherwise with complex-script lines refused, never drawn garbled).

The folder holds two fonts of different coverage: the bundled Noto CJK subset (CJK, kana, Hangul, Latin-1;
no Armenian, Hebrew, Arabic) and the system's DejaVu Sans (Latin, Armenian, Hebrew, Arabic; no CJK).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont, features

from student_model_v2.data import glyph_render
from student_model_v2.data.anytext_record import RenderOptions
from student_model_v2.data.dataset import AnyTextDataset
from student_model_v2.data.glyph_render import (
    DEFAULT_FONT_PATH,
    FontError,
    FontSet,
    GlyphFont,
    detect_layout,
    needs_shaping,
    render_gly_line,
)
from student_model_v2.data.lmdb_build import build_cache
from student_model_v2.data.lmdb_glyph_cache import CacheError
from student_model_v2.inference.inputs import InferenceInputError
from student_model_v2.inference.pipeline import TextRequest, build_conditioning
from tests.test_data_dataset import box, write_dataset

R = 256
NOTO = Path(DEFAULT_FONT_PATH).resolve().name
HAS_RAQM = features.check("raqm")


def _dejavu() -> Path:
    candidate = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if not candidate.is_file() and shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True).stdout
        candidate = Path(found.strip())
    if candidate.name != "DejaVuSans.ttf" or not candidate.is_file():
        pytest.fail("these tests need the system font DejaVu Sans (Debian/Ubuntu: fonts-dejavu-core)")
    return candidate


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fonts")
    shutil.copy(DEFAULT_FONT_PATH, folder / NOTO)
    shutil.copy(_dejavu(), folder / "DejaVuSans.ttf")
    (folder / "README.txt").write_text("not a font: ignored")
    return folder


def _corpus(root: Path) -> Path:
    """Lines only Noto covers, only DejaVu covers, both cover, and none covers (CJK + Armenian)."""
    items = [
        {"img_name": "a.png", "annotations": [
            {"polygon": box(10, 10, 150, 50), "text": "欢迎光临", "language": "Chinese"},
            {"polygon": box(10, 60, 150, 100), "text": "Բարեւ", "language": "Latin"},
            {"polygon": box(10, 110, 150, 150), "text": "欢迎Բարեւ", "language": "Latin"},
            {"polygon": box(10, 160, 150, 200), "text": "Hello", "language": "Latin"},
        ]},
        *({"img_name": f"w{i}.png", "annotations": [
            {"polygon": box(20, 20, 200, 70), "text": f"Word {i}", "language": "Latin"}]} for i in range(12)),
    ]
    images = {item["img_name"]: np.full((R, R, 3), 220, np.uint8) for item in items}
    return write_dataset(root, items, images)


def _fonts_by_text(sample: dict) -> dict[str, str]:
    return {t: f for t, f in zip(sample["texts"][:sample["n_lines"]], sample["fonts"][:sample["n_lines"]])}


def test_font_set_chooses_a_covering_font_reproducibly(font_dir):
    fonts = FontSet.load(font_dir=font_dir)
    assert [f.path.name for f in fonts.fonts] == ["DejaVuSans.ttf", NOTO], "README.txt is not a font"
    assert {m["name"] for m in fonts.manifest()} == {"DejaVuSans.ttf", NOTO}
    assert all(len(m["sha1"]) == 40 for m in fonts.manifest())
    for key in ("a", "b", "c"):
        assert fonts.choose("欢迎光临", key).path.name == NOTO
        assert fonts.choose("Բարեւ", key).path.name == "DejaVuSans.ttf"
        assert fonts.choose("欢迎Բարեւ", key) is None
    latin = [fonts.choose("Hello", f"record:{k}").path.name for k in range(64)]
    assert latin == [fonts.choose("Hello", f"record:{k}").path.name for k in range(64)], "same key, same font"
    assert 10 < latin.count(NOTO) < 54, "a line both fonts cover gets either, at random"
    single = FontSet.load(DEFAULT_FONT_PATH)
    assert len(single) == 1 and single.sha1 == GlyphFont(DEFAULT_FONT_PATH).sha1
    assert fonts.sha1 != single.sha1


def test_font_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(FontError, match="no font files"):
        FontSet.load(font_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FontSet.load(font_dir=tmp_path / "nowhere")
    (tmp_path / "broken.ttf").write_bytes(b"")
    with pytest.raises(FontError, match="broken.ttf"):
        FontSet.load(font_dir=tmp_path)


def test_dataset_font_dir_draws_each_line_in_a_covering_font(tmp_path, font_dir):
    path = _corpus(tmp_path)
    kw = dict(resolution=R, cache_dir=tmp_path / "index", mask_img_prob=0.0)
    ds = AnyTextDataset(path, font_dir=font_dir, seed=1, **kw)
    first = ds[0]
    assert first["data_issues"].get("line.missing_glyphs") == 1, "the CJK + Armenian line: no font has both"
    chosen = _fonts_by_text(first)
    assert chosen["欢迎光临"] == NOTO and chosen["Բարեւ"] == "DejaVuSans.ttf" and chosen["Hello"] in (NOTO, "DejaVuSans.ttf")
    assert "欢迎Բարեւ" not in chosen and first["inv_mask"].numpy()[0, 130, 80] == 1, "uncovered line masked"
    j = first["texts"].index("Բարեւ")
    dejavu = GlyphFont(font_dir / "DejaVuSans.ttf")
    assert np.array_equal(first["gly_line"][j].numpy()[0], render_gly_line(dejavu, "Բարեւ").astype(np.float32))
    assert first["glyphs"][j].numpy().any()

    again = AnyTextDataset(path, font_dir=font_dir, seed=7, **kw)
    again.set_epoch(3)
    assert [_fonts_by_text(ds[i]) for i in range(len(ds))] == [_fonts_by_text(again[i]) for i in range(len(ds))], \
        "the font of a line depends on the line, not on the seed, epoch or dataset instance"
    words = Counter(again[i]["fonts"][0] for i in range(1, len(ds)))
    assert set(words) == {NOTO, "DejaVuSans.ttf"}, words

    one_font = AnyTextDataset(path, seed=1, **kw)[0]
    assert one_font["data_issues"].get("line.missing_glyphs") == 2, "without font_dir: the bundled font only"
    assert set(one_font["fonts"][:one_font["n_lines"]]) == {NOTO}


def test_lmdb_meta_records_the_font_set_and_matches_online(tmp_path, font_dir):
    path = _corpus(tmp_path)
    meta = build_cache([str(path)], str(tmp_path / "cache"), opts=RenderOptions(resolution=R),
                       font_path=str(DEFAULT_FONT_PATH), font_dir=str(font_dir), num_workers=0,
                       cache_dir=str(tmp_path / "index"), progress=False)
    fonts = FontSet.load(font_dir=font_dir)
    assert meta["fonts"] == fonts.manifest() and meta["render"]["font_sha1"] == fonts.sha1
    assert meta["render"]["font_layout"] == detect_layout() and meta["issues"]["line.missing_glyphs"] == 1
    kw = dict(resolution=R, cache_dir=tmp_path / "index", seed=3, font_hint_randaug=False, mask_img_prob=0.0)
    online = AnyTextDataset(path, font_dir=font_dir, **kw)
    cached = AnyTextDataset(path, font_dir=font_dir, lmdb_path=tmp_path / "cache", **kw)
    for i in range(len(online)):
        a, b = online[i], cached[i]
        assert a["fonts"] == b["fonts"] and not any(k.startswith("cache.") and k != "cache.hit" for k in b["data_issues"])
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a["glyphs"], b["glyphs"]))
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a["gly_line"], b["gly_line"]))
    with pytest.raises(CacheError, match="font"):
        AnyTextDataset(path, lmdb_path=tmp_path / "cache", **kw)


def test_needs_shaping_by_script():
    for text in ("سلام", "שלום", "नमस्ते", "নমস্কার", "สวัสดี", "မင်္ဂလာပါ", "Price ﷼"):
        assert needs_shaping(text), text
    for text in ("Hello", "欢迎光临", "한국어", "ひらがな", "Բարեւ", "Привет", "Ελλάδα", "5 € + 3"):
        assert not needs_shaping(text), text


def test_layout_is_detected_once_and_reported_once(caplog):
    detect_layout.cache_clear()
    with caplog.at_level(logging.INFO, logger="student_model_v2.data.glyph_render"):
        layouts = {detect_layout() for _ in range(3)}
        GlyphFont(DEFAULT_FONT_PATH)
    assert layouts == {"raqm" if HAS_RAQM else "basic"}
    assert sum("glyph layout:" in r.getMessage() for r in caplog.records) == 1
    assert GlyphFont(DEFAULT_FONT_PATH).layout == detect_layout()


def _ink_crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _reference(font_path: Path, text: str, layout: ImageFont.Layout) -> np.ndarray:
    """Pillow's own rendering of ``text`` at size 60 with the given engine, cropped to its ink."""
    face = ImageFont.truetype(str(font_path), 60, layout_engine=layout)
    left, top, right, bottom = face.getbbox(text)
    img = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(img).text((2 - left, 2 - top), text, font=face, fill=255)
    return _ink_crop(np.asarray(img) > 127)


def _iou_after_fit(ours: np.ndarray, ref: np.ndarray) -> float:
    ref = cv2.resize(ref.astype(np.uint8), (ours.shape[1], ours.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return float((ours & ref).sum() / (ours | ref).sum())


@pytest.mark.parametrize("text", ["سلام عليكم", "שלום עולם"])
def test_complex_script_is_shaped_with_raqm_or_refused(text):
    dejavu = _dejavu()
    if not HAS_RAQM:  # a Pillow without libraqm: RAQM cannot be asked for; the BASIC branch is tested below
        with pytest.raises(FontError, match="libraqm"):
            GlyphFont(dejavu, layout="raqm")
        return
    shaped = _ink_crop(render_gly_line(GlyphFont(dejavu, layout="raqm"), text) > 0)
    unshaped = _ink_crop(render_gly_line(GlyphFont(dejavu, layout="basic"), text) > 0)
    raqm_ref, basic_ref = (_reference(dejavu, text, engine) for engine in (ImageFont.Layout.RAQM, ImageFont.Layout.BASIC))
    assert _iou_after_fit(shaped, raqm_ref) > 0.6, "matches Pillow's shaped (RAQM) rendering"
    assert _iou_after_fit(shaped, basic_ref) < 0.35, "not the unshaped, left-to-right rendering"
    assert _iou_after_fit(unshaped, basic_ref) > 0.6 > _iou_after_fit(unshaped, raqm_ref)
    if text.startswith("س"):
        parts = cv2.connectedComponents(shaped.astype(np.uint8))[0]
        assert parts < cv2.connectedComponents(unshaped.astype(np.uint8))[0], "joined letters"


def _arabic_corpus(root: Path) -> Path:
    items = [{"img_name": "ar.png", "annotations": [
        {"polygon": box(10, 10, 200, 60), "text": "سلام", "language": "Arabic"},
        {"polygon": box(10, 100, 200, 150), "text": "Բարեւ", "language": "Latin"},
    ]}]
    return write_dataset(root, items, {"ar.png": np.full((R, R, 3), 220, np.uint8)})


def test_basic_layout_refuses_complex_script_lines_with_a_count(tmp_path, font_dir, monkeypatch):
    path = _arabic_corpus(tmp_path)
    kw = dict(resolution=R, cache_dir=tmp_path / "index", mask_img_prob=0.0, seed=0, font_dir=font_dir)
    monkeypatch.setattr(glyph_render, "detect_layout", lambda: "basic")
    basic = AnyTextDataset(path, **kw)[0]
    assert basic["data_issues"].get("line.complex_script") == 1
    assert basic["texts"][:basic["n_lines"]] == ["Բարեւ"], "the Arabic line is skipped, never drawn garbled"
    assert basic["inv_mask"].numpy()[0, 35, 100] == 1, "its area is kept out of the loss"
    glyph = GlyphFont(_dejavu())
    assert glyph.layout == "basic" and not glyph.can_layout("سلام") and glyph.can_layout("Բարեւ")
    request = TextRequest(prompt='a sign that reads "سلام"', width=128, height=128, positions=[[8, 8, 120, 60]])
    with pytest.raises(InferenceInputError, match="complex script needs RAQM"):
        build_conditioning(request, glyph)
    monkeypatch.undo()
    if HAS_RAQM:
        shaped = AnyTextDataset(path, **kw)[0]
        assert "line.complex_script" not in shaped["data_issues"]
        assert _fonts_by_text(shaped) == {"سلام": "DejaVuSans.ttf", "Բարեւ": "DejaVuSans.ttf"}


def test_training_flag_font_dir_reaches_the_dataset(tmp_path, font_dir):
    from student_model_v2.training.args import build_parser
    from student_model_v2.training.data import build_dataset

    path = _corpus(tmp_path)
    common = ["--dataset_json", str(path), "--resolution", str(R), "--cache_dir", str(tmp_path / "index")]
    with_dir = build_dataset(build_parser("t").parse_args(common + ["--font_dir", str(font_dir)]))
    assert [f.path.name for f in with_dir.builder.fonts.fonts] == ["DejaVuSans.ttf", NOTO]
    default = build_dataset(build_parser("t").parse_args(common))
    assert [f.path.name for f in default.builder.fonts.fonts] == [NOTO]


@pytest.mark.parametrize("layout", ["raqm", "basic"])
def test_coverage_is_the_fonts_own_map_under_either_layout(layout):
    """The bundled subset has no combining marks and no Thai; drawn alone with RAQM they come out as empty
    zero-width glyphs, unlike .notdef, and used to count as covered (and then draw nothing)."""
    if layout == "raqm" and not HAS_RAQM:
        pytest.fail("Pillow without libraqm: `make test` installs libfribidi for RAQM")
    font = GlyphFont(DEFAULT_FONT_PATH, layout=layout)
    assert [font.has_char(ch) for ch in ("\u0301", "\u0e31", "\u0e01")] == [False, False, False]
    assert [font.has_char(ch) for ch in ("a", "中", " ")] == [True, True, True]
    dejavu = GlyphFont(_dejavu(), layout=layout)
    assert dejavu.has_char("\u0301") and dejavu.has_char("\u05d0")  # DejaVu has them
