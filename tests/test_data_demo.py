"""The committed synthetic demo dataset, its generator, and the ``bench data`` command."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from student_model_v2 import bench
from student_model_v2.data.dataset import AnyTextDataset
from student_model_v2.data.glyph_render import line_geometry
from student_model_v2.data.synthetic import make_demo_dataset, synth_sample
from tests.test_data_dataset import DEMO_JSON

DEMO = DEMO_JSON.parent.parent


def test_committed_demo_dataset_matches_the_spec():
    doc = json.loads(DEMO_JSON.read_text(encoding="utf-8"))
    assert doc["data_root"] == "../imgs"
    items = doc["data_list"]
    assert 30 <= len(items) <= 60
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024
    assert sorted(p.name for p in (DEMO / "imgs").iterdir()) == sorted(it["img_name"] for it in items)
    lines = [a for it in items for a in it["annotations"]]
    for it in items:
        with Image.open(DEMO / "imgs" / it["img_name"]) as img:
            assert img.size == (512, 512) and img.mode == "RGB" and img.format == "JPEG"
        assert 1 <= len(it["annotations"]) <= 5
    for a in lines:
        assert all(isinstance(v, int) for pt in a["polygon"] for v in pt) and len(a["polygon"]) == 4
        assert a["text"].strip() and a["language"] in ("Latin", "Chinese")
    geoms = [line_geometry(np.array(a["polygon"], np.float32)) for a in lines]
    assert sum(g.vertical for g in geoms) >= 5
    assert sum(not g.vertical and abs(g.angle) > 4 for g in geoms) >= 5
    assert {a["language"] for a in lines} == {"Latin", "Chinese"}
    assert any("color" not in a for a in lines) and any(a.get("color") == [500, 500, 500] for a in lines)
    assert any(a.get("valid") is False for a in lines)
    assert any("wm_score" in it for it in items) and any("wm_score" not in it for it in items)
    captions = [it.get("caption") for it in items]
    assert None in captions and any("*" in (c or "") for c in captions)
    assert any(len((c or "").split()) > 128 for c in captions)


def test_generator_is_deterministic_and_matches_the_committed_files():
    items = json.loads(DEMO_JSON.read_text(encoding="utf-8"))["data_list"]
    for i in (0, 7):
        img, record = synth_sample(0, i)
        assert dict(record, img_name=items[i]["img_name"]) == items[i]
        committed = np.asarray(Image.open(DEMO / "imgs" / items[i]["img_name"]).convert("RGB"), np.float32)
        assert np.abs(committed - img).mean() < 3.0, "JPEG of the same pixels"


def test_make_demo_dataset_writes_a_loadable_dataset(tmp_path):
    path = make_demo_dataset(tmp_path / "demo", count=3, seed=5, size=256)
    ds = AnyTextDataset(path, resolution=256, seed=0, cache_dir=tmp_path / "index")
    assert len(ds) == 3 and all(ds[i]["n_lines"] >= 1 for i in range(3))


def test_bench_data_prints_json(capsys):
    bench.main(["data", "--repeats", "1", "--min_lines", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "data" and out["samples_timed"] >= 5
    for key in ("online_randaug", "online_no_randaug", "lmdb"):
        assert out[key]["cpu_ms"] > 0 and out[key]["wall_ms"] > 0
    assert out["lmdb_build_s_per_image"] > 0
