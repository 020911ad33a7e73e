"""A corrupted dataset with every kind of bad input: problems are skipped and counted, never blank."""

from __future__ import annotations

import codecs
import io
import json
import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from student_model_v2.data.dataset import AnyTextDataset, collate_fn
from student_model_v2.data.json_index import DatasetFileError
from tests.test_data_dataset import box, write_dataset

from .conftest import png_claiming

R = 128


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _good(name: str, text: str = "Good") -> dict:
    return {"img_name": name, "annotations": [{"polygon": box(10, 10, 110, 40), "text": text, "language": "Latin"}]}


def _corrupted(tmp_path):
    rgb = Image.new("RGB", (R, R), (200, 200, 200))
    transparent = Image.new("RGBA", (R, R), (0, 0, 0, 0))
    deep = Image.fromarray(np.full((R, R), 40000, np.uint16))
    bad_items = [
        ({"img_name": "missing.png", "annotations": []}, None),
        ({"img_name": "corrupt.jpg"}, b"\xff\xd8 this is not a jpeg"),
        ({"img_name": "truncated.jpg"}, _jpeg(Image.effect_noise((R, R), 60).convert("RGB"))[:600]),
        ({"caption": "no image name"}, None),
    ]
    odd_items = [
        (dict(_good("gray.png"), caption=["not", "a", "string"]), Image.new("L", (R, R), 90)),
        (dict(_good("rgba.png")), transparent),
        (dict(_good("cmyk.jpg")), _jpeg(Image.new("CMYK", (R, R), (0, 0, 0, 60)))),
        (dict(_good("deep.png")), deep),
        (dict(_good("palette.png")), rgb.convert("P", palette=Image.Palette.ADAPTIVE)),
        ({"img_name": "polygons.png", "annotations": [
            {"polygon": [], "text": "Empty", "language": "Latin"},
            {"polygon": [[1, 1], [50, 50]], "text": "TwoPoints", "language": "Latin"},
            {"polygon": [[0, 0], [10, 10], [20, 20], [30, 30]], "text": "Flat", "language": "Latin"},
            {"polygon": box(500, 500, 600, 540), "text": "Outside", "language": "Latin"},
            {"polygon": [["a", 1], [2, 3], [4, 5]], "text": "Strings", "language": "Latin"},
            {"polygon": [[10.5, 60.2], [100.7, 60.2], [100.7, 90.9], [10.5, 90.9]], "text": "Floats", "language": "Latin"},
            {"polygon": box(-40, 100, 60, 126), "text": "Partly", "language": "Latin"},
        ]}, rgb),
        ({"img_name": "texts.png", "annotations": [
            {"polygon": box(10, 10, 110, 30), "text": "", "language": "Latin"},
            {"polygon": box(10, 35, 110, 55), "text": "   ", "language": "Latin"},
            {"polygon": box(10, 60, 120, 80), "text": "abcdefghijklmnopqrstuvwxyz0123", "language": "Latin"},
            {"polygon": box(10, 85, 110, 100), "text": "Klingon", "language": "Klingon"},
            {"polygon": box(10, 105, 110, 125), "text": "中文", "color": "red"},
        ]}, rgb),
        ({"img_name": "glyphs.png", "annotations": [
            {"polygon": box(10, 10, 110, 30), "text": "Price 5€", "language": "Latin"},
            {"polygon": box(10, 40, 110, 60), "text": "مرحبا", "language": "Arabic"},
            {"polygon": box(10, 70, 110, 90), "text": "Fine", "language": "Latin"},
        ]}, rgb),
        ({"img_name": "structure.png", "annotations": ["not a dict", 42,
                                                         {"text": "no polygon", "language": "Latin"}]}, rgb),
        ({"img_name": "notalist.png", "annotations": "nope"}, rgb),
    ]
    items, images = [], {}
    for k, (item, data) in enumerate(bad_items + odd_items):
        items.append(item)
        if data is not None:
            images[item["img_name"]] = data
        if k < len(bad_items):
            items.append(_good(f"good{k}.png", f"Good{k}"))
            images[f"good{k}.png"] = rgb
    return write_dataset(tmp_path, items, images)


EXPECTED = Counter({
    "sample.missing_image": 1, "sample.bad_image": 2, "sample.bad_record": 1,
    "line.bad_polygon": 4, "line.degenerate_polygon": 1, "line.polygon_outside": 1,
    "line.empty_text": 2, "fix.text_truncated": 1, "fix.unknown_language": 2, "fix.bad_color": 1,
    "line.missing_glyphs": 2, "line.bad_annotation": 3, "fix.fake_line": 2, "fix.bad_caption": 1,
})


def test_corrupted_dataset_skips_and_counts_every_case(tmp_path):
    path = _corrupted(tmp_path)
    ds = AnyTextDataset(path, resolution=R, seed=0, cache_dir=tmp_path / "index", mask_img_prob=0.0)
    total: Counter = Counter()
    samples = {}
    for i in range(len(ds)):
        s = ds[i]
        total.update(s["data_issues"])
        samples[s["sample_id"].split(":", 1)[1]] = s
        for j in range(s["n_lines"]):
            if s["texts"][j] != " ":
                assert s["glyphs"][j].numpy().any() and s["gly_line"][j].numpy().any(), (s["sample_id"], j)
                assert s["positions"][j].numpy().any()
    assert total == EXPECTED
    assert Counter(ds.issue_counts()) == EXPECTED
    assert "missing.png" not in samples and "corrupt.jpg" not in samples

    def pixel(name):
        return float(samples[name]["img"].numpy()[:, 64, 64].mean())

    assert pixel("gray.png") == pytest.approx(90 / 127.5 - 1, abs=1e-6)
    assert pixel("rgba.png") == pytest.approx(1.0), "transparent pixels composite on white"
    assert pixel("deep.png") == pytest.approx(156 / 127.5 - 1, abs=1e-6), "16-bit rescaled, not clipped"
    assert pixel("palette.png") == pytest.approx(200 / 127.5 - 1, abs=1e-6)
    assert -0.6 < pixel("cmyk.jpg") < 0.9
    polys = samples["polygons.png"]
    assert sorted(polys["texts"][:polys["n_lines"]]) == ["Floats", "Partly"]
    texts = samples["texts.png"]
    got = dict(zip(texts["texts"], texts["language"]))
    assert got == {"abcdefghijklmnopqrst": "Latin", "Klingon": "Latin", "中文": "Chinese_sim", " ": " "}
    inv = texts["inv_mask"].numpy()[0]
    assert inv[20, 50] == 1 and inv[45, 50] == 1, "skipped empty-text lines stay out of the loss"
    glyphs = samples["glyphs.png"]
    assert glyphs["texts"][:glyphs["n_lines"]] == ["Fine"]
    assert samples["structure.png"]["texts"][0] == " " and samples["notalist.png"]["texts"][0] == " "


def test_start_up_errors_name_the_file(tmp_path):
    no_list = tmp_path / "nolist.json"
    no_list.write_text(json.dumps({"data_root": "imgs", "items": []}))
    with pytest.raises(DatasetFileError, match="nolist.json.*data_list"):
        AnyTextDataset(no_list, cache_dir=tmp_path / "index")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"data_root": "imgs", "data_list": []}))
    with pytest.raises(DatasetFileError, match="empty.*empty.json"):
        AnyTextDataset(empty, cache_dir=tmp_path / "index")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data_root": "imgs", "data_list": [{"img_name": "a.png"}, {"img_name": ')
    with pytest.raises(DatasetFileError, match="broken.json"):
        AnyTextDataset(broken, cache_dir=tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        AnyTextDataset(tmp_path / "absent.json", cache_dir=tmp_path / "index")
    hopeless = write_dataset(tmp_path / "h", [{"img_name": "gone.png"}, {"img_name": "bad.jpg"}],
                             {"bad.jpg": b"garbage"})
    with pytest.raises(DatasetFileError, match=r"no usable sample in .*data.json.*missing_image.*bad_image"):
        AnyTextDataset(hopeless, cache_dir=tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="no_such_font.ttf"):
        AnyTextDataset(no_list, font_path=tmp_path / "no_such_font.ttf", cache_dir=tmp_path / "index")


def _hostile_corpus(tmp_path):
    """A BOM-prefixed JSON whose first item is a 20000x20000-header image and two items carry a non-numeric
    ``wm_score``; the rest are ordinary."""
    rgb = Image.new("RGB", (R, R), (200, 200, 200))
    items = [
        _good("bomb.png"),
        dict(_good("strscore.png"), wm_score="0.9"),
        dict(_good("nullscore.png"), wm_score=None),
        dict(_good("fine.png"), wm_score=0.7),
        _good("plain.png"),
    ]
    images = {"bomb.png": png_claiming(20000, 20000), "strscore.png": rgb, "nullscore.png": rgb,
              "fine.png": rgb, "plain.png": rgb}
    path = write_dataset(tmp_path, items, images)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    return path


def test_hostile_corpus_is_counted_not_fatal(tmp_path, caplog):
    path = _hostile_corpus(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = AnyTextDataset(path, resolution=R, seed=0, cache_dir=tmp_path / "index", mask_img_prob=0.0,
                            wm_thresh=0.8)
        assert len(ds) == 5, "the BOM is accepted; a non-numeric wm_score is not filtered by wm_thresh"
        samples = [ds[i] for i in range(len(ds))]
    total: Counter = Counter()
    for s in samples:
        total.update(s["data_issues"])
    assert total["sample.image_too_large"] == 1
    assert total["fix.bad_wm_score"] == 3, "per sample built: index 0 (the bomb) is replaced by strscore.png"
    assert "bomb.png" in caplog.text and "400000000 pixels" in caplog.text
    assert "non-numeric wm_score" in caplog.text and "data.json" in caplog.text
    ids = [s["sample_id"] for s in samples]
    assert "data.json:bomb.png" not in ids and ids[0] == "data.json:strscore.png"
    captions = {s["sample_id"]: s["img_caption"] for s in samples}
    assert "watermarks" not in captions["data.json:strscore.png"], "a bad score is treated as absent"
    assert "with watermarks" in captions["data.json:fine.png"]


def test_hostile_corpus_in_dataloader_workers(tmp_path):
    path = _hostile_corpus(tmp_path)
    ds = AnyTextDataset(path, resolution=R, seed=0, cache_dir=tmp_path / "index", mask_img_prob=0.0)
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_fn)
    total: Counter = Counter()
    seen = []
    for batch in loader:
        total.update(batch["data_issues"])
        seen += batch["sample_id"]
    assert total["sample.image_too_large"] == 1 and total["fix.bad_wm_score"] == 3
    assert len(seen) == 5 and "data.json:bomb.png" not in seen
