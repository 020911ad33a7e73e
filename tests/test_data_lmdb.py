"""LMDB render cache: identical tensors to the online path, meta validation, resumable safe builds."""

from __future__ import annotations

import json

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from student_model_v2 import build_lmdb_cache
from student_model_v2.data import lmdb_build
from student_model_v2.data.anytext_record import RenderOptions
from student_model_v2.data.dataset import AnyTextDataset
from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH
from student_model_v2.data.lmdb_build import build_cache
from student_model_v2.data.lmdb_glyph_cache import META_KEY, CacheError
from tests.test_data_dataset import DEMO_JSON

OPTS = RenderOptions()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdb")
    meta = build_cache([str(DEMO_JSON)], str(root / "cache"), opts=OPTS, font_path=str(DEFAULT_FONT_PATH),
                       num_workers=0, cache_dir=str(root / "index"), progress=False)
    return root, meta


def _assert_same(a: dict, b: dict) -> None:
    for k, v in a.items():
        if k == "data_issues":
            continue
        if isinstance(v, torch.Tensor):
            assert np.array_equal(v.numpy(), b[k].numpy()), k
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(v, b[k])), k
        else:
            assert v == b[k], k


def test_lmdb_and_online_paths_give_identical_tensors(demo_cache):
    root, meta = demo_cache
    assert meta["complete"] and meta["records"] == 48 and meta["written_this_run"] == 48
    kw = dict(seed=9, cache_dir=root / "index", font_hint_randaug=False, font_hint_prob=1.0, mask_img_prob=0.5)
    online = AnyTextDataset(DEMO_JSON, **kw)
    cached = AnyTextDataset(DEMO_JSON, lmdb_path=root / "cache", **kw)
    for i in range(0, len(online), 3):
        a, b = online[i], cached[i]
        _assert_same(a, b)
        assert not any(k.startswith("cache.") for k in b["data_issues"]), b["data_issues"]
    kw["font_hint_randaug"] = True
    online_randaug = AnyTextDataset(DEMO_JSON, **kw)[0]
    cached_randaug = AnyTextDataset(DEMO_JSON, lmdb_path=root / "cache", **kw)[0]
    _assert_same(online_randaug, cached_randaug)
    assert not np.array_equal(cached_randaug["font_hint"].numpy(), cached[0]["font_hint"].numpy()), \
        "with randaug the font hint comes from the jittered crop, not the cached base"


@pytest.mark.parametrize("option, value, field", [
    ("max_chars", 10, "max_chars"), ("resolution", 256, "resolution"), ("glyph_scale", 2.0, "glyph_scale"),
    ("vert_ang", 5.0, "vert_ang"), ("add_space", False, "add_space"),
])
def test_meta_mismatch_is_an_error(demo_cache, option, value, field):
    root, _ = demo_cache
    with pytest.raises(CacheError, match=f"does not match.*{field}"):
        AnyTextDataset(DEMO_JSON, lmdb_path=root / "cache", cache_dir=root / "index", **{option: value})


def test_other_font_is_a_mismatch(demo_cache, tmp_path):
    root, _ = demo_cache
    other = tmp_path / "copy.otf"
    other.write_bytes(DEFAULT_FONT_PATH.read_bytes() + b"\0")
    with pytest.raises(CacheError, match="font"):
        AnyTextDataset(DEMO_JSON, lmdb_path=root / "cache", cache_dir=root / "index", font_path=other)
    with pytest.raises(FileNotFoundError, match="no_cache_here"):
        AnyTextDataset(DEMO_JSON, lmdb_path=tmp_path / "no_cache_here", cache_dir=root / "index")


def test_interrupted_build_never_loads_and_resumes(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = lmdb_build.render_record

    def crashing(job):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt("simulated crash")
        return real(job)

    monkeypatch.setattr(lmdb_build, "render_record", crashing)
    out = tmp_path / "cache"
    kwargs = dict(opts=OPTS, font_path=str(DEFAULT_FONT_PATH), num_workers=0, cache_dir=str(tmp_path / "index"),
                  commit_interval=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_cache([str(DEMO_JSON)], str(out), **kwargs)
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        assert json.loads(txn.get(META_KEY))["complete"] is False
        stored = env.stat()["entries"] - 1
    env.close()
    assert 0 < stored <= 7
    with pytest.raises(CacheError, match="did not finish"):
        AnyTextDataset(DEMO_JSON, lmdb_path=out, cache_dir=tmp_path / "index")
    monkeypatch.setattr(lmdb_build, "render_record", real)
    meta = build_cache([str(DEMO_JSON)], str(out), **kwargs)
    assert meta["complete"] and meta["issues"]["resumed"] == stored and meta["written_this_run"] == 48 - stored
    assert AnyTextDataset(DEMO_JSON, lmdb_path=out, cache_dir=tmp_path / "index")[0]["n_lines"] >= 1
    with pytest.raises(SystemExit, match="other options.*max_chars"):
        build_cache([str(DEMO_JSON)], str(out), **dict(kwargs, opts=RenderOptions(max_chars=5)))
    rebuilt = build_cache([str(DEMO_JSON)], str(out), overwrite=True, **dict(kwargs, opts=RenderOptions(max_chars=5)))
    assert rebuilt["written_this_run"] == 48


def test_cache_misses_and_stale_images_fall_back_to_online(tmp_path):
    from tests.test_data_dataset import box, write_dataset
    items = [{"img_name": f"{k}.png", "annotations": [
        {"polygon": box(10, 10, 120, 40), "text": f"Line {k}", "language": "Latin"}]} for k in range(3)]
    path = write_dataset(tmp_path, items, {f"{k}.png": np.full((128, 128, 3), 220, np.uint8) for k in range(3)})
    build_cache([str(path)], str(tmp_path / "cache"), opts=RenderOptions(resolution=128),
                font_path=str(DEFAULT_FONT_PATH), num_workers=0, cache_dir=str(tmp_path / "index"), limit=2,
                progress=False)
    Image.fromarray(np.full((256, 128, 3), 220, np.uint8)).save(tmp_path / "imgs" / "1.png")
    kw = dict(resolution=128, seed=1, cache_dir=tmp_path / "index", font_hint_randaug=False)
    cached = AnyTextDataset(path, lmdb_path=tmp_path / "cache", **kw)
    online = AnyTextDataset(path, **kw)
    assert cached[0]["data_issues"] == {}
    assert cached[1]["data_issues"] == {"cache.stale": 1}
    assert cached[2]["data_issues"] == {"cache.miss": 1}
    for i in range(3):
        _assert_same(online[i], cached[i])


def test_cli_parallel_build(tmp_path, capsys):
    from tests.test_data_dataset import box, write_dataset
    items = [{"img_name": f"{k}.png", "annotations": [
        {"polygon": box(10, 10, 120, 40), "text": f"并行 {k}", "language": "Chinese"}]} for k in range(4)]
    items.append({"img_name": "missing.png"})
    path = write_dataset(tmp_path, items, {f"{k}.png": np.full((128, 128, 3), 30, np.uint8) for k in range(4)})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an LMDB cache"):
        build_lmdb_cache.main(["--dataset_json", str(path), "--output_lmdb", str(tmp_path / "foreign"),
                               "--num_workers", "0", "--cache_dir", str(tmp_path / "index")])
    build_lmdb_cache.main(["--dataset_json", str(path), "--output_lmdb", str(tmp_path / "cache"),
                           "--resolution", "128", "--num_workers", "2", "--map_size_gb", "1",
                           "--cache_dir", str(tmp_path / "index")])
    meta = json.loads(capsys.readouterr().out)
    assert meta["complete"] and meta["records"] == 4 and meta["issues"] == {"sample.missing_image": 1}
    ds = AnyTextDataset(path, resolution=128, lmdb_path=tmp_path / "cache", cache_dir=tmp_path / "index",
                        font_hint_randaug=False, seed=0)
    assert ds[0]["texts"][0] == "并行 0" and ds[0]["data_issues"] == {}
