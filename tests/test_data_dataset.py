"""Dataset and collate contract: every field the teacher consumes, with upstream (T3) semantics."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from student_model_v2.data.anytext_record import TEXT_CAPTION_PHRASES, text_caption
from student_model_v2.data.dataset import AnyTextDataset, MockAnyTextDataset, collate_fn, make_splits

REPO = Path(__file__).resolve().parent.parent
DEMO_JSON = REPO / "demodataset" / "annotations" / "demo_data.json"
SENTINEL = 500 / 255


def write_dataset(root: Path, items: list[dict], images: dict[str, object], *, name: str = "data.json",
                  data_root: str = "imgs") -> Path:
    """Write an AnyText2 JSON under ``root`` and its images (arrays are saved as PNG, bytes verbatim)."""
    img_dir = root / data_root
    img_dir.mkdir(parents=True, exist_ok=True)
    for fname, img in images.items():
        if isinstance(img, bytes):
            (img_dir / fname).write_bytes(img)
        elif isinstance(img, Image.Image):
            img.save(img_dir / fname)
        else:
            Image.fromarray(np.asarray(img)).save(img_dir / fname)
    path = root / name
    path.write_text(json.dumps({"data_root": data_root, "data_list": items}, ensure_ascii=False), encoding="utf-8")
    return path


def box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def plain(size=256, value=200):
    return np.full((size, size, 3), value, np.uint8)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("index")


@pytest.fixture(scope="module")
def demo(index_dir):
    return AnyTextDataset(DEMO_JSON, seed=11, cache_dir=index_dir)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(REPO / "models_yaml" / "clip_tokenizer"))


def _binary(t: torch.Tensor) -> bool:
    a = t.numpy()
    return bool(((a == 0) | (a == 1)).all())


def test_field_contract_on_demo_dataset(demo):
    L, R = 5, 512
    for i in range(8):
        s = demo[i]
        n = s["n_lines"]
        assert 1 <= n <= L
        assert s["img"].shape == (3, R, R) and s["img"].dtype == torch.float32
        img = s["img"].numpy()
        assert -1.0 <= img.min() and img.max() <= 1.0
        assert s["masked_img"].shape == (3, R, R) and s["masked_img"].dtype == torch.float32
        for k in ("hint", "font_hint", "inv_mask"):
            assert s[k].shape == (1, R, R) and s[k].dtype == torch.float32 and _binary(s[k]), k
        for k, shape in (("glyphs", (3, R, R)), ("gly_line", (1, 80, 512)), ("positions", (1, R, R)), ("color", (3,))):
            assert len(s[k]) == L and all(t.shape == shape and t.dtype == torch.float32 for t in s[k]), k
        assert all(_binary(t) for t in s["gly_line"]) and all(_binary(t) for t in s["positions"])
        positions = np.stack([p.numpy() for p in s["positions"]])
        assert np.array_equal(s["hint"].numpy(), positions.max(0))
        union = cv2.dilate(s["hint"].numpy()[0], np.ones((9, 9), np.uint8))
        for j in range(n):
            g = s["glyphs"][j].numpy()
            assert 0.0 <= g.min() and g.max() <= 1.0
            ink = g.max(0) > 0
            assert ink.any() or s["texts"][j] == " ", f"sample {i} line {j} rendered blank"
            assert not (ink & (union == 0)).any(), "glyphs are text on a black background, inside the positions"
            assert s["gly_line"][j].numpy().any() or s["texts"][j] == " "
            c = s["color"][j]
            assert torch.allclose(c, torch.full((3,), SENTINEL)) or bool((c <= 1.0).all())
        for j in range(n, L):
            assert not s["glyphs"][j].numpy().any() and not s["gly_line"][j].numpy().any()
            assert not positions[j].any()
            assert torch.allclose(s["color"][j], torch.full((3,), SENTINEL))
            assert s["texts"][j] == " " and s["language"][j] == " "
        assert all(len(t) <= 20 for t in s["texts"])
        assert s["text_caption"].count("*") == n
        assert "*" not in s["img_caption"]
        assert isinstance(s["data_issues"], dict)


def test_text_caption_placeholder_is_clip_token_265(tokenizer, demo):
    assert tokenizer("*")["input_ids"][1:-1] == [265]
    assert 41895 in tokenizer("*,")["input_ids"], "'*,' is a different token: the template must space it"
    for phrase in TEXT_CAPTION_PHRASES:
        for n in range(1, 6):
            ids = tokenizer(text_caption(n, phrase))["input_ids"]
            assert ids.count(265) == n and 41895 not in ids, (phrase, n)
    for i in range(6):
        s = demo[i]
        assert tokenizer(s["text_caption"])["input_ids"].count(265) == s["n_lines"]


def test_edit_mode_formula_and_generation_mode(index_dir):
    edit = AnyTextDataset(DEMO_JSON, seed=3, cache_dir=index_dir, mask_img_prob=1.0)
    gen = AnyTextDataset(DEMO_JSON, seed=3, cache_dir=index_dir, mask_img_prob=0.0)
    for i in (0, 5):
        s = {k: v.numpy() for k, v in edit[i].items() if isinstance(v, torch.Tensor)}
        expected = np.clip(s["img"] - s["hint"] * 10, -1, 1)
        assert np.array_equal(s["masked_img"], expected)
        assert s["hint"].any() and (s["masked_img"][:, s["hint"][0] > 0] == -1).all()
        outside = s["hint"][0] == 0
        assert np.array_equal(s["masked_img"][:, outside], s["img"][:, outside])
        assert not s["inv_mask"].any(), "edit mode clears inv_mask"
        assert (gen[i]["masked_img"].numpy() == -1).all()


def test_repeated_access_is_identical_and_records_are_not_mutated(index_dir, demo):
    original = json.loads(DEMO_JSON.read_text(encoding="utf-8"))["data_list"]
    for i in (0, 3):
        first, second, third = demo[i], demo[i], demo[i]
        for k, v in first.items():
            for other in (second, third):
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, other[k]), k
                elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                    assert all(torch.equal(a, b) for a, b in zip(v, other[k])), k
                else:
                    assert v == other[k], k
        assert demo.indexes[0][i] == original[i]
    unseeded = AnyTextDataset(DEMO_JSON, cache_dir=index_dir)
    captions = {unseeded[1]["img_caption"] for _ in range(3)}
    assert len(captions) == 1, "captions must not grow between accesses"


def test_non_square_image_scales_polygons(tmp_path, index_dir):
    img = np.full((480, 640, 3), 230, np.uint8)
    cv2.rectangle(img, (320, 240), (480, 300), (20, 20, 20), -1)
    path = write_dataset(tmp_path, [{"img_name": "wide.png", "annotations": [
        {"polygon": box(320, 240, 480, 300), "text": "Wide", "language": "Latin"}]}], {"wide.png": img})
    ds = AnyTextDataset(path, resolution=256, seed=0, cache_dir=index_dir, mask_img_prob=0.0)
    s = ds[0]
    ys, xs = np.nonzero(s["positions"][0][0].numpy())
    assert abs(xs.min() - 128) <= 3 and abs(xs.max() - 192) <= 3, "x scaled by 256/640"
    assert abs(ys.min() - 128) <= 3 and abs(ys.max() - 160) <= 3, "y scaled by 256/480"
    ink_y, ink_x = np.nonzero(s["glyphs"][0].amax(0).numpy())
    assert 124 <= ink_x.min() and ink_x.max() <= 196 and 124 <= ink_y.min() and ink_y.max() <= 164


def test_multiple_json_files_comma_and_list_file(tmp_path, index_dir):
    item = {"annotations": [{"polygon": box(20, 20, 200, 60), "text": "Hello", "language": "Latin"}]}
    a = write_dataset(tmp_path / "a", [dict(item, img_name="1.png"), dict(item, img_name="2.png")],
                      {"1.png": plain(), "2.png": plain()})
    b = write_dataset(tmp_path / "b", [dict(item, img_name="3.png")], {"3.png": plain()})
    listing = tmp_path / "train.list"
    listing.write_text(f"# two shards\n{a}\n{b}  # second\n", encoding="utf-8")
    for spec in (f"{a},{b}", [a, b], str(listing)):
        ds = AnyTextDataset(spec, resolution=256, seed=0, cache_dir=index_dir)
        assert len(ds) == 3
        assert [ds[i]["sample_id"] for i in range(3)] == ["data.json:1.png", "data.json:2.png", "data.json:3.png"]


def test_line_dropping_invalid_lines_and_inv_mask(tmp_path, index_dir):
    anns = [{"polygon": box(10, 10 + 30 * k, 120, 35 + 30 * k), "text": f"Line{k}", "language": "Latin"}
            for k in range(7)]
    anns.append({"polygon": box(150, 10, 250, 40), "text": "bad", "language": "Latin", "valid": False})
    path = write_dataset(tmp_path, [{"img_name": "x.png", "annotations": anns}], {"x.png": plain()})
    gen = AnyTextDataset(path, resolution=256, seed=4, cache_dir=index_dir, mask_img_prob=0.0)
    s = gen[0]
    assert s["n_lines"] == 5 and "bad" not in s["texts"]
    assert len(set(s["texts"])) == 5
    inv = s["inv_mask"][0].numpy()
    assert inv[20, 200] == 1, "invalid line masked out of the loss"
    dropped = [k for k in range(7) if f"Line{k}" not in s["texts"]]
    assert len(dropped) == 2
    for k in dropped:
        assert inv[22 + 30 * k, 60] == 1, "unselected lines are masked out of the loss"
    kept = [int(t[4:]) for t in s["texts"][:5]]
    assert all(inv[22 + 30 * k, 60] == 0 for k in kept)
    order = [AnyTextDataset(path, resolution=256, seed=sd, cache_dir=index_dir)[0]["texts"] for sd in range(6)]
    assert len({tuple(o) for o in order}) > 1, "selection is random"
    edit = AnyTextDataset(path, resolution=256, seed=4, cache_dir=index_dir, mask_img_prob=1.0)[0]
    assert not edit["inv_mask"].any()


def test_colour_language_and_fake_line(tmp_path, index_dir):
    anns = [
        {"polygon": box(10, 10, 120, 40), "text": "Red", "language": "Latin", "color": [255, 0, 0]},
        {"polygon": box(10, 50, 120, 80), "text": "None", "language": "Latin"},
        {"polygon": box(10, 90, 120, 120), "text": "Sentinel", "language": "Latin", "color": [500, 500, 500]},
        {"polygon": box(10, 130, 120, 160), "text": "歡迎光臨", "language": "Chinese", "color": [0, 0, 0]},
        {"polygon": box(10, 170, 120, 200), "text": "欢迎光临", "language": "Chinese"},
    ]
    path = write_dataset(tmp_path, [{"img_name": "c.png", "annotations": anns}, {"img_name": "empty.png"}],
                         {"c.png": plain(), "empty.png": plain()})
    ds = AnyTextDataset(path, resolution=256, seed=0, cache_dir=index_dir)
    s = ds[0]
    by_text = dict(zip(s["texts"], zip(s["color"], s["language"])))
    assert torch.allclose(by_text["Red"][0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(by_text["None"][0], torch.full((3,), SENTINEL))
    assert torch.allclose(by_text["Sentinel"][0], torch.full((3,), SENTINEL))
    assert torch.allclose(by_text["歡迎光臨"][0], torch.zeros(3))
    assert by_text["歡迎光臨"][1] == "Chinese_tra" and by_text["欢迎光临"][1] == "Chinese_sim"
    assert by_text["Red"][1] == "Latin"
    j = s["texts"].index("歡迎光臨")
    assert s["glyphs"][j].max() == pytest.approx(10 / 255), "black text renders at the >= 10 clamp"
    fake = ds[1]
    assert fake["n_lines"] == 1 and fake["texts"][0] == " " and not fake["glyphs"][0].any()
    ys, xs = np.nonzero(fake["positions"][0][0].numpy())
    assert 3 <= xs.min() <= 8 and 48 <= xs.max() <= 53, "upstream's 10..100 box scaled to 256"
    assert fake["data_issues"] == {"fix.fake_line": 1}


def test_watermark_filter_and_caption_tag(tmp_path, index_dir):
    items = [{"img_name": f"{k}.png", "caption": "a sign *", "wm_score": score}
             for k, score in enumerate((0.2, 0.9, 1.0))]
    path = write_dataset(tmp_path, items, {f"{k}.png": plain() for k in range(3)})
    assert len(AnyTextDataset(path, resolution=256, cache_dir=index_dir)) == 3
    ds = AnyTextDataset(path, resolution=256, cache_dir=index_dir, wm_thresh=0.5, seed=0)
    assert len(ds) == 1
    assert ds[0]["img_caption"] == "a sign   no watermarks . "
    tagged = AnyTextDataset(path, resolution=256, cache_dir=index_dir, seed=0)[1]["img_caption"]
    assert "with watermarks" in tagged


def test_dataloader_workers_collate_and_issue_counts(tmp_path, index_dir):
    item = {"annotations": [{"polygon": box(20, 20, 200, 60), "text": "Hello", "language": "Latin"}]}
    items = [dict(item, img_name=f"{k}.png") for k in range(6)]
    path = write_dataset(tmp_path, items, {f"{k}.png": plain() for k in range(6) if k != 2})
    ds = AnyTextDataset(path, resolution=128, seed=0, cache_dir=index_dir)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_fn)
    totals: dict[str, int] = {}
    for batch in loader:
        assert batch["img"].shape == (3, 3, 128, 128)
        assert len(batch["glyphs"]) == 5 and batch["glyphs"][0].shape == (3, 3, 128, 128)
        assert batch["gly_line"][0].shape == (3, 1, 80, 512)
        assert batch["positions"][0].shape == (3, 1, 128, 128)
        assert batch["color"][0].shape == (3, 3)
        assert len(batch["texts"]) == 5 and len(batch["texts"][0]) == 3
        assert batch["n_lines"].dtype == torch.int64 and batch["n_lines"].tolist() == [1, 1, 1]
        assert len(batch["img_caption"]) == 3 and len(batch["text_caption"]) == 3
        for k, v in batch["data_issues"].items():
            totals[k] = totals.get(k, 0) + v
    assert totals == {"sample.missing_image": 1}


def test_mock_dataset_has_the_same_contract():
    ds = MockAnyTextDataset(size=3, resolution=256, seed=0)
    real_keys = {"img", "masked_img", "hint", "font_hint", "inv_mask", "glyphs", "gly_line", "positions", "color",
                 "texts", "language", "fonts", "n_lines", "img_caption", "text_caption", "sample_id", "data_issues"}
    for i in range(3):
        s = ds[i]
        assert set(s) == real_keys
        assert s["img"].shape == (3, 256, 256) and len(s["glyphs"]) == 5
        n = s["n_lines"]
        assert all(s["glyphs"][j].any() and s["gly_line"][j].any() for j in range(n))
        assert s["text_caption"].count("*") == n
    batch = collate_fn([ds[0], ds[1]])
    assert batch["glyphs"][0].shape == (2, 3, 256, 256)
    with pytest.raises(TypeError, match="glyph_scaling"):
        MockAnyTextDataset(size=1, glyph_scaling=2)
    with pytest.raises(TypeError, match="lmdb_path"):
        MockAnyTextDataset(size=1, lmdb_path="cache")


def test_glyph_scale_two_doubles_glyph_canvas(index_dir):
    ds = AnyTextDataset(DEMO_JSON, glyph_scale=2, seed=0, cache_dir=index_dir)
    s = ds[0]
    assert all(g.shape == (3, 1024, 1024) for g in s["glyphs"])
    assert s["positions"][0].shape == (1, 512, 512)


def test_deterministic_splits(demo):
    a, b = make_splits(demo, seed=5), make_splits(demo, seed=5)
    assert [len(a[k]) for k in ("train", "val", "test")] == [44, 2, 2]
    assert all(a[k].indices == b[k].indices for k in a)
    together = sorted(a["train"].indices + a["val"].indices + a["test"].indices)
    assert together == list(range(len(demo)))
    assert make_splits(demo, seed=6)["val"].indices != a["val"].indices or \
        make_splits(demo, seed=6)["test"].indices != a["test"].indices
