"""LMDB render cache: identical tensors to the online path, meta validation, resumable safe builds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from student_model_v2 import build_lmdb_cache
from student_model_v2.data import lmdb_build
from student_model_v2.data.anytext_record import RenderOptions, record_cache_key
from student_model_v2.data.dataset import AnyTextDataset
from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH
from student_model_v2.data.lmdb_build import build_cache
from student_model_v2.data.lmdb_glyph_cache import _MAGIC, DIGEST_BYTES, META_KEY, CacheError
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
    hits = 0
    for i in range(0, len(online), 3):
        a, b = online[i], cached[i]
        _assert_same(a, b)
        assert {k for k in b["data_issues"] if k.startswith("cache.")} <= {"cache.hit"}, b["data_issues"]
        hits += b["data_issues"].get("cache.hit", 0)
    assert hits >= 10, "records with usable lines must come from the cache"
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
    assert cached[0]["data_issues"] == {"cache.hit": 1}
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
    assert ds[0]["texts"][0] == "并行 0" and ds[0]["data_issues"] == {"cache.hit": 1}


def _copy_cache(demo_cache, tmp_path):
    root, _ = demo_cache
    shutil.copytree(root / "cache", tmp_path / "cache")
    return root, tmp_path / "cache"


def test_truncated_or_foreign_data_file_is_refused_without_a_signal(demo_cache, tmp_path):
    root, cache = _copy_cache(demo_cache, tmp_path)
    data = cache / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code = ("from student_model_v2.data.dataset import AnyTextDataset\n"
            f"AnyTextDataset({str(DEMO_JSON)!r}, lmdb_path={str(cache)!r}, cache_dir={str(root / 'index')!r})")
    # A subprocess: without the header check LMDB maps the short file and dies of SIGBUS on the first read.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "CacheError" in result.stderr and "truncated" in result.stderr and str(cache) in result.stderr
    data.write_bytes(b"\0" * 8192)
    with pytest.raises(CacheError, match="not an LMDB data file"):
        AnyTextDataset(DEMO_JSON, lmdb_path=cache, cache_dir=root / "index")
    with pytest.raises(SystemExit, match="not an LMDB data file.*--overwrite"):
        build_cache([str(DEMO_JSON)], str(cache), opts=OPTS, font_path=str(DEFAULT_FONT_PATH), num_workers=0,
                    cache_dir=str(root / "index"), progress=False)


def _rewrite(cache, change) -> None:
    env = lmdb.open(str(cache), map_size=1 << 30)
    with env.begin(write=True) as txn:
        change(txn)
    env.close()


def test_corrupt_record_is_counted_and_rendered_online(demo_cache, tmp_path):
    root, cache = _copy_cache(demo_cache, tmp_path)
    kw = dict(seed=3, cache_dir=root / "index", font_hint_randaug=False, font_hint_prob=1.0)
    online = AnyTextDataset(DEMO_JSON, **kw)
    key = record_cache_key(online.indexes[0][0]).encode()

    def corrupt(txn):
        blob = txn.get(key)
        assert blob[:4] == _MAGIC
        head = 4 + DIGEST_BYTES
        txn.put(key, blob[:head] + bytes(b ^ 0x5A for b in blob[head:head + 40]) + blob[head + 40:])

    _rewrite(cache, corrupt)
    cached = AnyTextDataset(DEMO_JSON, lmdb_path=cache, **kw)
    sample = cached[0]
    assert sample["data_issues"].get("cache.corrupt") == 1 and "cache.hit" not in sample["data_issues"]
    _assert_same(online[0], sample)
    assert cached[1]["data_issues"].get("cache.hit") == 1


def test_replaced_image_with_the_same_name_and_size_is_a_counted_rerender(tmp_path):
    from tests.test_data_dataset import box, write_dataset
    items = [{"img_name": f"{k}.png", "annotations": [
        {"polygon": box(10, 10, 120, 40), "text": f"Stale {k}", "language": "Latin"}]} for k in range(2)]
    path = write_dataset(tmp_path, items, {f"{k}.png": np.full((128, 128, 3), 200, np.uint8) for k in range(2)})
    build_cache([str(path)], str(tmp_path / "cache"), opts=RenderOptions(resolution=128),
                font_path=str(DEFAULT_FONT_PATH), num_workers=0, cache_dir=str(tmp_path / "index"), progress=False)
    other = np.full((128, 128, 3), 200, np.uint8)
    other[60:, :] = 20
    Image.fromarray(other).save(tmp_path / "imgs" / "1.png")
    kw = dict(resolution=128, seed=1, cache_dir=tmp_path / "index", font_hint_randaug=False, font_hint_prob=1.0)
    cached = AnyTextDataset(path, lmdb_path=tmp_path / "cache", **kw)
    assert cached[0]["data_issues"] == {"cache.hit": 1}
    assert cached[1]["data_issues"] == {"cache.stale": 1}
    _assert_same(AnyTextDataset(path, **kw)[1], cached[1])


def test_cache_of_another_dataset_is_refused_unless_told(demo_cache, tmp_path):
    from tests.test_data_dataset import box, write_dataset
    root, _ = demo_cache
    items = [{"img_name": f"{k}.png", "annotations": [
        {"polygon": box(10, 10, 300, 60), "text": f"Other {k}", "language": "Latin"}]} for k in range(3)]
    other = write_dataset(tmp_path, items, {f"{k}.png": np.full((512, 512, 3), 90, np.uint8) for k in range(3)})
    with pytest.raises(CacheError, match=r"holds only 0 of 3 probed records.*--lmdb_mismatch warn"):
        AnyTextDataset(other, lmdb_path=root / "cache", cache_dir=tmp_path / "index")
    used = AnyTextDataset(other, lmdb_path=root / "cache", cache_dir=tmp_path / "index", lmdb_mismatch="warn")
    assert used[0]["data_issues"] == {"cache.miss": 1}


def test_cache_of_the_previous_format_is_refused_with_a_rebuild_hint(demo_cache, tmp_path):
    root, cache = _copy_cache(demo_cache, tmp_path)

    def old_meta(txn):
        meta = json.loads(txn.get(META_KEY))
        txn.put(META_KEY, json.dumps(dict(meta, version=1)).encode())

    _rewrite(cache, old_meta)
    with pytest.raises(CacheError, match="format version: cache has 1.*older version.*--overwrite"):
        AnyTextDataset(DEMO_JSON, lmdb_path=cache, cache_dir=root / "index")
    with pytest.raises(SystemExit, match="format version.*--overwrite"):
        build_cache([str(DEMO_JSON)], str(cache), opts=OPTS, font_path=str(DEFAULT_FONT_PATH), num_workers=0,
                    cache_dir=str(root / "index"), progress=False)
