"""LMDB cache of per-line renders (glyph coverage, glyph line, font-hint base), keyed per image.

Layout: a directory LMDB with one record per image under :func:`anytext_record.record_cache_key` and a
``__meta__`` JSON record. Records hold line-size patches (not full canvases): a header of int32s and
the raw bytes, zlib-compressed. A record is only used when the image still has the size it had at
build time (polygons are scaled with the image); otherwise the dataset renders online.

The meta names every option that changes a render (resolution, max_chars, font content hash,
glyph_scale, vert_ang, add_space) and a ``complete`` flag that the builder sets last: a mismatch, or a
build that never finished, is an error at load — never silently reused.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import numpy as np

from .anytext_record import LineRender, RenderOptions
from .glyph_render import GLY_LINE_HEIGHT, GLY_LINE_WIDTH, FontSet, Patch

META_KEY = b"__meta__"
FORMAT = "anytext2-line-renders"
VERSION = 1
_MAGIC = b"AT2R"
_ENTRY_INTS = 9


class CacheError(RuntimeError):
    """An LMDB cache that must not be used (options mismatch, unfinished build, wrong format)."""


def build_meta(opts: RenderOptions, font: FontSet, *, complete: bool, **extra) -> dict:
    return dict(format=FORMAT, version=VERSION, complete=complete, **asdict(opts), font_name=font.path.name,
                font_sha1=font.sha1, fonts=font.manifest(), font_layout=font.layout, **extra)


def meta_mismatches(meta: dict, opts: RenderOptions, font: FontSet) -> list[str]:
    """Human-readable differences between a cache's meta and the renders wanted now."""
    wanted = build_meta(opts, font, complete=True)
    out = []
    for key in ("format", "version", "resolution", "max_chars", "glyph_scale", "vert_ang", "add_space", "font_sha1",
                "font_layout"):
        have, want = meta.get(key), wanted[key]
        if isinstance(want, float) and isinstance(have, (int, float)):
            same = abs(float(have) - want) < 1e-9
        else:
            same = have == want
        if not same:
            label = f"font (content sha1; cache built with {meta.get('font_name')!r})" if key == "font_sha1" else key
            out.append(f"{label}: cache has {have!r}, requested {want!r}")
    return out


def encode_record(image_size: tuple[int, int], renders: dict[int, LineRender]) -> bytes:
    """Serialise the renders of one image (keyed by annotation index)."""
    header = [image_size[0], image_size[1], len(renders)]
    body: list[bytes] = []
    for ann_index, r in sorted(renders.items()):
        gh, gw = r.glyph.data.shape
        fh, fw = r.hint_base.data.shape
        header += [ann_index, r.glyph.x, r.glyph.y, gh, gw, r.hint_base.x, r.hint_base.y, fh, fw]
        body += [np.ascontiguousarray(r.glyph.data, np.uint8).tobytes(),
                 np.packbits(r.gly_line.astype(bool)).tobytes(),
                 np.packbits(r.hint_base.data.astype(bool)).tobytes()]
    head = np.asarray(header, "<i4").tobytes()
    return _MAGIC + zlib.compress(len(head).to_bytes(4, "little") + head + b"".join(body), 1)


def decode_record(blob: bytes) -> tuple[tuple[int, int], dict[int, LineRender]]:
    """Inverse of :func:`encode_record`: ((width, height) of the image at build time, renders)."""
    if blob[:4] != _MAGIC:
        raise CacheError("LMDB record has an unknown format (rebuild the cache)")
    raw = zlib.decompress(blob[4:])
    head_len = int.from_bytes(raw[:4], "little")
    header = np.frombuffer(raw, "<i4", count=head_len // 4, offset=4)
    pos = 4 + head_len
    strip = GLY_LINE_HEIGHT * GLY_LINE_WIDTH
    renders: dict[int, LineRender] = {}
    for k in range(int(header[2])):
        ann, gx, gy, gh, gw, fx, fy, fh, fw = (int(v) for v in header[3 + k * _ENTRY_INTS: 3 + (k + 1) * _ENTRY_INTS])
        glyph = np.frombuffer(raw, np.uint8, count=gh * gw, offset=pos).reshape(gh, gw)
        pos += gh * gw
        line_bits = np.frombuffer(raw, np.uint8, count=strip // 8, offset=pos)
        pos += strip // 8
        hint_bytes = (fh * fw + 7) // 8
        hint_bits = np.frombuffer(raw, np.uint8, count=hint_bytes, offset=pos)
        pos += hint_bytes
        renders[ann] = LineRender(
            glyph=Patch(glyph, gx, gy),
            gly_line=np.unpackbits(line_bits).reshape(GLY_LINE_HEIGHT, GLY_LINE_WIDTH),
            hint_base=Patch(np.unpackbits(hint_bits, count=fh * fw).reshape(fh, fw), fx, fy),
        )
    return (int(header[0]), int(header[1])), renders


_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


def shared_reader(path: Path) -> lmdb.Environment:
    """The process's read-only environment for ``path``: LMDB allows one open per process and path,
    so every dataset (train/val/test) shares it; a forked worker opens its own."""
    key = str(path)
    entry = _READERS.get(key)
    if entry is None or entry[0] != os.getpid():
        env = lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
        _READERS[key] = (os.getpid(), env)
        return env
    return entry[1]


def close_shared_reader(path: Path) -> None:
    """Drop this process's read handle on ``path`` (the builder does this before writing)."""
    entry = _READERS.pop(str(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def read_meta(env: lmdb.Environment) -> dict | None:
    with env.begin() as txn:
        raw = txn.get(META_KEY)
    return None if raw is None else json.loads(raw.decode("utf-8"))


@dataclass
class CachedRecord:
    image_size: tuple[int, int]
    renders: dict[int, LineRender]


class LineRenderCache:
    """Read side of the cache, validated against the dataset's render options at construction.

    The LMDB environment is opened once per process and shared (safe with DataLoader workers).
    """

    def __init__(self, path: str | os.PathLike[str], opts: RenderOptions, font: FontSet) -> None:
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"LMDB cache not found: {self.path} (no data.mdb; build it with "
                                    f"python -m student_model_v2.build_lmdb_cache)")
        meta = read_meta(shared_reader(self.path))
        if meta is None:
            raise CacheError(f"{self.path}: no {META_KEY.decode()} record; not a cache built by build_lmdb_cache")
        problems = meta_mismatches(meta, opts, font)
        if problems:
            raise CacheError(f"{self.path}: LMDB cache does not match the dataset options — "
                             + "; ".join(problems) + ". Rebuild it with these options or drop lmdb_path.")
        if meta.get("complete") is not True:
            raise CacheError(f"{self.path}: the cache build did not finish (meta 'complete' is false); "
                             f"re-run build_lmdb_cache with the same arguments to resume it")
        self.meta = meta

    def get(self, key: str) -> CachedRecord | None:
        with shared_reader(self.path).begin(buffers=False) as txn:
            blob = txn.get(key.encode("ascii"))
        if blob is None:
            return None
        size, renders = decode_record(blob)
        return CachedRecord(size, renders)
