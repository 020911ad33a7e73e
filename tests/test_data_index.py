"""Streaming JSON index, dataset path lists and the deterministic split."""

from __future__ import annotations

import codecs
import json
import logging
import os
import pickle
import tracemalloc

import numpy as np
import pytest

from student_model_v2.data.json_index import (
    DatasetFileError,
    JsonIndex,
    expand_dataset_paths,
    split_indices,
    split_lengths,
    wm_score,
)


def _records(n: int) -> list[dict]:
    return [{"img_name": f"{i:06d}.jpg", "caption": "招牌 sign " * (i % 5),
             "annotations": [{"polygon": [[i % 97, 1], [40, 1], [40, 20], [i % 97, 20]], "text": f"文字{i}",
                              "language": "Chinese", "color": [i % 256, 0, 9]}],
             **({"wm_score": (i % 10) / 10} if i % 3 else {})} for i in range(n)]


def _write(path, records, root="/data/imgs", root_last=False):
    body = {"data_list": records, "data_root": root} if root_last else {"data_root": root, "data_list": records}
    path.write_text(json.dumps(body, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _retained_and_peak(fn):
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    obj = fn()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return obj, current - before, peak - before


def test_20k_entry_index_holds_no_parsed_records(tmp_path):
    small_recs, big_recs = _records(2_000), _records(20_000)
    small = _write(tmp_path / "small.json", small_recs)
    big = _write(tmp_path / "big.json", big_recs, root_last=True)
    ix_small, kept_small, peak_small = _retained_and_peak(lambda: JsonIndex(small, cache_dir=tmp_path / "c"))
    ix_big, kept_big, peak_big = _retained_and_peak(lambda: JsonIndex(big, cache_dir=tmp_path / "c"))
    assert len(ix_big) == 20_000 and ix_big.data_root == "/data/imgs"
    assert kept_big < 256 * 1024 and kept_small < 256 * 1024, "the index keeps offsets, not records"
    assert peak_big < 16 * 1024 * 1024 and peak_big < 1.5 * peak_small + 6 * 1024 * 1024, "streaming build"
    assert not any(isinstance(v, (list, dict)) and len(v) > 100 for v in vars(ix_big).values())
    for i in (0, 1, 9_999, 19_999):
        assert ix_big[i] == big_recs[i]
    record = ix_big[5]
    record["annotations"].append("mutated")
    assert ix_big[5] == big_recs[5], "every read parses afresh"
    _, kept_reload, _ = _retained_and_peak(lambda: JsonIndex(big, cache_dir=tmp_path / "c"))
    assert kept_reload < 256 * 1024
    clone = pickle.loads(pickle.dumps(ix_big))
    assert len(pickle.dumps(ix_big)) < 4096 and clone[123] == big_recs[123]


def test_watermark_filter_keeps_missing_scores(tmp_path):
    recs = _records(30)
    path = _write(tmp_path / "wm.json", recs)
    assert len(JsonIndex(path, cache_dir=tmp_path)) == 30
    ix = JsonIndex(path, cache_dir=tmp_path, wm_thresh=0.5)
    kept = [r for r in recs if not r.get("wm_score", 0) > 0.5]
    assert len(ix) == len(kept) and [ix[i] for i in range(len(ix))] == kept
    assert ix.position(len(ix) - 1) == recs.index(kept[-1])
    with pytest.raises(IndexError):
        ix[len(ix)]


def test_stale_index_is_rebuilt_and_broken_meta_ignored(tmp_path):
    path = _write(tmp_path / "d.json", _records(10))
    assert len(JsonIndex(path, cache_dir=tmp_path / "c")) == 10
    _write(path, _records(12))
    os.utime(path, ns=(1, 1))
    assert len(JsonIndex(path, cache_dir=tmp_path / "c")) == 12
    for meta in (tmp_path / "c").glob("*.meta.json"):
        meta.write_text("{truncated")
    ix = JsonIndex(path, cache_dir=tmp_path / "c")
    assert len(ix) == 12 and ix[11]["img_name"] == "000011.jpg"
    assert not list((tmp_path / "c").glob("*.tmp")), "temporary files are renamed into place"


def test_jsonl_input_with_sidecar_meta(tmp_path):
    recs = _records(5)
    path = tmp_path / "shard.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    with pytest.raises(DatasetFileError, match="shard.meta.json"):
        JsonIndex(path, cache_dir=tmp_path)
    (tmp_path / "shard.meta.json").write_text(json.dumps({"data_root": "imgs", "count": 5}))
    ix = JsonIndex(path, cache_dir=tmp_path)
    assert ix.data_root == "imgs" and [ix[i] for i in range(5)] == recs
    (tmp_path / "shard.meta.json").write_text(json.dumps(["imgs"]))
    with pytest.raises(DatasetFileError, match="shard.meta.json.*list"):
        JsonIndex(path, cache_dir=tmp_path / "rebuilt")


@pytest.mark.parametrize("body, message", [
    ('{"data_root": "x"}', "no 'data_list'"),
    ('[1, 2, 3]', "not a valid AnyText2 JSON"),
    ('{"data_list": [{"img_name": "a"} {"img_name": "b"}]}', "expected ',' or ']' in data_list at byte 33"),
    ('{"data_list": [] "data_root": "x"}', "expected ',' or '}' after a top-level value at byte 17"),
    ('{"data_list": [], 5: "x"}', "expected a string key at byte 18"),
    ('{"data_list": [{"img_name": "a"},', "not a valid AnyText2 JSON"),
    ('{"data_root": 5, "data_list": []}', "data_root"),
])
def test_malformed_files_name_the_file(tmp_path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(body)
    with pytest.raises(DatasetFileError, match=message) as err:
        JsonIndex(path, cache_dir=tmp_path)
    assert "bad.json" in str(err.value)


def test_expand_dataset_paths(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "more.txt").write_text("../c.json\n")
    listing = tmp_path / "all.list"
    listing.write_text(f"# shards\n{a}\n\n{b}  # inline comment\nlists/more.txt\n")
    assert expand_dataset_paths([f"{a},{b}", str(c)]) == [a, b, c]
    assert expand_dataset_paths([str(listing)]) == [a, b, c]
    rel = expand_dataset_paths(["demodataset/annotations/demo_data.json"])[0]
    assert rel.is_absolute() and rel.is_file(), "relative paths resolve against the repo root"


def test_split_is_deterministic_and_covers_everything():
    assert split_lengths(100) == (90, 5, 5)
    assert split_lengths(10) == (8, 1, 1)
    assert split_lengths(2) == (2, 0, 0)
    assert split_lengths(1819, (0.98, 0.01, 0.01)) == (1783, 18, 18)
    with pytest.raises(ValueError):
        split_lengths(10, (0.5, 0.2, 0.2))
    a, b = split_indices(1000, seed=1), split_indices(1000, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))
    assert not np.array_equal(split_indices(1000, seed=2)["val"], a["val"])


def test_byte_order_marks_are_accepted(tmp_path):
    recs = _records(4)
    path = _write(tmp_path / "bom.json", recs)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    ix = JsonIndex(path, cache_dir=tmp_path)
    assert ix.data_root == "/data/imgs" and [ix[i] for i in range(4)] == recs, "offsets account for the BOM"
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(codecs.BOM_UTF8 + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode())
    (tmp_path / "bom.meta.json").write_bytes(codecs.BOM_UTF8 + b'{"data_root": "imgs"}')
    ix = JsonIndex(lines, cache_dir=tmp_path)
    assert ix.data_root == "imgs" and [ix[i] for i in range(4)] == recs
    listing = tmp_path / "bom.list"
    listing.write_bytes(codecs.BOM_UTF8 + b"bom.json\n")
    assert expand_dataset_paths([str(listing)]) == [path]


def test_non_utf8_list_file_is_a_clear_error(tmp_path):
    listing = tmp_path / "shards.list"
    listing.write_bytes("données/a.json\n".encode("latin-1"))
    with pytest.raises(DatasetFileError, match=r"shards\.list: dataset list file is not UTF-8 text \(byte 4"):
        expand_dataset_paths([str(listing)])


def test_non_numeric_wm_scores_are_counted_and_treated_as_absent(tmp_path, caplog):
    recs = [{"img_name": "a", "wm_score": "0.9"}, {"img_name": "b", "wm_score": None},
            {"img_name": "c", "wm_score": 0.9}, {"img_name": "d", "wm_score": True}, {"img_name": "e"}]
    assert [wm_score(r) for r in recs] == [(None, True), (None, True), (0.9, False), (None, True), (None, False)]
    path = _write(tmp_path / "wm.json", recs)
    with caplog.at_level(logging.WARNING):
        ix = JsonIndex(path, cache_dir=tmp_path, wm_thresh=0.5)
    assert [ix[i]["img_name"] for i in range(len(ix))] == ["a", "b", "d", "e"], "only the numeric 0.9 is filtered"
    assert "wm.json: 3 item(s) have a non-numeric wm_score" in caplog.text
