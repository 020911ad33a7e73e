"""Build the LMDB cache of per-line renders (see ``build_lmdb_cache.py`` for the command line).

Resumable: re-running with the same options skips images already stored (an interrupted build picks up
where it stopped; a grown dataset only renders the new images). Safe: the meta record's ``complete``
flag is set only after the last record is committed, and the dataset refuses a cache without it.
Different render options on an existing cache, or a cache of an older format version, are an error
unless ``overwrite``. Every record stores its image file's content digest, so a record whose image was
later replaced is recognised as stale by the dataset.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import cv2
import lmdb
from tqdm import tqdm

from .anytext_record import (
    RenderOptions,
    SampleError,
    find_image,
    image_roots,
    load_image,
    parse_annotations,
    record_cache_key,
    render_line,
)
from .glyph_render import FontSet
from .json_index import JsonIndex, expand_dataset_paths, repo_path
from .lmdb_glyph_cache import (
    META_KEY,
    CacheError,
    build_meta,
    check_data_file,
    close_shared_reader,
    encode_record,
    meta_mismatches,
    read_meta,
    source_digest,
)

logger = logging.getLogger(__name__)
_LMDB_FILES = ("data.mdb", "lock.mdb")

_worker_font: FontSet | None = None
_worker_opts: RenderOptions | None = None


def _init_worker(fonts: FontSet, opts: RenderOptions) -> None:
    global _worker_font, _worker_opts
    cv2.setNumThreads(1)
    _worker_font = fonts
    _worker_opts = opts


def render_record(job: tuple[str, str, object, str]) -> tuple[str, bytes | None, Counter, str | None]:
    """Render every usable line of one image: (key, encoded record or None, issue counts, error)."""
    key, img_path, annotations, where = job
    issues: Counter = Counter()
    try:
        image, size = load_image(Path(img_path), _worker_opts.resolution)
        parsed = parse_annotations(annotations, image_size=size, resolution=_worker_opts.resolution,
                                   max_chars=_worker_opts.max_chars, font=_worker_font, where=where, record_key=key)
        issues.update(parsed.issues)
        renders = {line.ann_index: render_line(line, image, _worker_opts) for line in parsed.lines}
        return key, encode_record(size, renders, source_digest(img_path)), issues, None
    except SampleError as exc:
        issues[f"sample.{exc.kind}"] += 1
        return key, None, issues, str(exc)
    except Exception as exc:  # reported and counted by the writer, never dropped silently
        issues[f"error.{type(exc).__name__}"] += 1
        return key, None, issues, f"{where}: {type(exc).__name__}: {exc}"


def _prepare_output(path: Path, opts: RenderOptions, font: FontSet, overwrite: bool, map_size: int) -> lmdb.Environment:
    path.mkdir(parents=True, exist_ok=True)
    close_shared_reader(path.resolve())
    foreign = [p.name for p in path.iterdir() if p.name not in _LMDB_FILES]
    if foreign:
        raise SystemExit(f"error: {path} contains files that are not an LMDB cache ({', '.join(sorted(foreign))}); "
                         f"choose an empty or cache directory")
    if overwrite:
        for name in _LMDB_FILES:
            (path / name).unlink(missing_ok=True)
    elif (path / "data.mdb").is_file():
        try:
            check_data_file(path / "data.mdb")
        except CacheError as exc:
            raise SystemExit(f"error: {exc} (or pass --overwrite)") from None
    env = lmdb.open(str(path), map_size=map_size, subdir=True, readahead=False, meminit=False, lock=True)
    meta = read_meta(env)
    if meta is None:
        if env.stat()["entries"]:
            env.close()
            raise SystemExit(f"error: {path} holds an LMDB without a {META_KEY.decode()} record; use --overwrite")
        return env
    problems = meta_mismatches(meta, opts, font)
    if problems:
        env.close()
        raise SystemExit(f"error: {path} was built with other options ({'; '.join(problems)}); "
                         f"use --overwrite to rebuild it")
    return env


def _jobs(indexes: list[JsonIndex], env: lmdb.Environment, counts: Counter, limit: int | None,
          bar: tqdm) -> Iterator[tuple[str, str, object, str]]:
    """Records still to render, skipping keys the cache already holds (this is what makes it resumable)."""
    emitted = 0
    for index in indexes:
        roots = image_roots(index.data_root, index.path)
        for i in range(len(index)):
            if limit is not None and emitted >= limit:
                return
            emitted += 1
            record = index[i]
            name = record.get("img_name") if isinstance(record, dict) else None
            if not isinstance(name, str) or not name:
                counts["sample.bad_record"] += 1
                bar.update(1)
                continue
            key = record_cache_key(record)
            with env.begin() as txn:
                if txn.get(key.encode("ascii")) is not None:
                    counts["resumed"] += 1
                    bar.update(1)
                    continue
            path = find_image(roots, name)
            if path is None:
                counts["sample.missing_image"] += 1
                bar.update(1)
                continue
            yield key, str(path), record.get("annotations"), f"{index.path.name}:{name}"


def build_cache(dataset_json: list[str], output_lmdb: str, *, opts: RenderOptions, font_path: str,
                font_dir: str | None = None, num_workers: int = 4, commit_interval: int = 200, map_size_gb: float = 256,
                overwrite: bool = False, wm_thresh: float = 1.0, cache_dir: str | None = None,
                limit: int | None = None, progress: bool = True) -> dict:
    """Build or resume a cache; returns the final meta (also stored under ``__meta__``). With ``font_dir``
    lines are drawn in its fonts (as the dataset's ``font_dir``), else in ``font_path``."""
    font = FontSet.load(font_path, font_dir)
    paths = expand_dataset_paths(dataset_json)
    indexes = [JsonIndex(p, cache_dir=cache_dir, wm_thresh=wm_thresh) for p in paths]
    out = repo_path(output_lmdb)
    env = _prepare_output(out, opts, font, overwrite, int(map_size_gb * (1 << 30)))
    sources = [str(p) for p in paths]
    counts: Counter = Counter()
    written = errors_shown = 0
    started = time.time()
    total = sum(len(ix) for ix in indexes)
    bar = tqdm(total=total if limit is None else min(limit, total), desc="lmdb cache", unit="img",
               disable=not progress)
    pool = None
    try:
        with env.begin(write=True) as txn:
            txn.put(META_KEY, json.dumps(build_meta(opts, font, complete=False, source_jsons=sources)).encode())
        jobs = _jobs(indexes, env, counts, limit, bar)
        if num_workers > 0:
            pool = mp.get_context("spawn").Pool(num_workers, _init_worker, (font, opts))
            results = pool.imap_unordered(render_record, jobs, chunksize=4)
        else:
            _init_worker(font, opts)
            results = map(render_record, jobs)
        txn = env.begin(write=True)
        try:
            for key, blob, issues, error in results:
                counts.update(issues)
                if blob is not None:
                    txn.put(key.encode("ascii"), blob)
                    written += 1
                    if written % commit_interval == 0:
                        txn.commit()
                        txn = env.begin(write=True)
                elif error and errors_shown < 20:
                    errors_shown += 1
                    logger.warning("not cached: %s", error)
                bar.update(1)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        meta = build_meta(opts, font, complete=True, source_jsons=sources, records=env.stat()["entries"] - 1,
                          issues=dict(sorted(counts.items())))
        with env.begin(write=True) as txn:
            txn.put(META_KEY, json.dumps(meta).encode())
        env.sync(True)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        env.close()
    meta["written_this_run"] = written
    meta["seconds"] = round(time.time() - started, 2)
    return meta
