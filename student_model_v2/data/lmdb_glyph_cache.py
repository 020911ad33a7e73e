"""LMDB cache of per-line renders (glyph coverage, glyph line, font-hint base), keyed per image.

Layout: a directory LMDB with one record per image under :func:`anytext_record.record_cache_key` and a
``__meta__`` JSON record. Records hold line-size patches (not full canvases): a header of int32s and
the raw bytes, zlib-compressed, behind a magic and the source image file's content digest. A record is
used only when the image file still has that digest and the image still has its build-time size;
otherwise the dataset renders online and counts ``cache.stale``. A record that does not decode (bad
zlib stream, truncated payload) is counted as ``cache.corrupt`` and rendered online.

Trust at open (:class:`LineRenderCache`), all errors naming the path:

* the data file's LMDB header must be sane and the file at least as long as its committed pages
  (a truncated copy would otherwise kill the process with SIGBUS on the first read);
* the meta's ``render`` settings (resolution, max_chars, glyph_scale, vert_ang, add_space, font content
  hash; compared key by key, so a new setting is one more key in :func:`render_settings`) must equal
  the dataset's, the format version must be this one and the build must be ``complete``;
* the dataset's records must be in the cache (:meth:`LineRenderCache.check_membership`): a cache built
  from another dataset is refused, or with ``mismatch="warn"`` used with a warning and counted misses.

Processes: LMDB allows one environment per file and process, and an environment must not cross a
fork. Readers are opened lazily per process (:func:`shared_reader`) and every reader of this process
is closed just before any ``fork`` (``os.register_at_fork``), so forked DataLoader workers open their
own and the parent reopens on its next read; spawned workers never see the parent's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import numpy as np

from .anytext_record import LineRender, RenderOptions
from .glyph_render import GLY_LINE_HEIGHT, GLY_LINE_WIDTH, FontSet, Patch

logger = logging.getLogger(__name__)

META_KEY = b"__meta__"
FORMAT = "anytext2-line-renders"
VERSION = 2
"""2: records carry the source image's content digest, the meta a ``render`` settings dict (1: neither)."""
_MAGIC = b"AT2S"
DIGEST_BYTES = 16
_ENTRY_INTS = 9
MISMATCH_MODES = ("error", "warn")


class CacheError(RuntimeError):
    """An LMDB cache that must not be used (corrupt file, options mismatch, unfinished build, wrong format)."""


def render_settings(opts: RenderOptions, font: FontSet) -> dict:
    """Everything that changes a cached render; the meta stores it and the reader compares it key by key.

    ``font_sha1`` covers the whole font set (``--font_dir``), ``font_layout`` the text layout engine (RAQM
    shapes complex scripts, BASIC refuses them)."""
    return dict(asdict(opts), font_sha1=font.sha1, font_layout=font.layout)


def build_meta(opts: RenderOptions, font: FontSet, *, complete: bool, **extra) -> dict:
    return dict(format=FORMAT, version=VERSION, complete=complete, render=render_settings(opts, font),
                font_name=font.path.name, fonts=font.manifest(), **extra)


def _same(have: object, want: object) -> bool:
    if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
        return abs(float(have) - want) < 1e-9
    return have == want


def meta_mismatches(meta: dict, opts: RenderOptions, font: FontSet) -> list[str]:
    """Human-readable differences between a cache's meta and the renders wanted now."""
    if meta.get("format") != FORMAT:
        return [f"format: cache has {meta.get('format')!r}, expected {FORMAT!r}"]
    if meta.get("version") != VERSION:
        return [f"format version: cache has {meta.get('version')!r}, this code reads {VERSION} (the cache was built "
                f"by an older version; rebuild it with build_lmdb_cache --overwrite)"]
    have = meta.get("render") if isinstance(meta.get("render"), dict) else {}
    out = []
    for key, want in render_settings(opts, font).items():
        if not _same(have.get(key), want):
            label = f"font (content sha1; cache built with {meta.get('font_name')!r})" if key == "font_sha1" else key
            out.append(f"{label}: cache has {have.get(key)!r}, requested {want!r}")
    return out


def source_digest(path: str | os.PathLike[str]) -> bytes:
    """Content digest of an image file: a record built from other bytes under the same name is stale."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=DIGEST_BYTES)).digest()


# --------------------------------------------------------------------------------------------------
# data file header check (before LMDB maps the file)

_MDB_MAGIC = 0xBEEFC0DE
_P_META = 0x08
_META_PAGE_HEADERS = {16: 1, 24: 3}  # page-header size -> data format version (LMDB 0.9 -> 1, LMDB 1.0 -> 3)


def check_data_file(path: Path) -> None:
    """Refuse a ``data.mdb`` that is not an LMDB file or is shorter than its committed pages.

    Reads the two meta pages with plain file reads (never mmap) and takes the committed one (higher
    transaction id), as LMDB itself does; LMDB's ``mm_last_pg`` is the last page in use, so a file
    shorter than ``(last_pg + 1) * page_size`` has lost data and would SIGBUS the reader.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
        hdr = next((off for off in range(0, len(head) - 3, 4)
                    if struct.unpack_from("=I", head, off)[0] == _MDB_MAGIC), None)
        if hdr is None or hdr not in _META_PAGE_HEADERS:
            raise CacheError(f"{path}: not an LMDB data file (no LMDB magic in its first page); "
                             f"the file is corrupt or not a cache — rebuild it with build_lmdb_cache --overwrite")
        metas = []
        page_size = 0
        for page in (0, 1):
            fh.seek(page * page_size)
            buf = fh.read(hdr + 136)
            if len(buf) < hdr + 136:
                raise CacheError(f"{path}: truncated ({size} bytes; meta page {page} is incomplete) — "
                                 f"rebuild or re-copy the cache")
            flags = struct.unpack_from("=H", buf, hdr - 6)[0]
            magic, version = struct.unpack_from("=II", buf, hdr)
            psize = struct.unpack_from("=I", buf, hdr + 24)[0]
            last_pg, txnid = struct.unpack_from("=QQ", buf, hdr + 24 + 96)
            if not flags & _P_META or magic != _MDB_MAGIC or version != _META_PAGE_HEADERS[hdr]:
                raise CacheError(f"{path}: LMDB meta page {page} is corrupt; rebuild it with build_lmdb_cache --overwrite")
            if page == 0:
                if psize < 256 or psize & (psize - 1):
                    raise CacheError(f"{path}: LMDB meta page 0 has an impossible page size {psize}; the file is corrupt")
                page_size = psize
            metas.append((txnid, last_pg))
    _, last_pg = max(metas)
    needed = (last_pg + 1) * page_size
    if size < needed:
        raise CacheError(f"{path}: truncated — {size} bytes, but its committed pages need {needed} bytes "
                         f"(an interrupted copy?); re-copy or rebuild the cache")


# --------------------------------------------------------------------------------------------------
# records


def encode_record(image_size: tuple[int, int], renders: dict[int, LineRender], digest: bytes) -> bytes:
    """Serialise the renders of one image (keyed by annotation index) with its file's content digest."""
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"digest must be {DIGEST_BYTES} bytes, got {len(digest)}")
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
    return _MAGIC + digest + zlib.compress(len(head).to_bytes(4, "little") + head + b"".join(body), 1)


@dataclass
class CachedRecord:
    image_size: tuple[int, int]
    digest: bytes
    renders: dict[int, LineRender]


def decode_record(blob: bytes) -> CachedRecord:
    """Inverse of :func:`encode_record`; raises :class:`CacheError` for anything that does not decode."""
    if blob[:4] != _MAGIC:
        raise CacheError("unknown record format")
    digest = bytes(blob[4:4 + DIGEST_BYTES])
    try:
        raw = zlib.decompress(blob[4 + DIGEST_BYTES:])
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
        if pos != len(raw):
            raise ValueError(f"{len(raw) - pos} trailing bytes")
    except (zlib.error, ValueError, IndexError) as exc:
        raise CacheError(f"record does not decode ({type(exc).__name__}: {exc})") from exc
    return CachedRecord((int(header[0]), int(header[1])), digest, renders)


# --------------------------------------------------------------------------------------------------
# per-process readers

_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


def shared_reader(path: Path) -> lmdb.Environment:
    """This process's read-only environment for ``path``, opened on first use (train/val/test share it)."""
    key = str(path)
    entry = _READERS.get(key)
    if entry is not None and entry[0] == os.getpid():
        return entry[1]
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
    _READERS[key] = (os.getpid(), env)
    return env


def close_shared_reader(path: Path) -> None:
    """Drop this process's read handle on ``path`` (the builder does this before writing)."""
    entry = _READERS.pop(str(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def close_all_readers() -> None:
    """Close every reader of this process; they reopen on the next read."""
    for key in list(_READERS):
        close_shared_reader(Path(key))


# An environment inherited through fork is unusable in the child, and py-lmdb refuses to open a second
# one on the same file while the inherited one is registered ("already open in this process"). Closing
# the parent's readers just before every fork gives the child a clean slate.
os.register_at_fork(before=close_all_readers)


def read_meta(env: lmdb.Environment) -> dict | None:
    with env.begin() as txn:
        raw = txn.get(META_KEY)
    return None if raw is None else json.loads(raw.decode("utf-8"))


class LineRenderCache:
    """Read side of the cache, validated against the dataset's render options at construction.

    Holds no LMDB handle itself (pickles as path + meta), so it is safe under fork and spawn.
    """

    def __init__(self, path: str | os.PathLike[str], opts: RenderOptions, font: FontSet) -> None:
        self.path = Path(path).expanduser().resolve()
        data = self.path / "data.mdb"
        if not data.is_file():
            raise FileNotFoundError(f"LMDB cache not found: {self.path} (no data.mdb; build it with "
                                    f"python -m student_model_v2.build_lmdb_cache)")
        check_data_file(data)
        try:
            meta = read_meta(shared_reader(self.path))
        except (lmdb.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheError(f"{self.path}: cannot read the cache's meta record ({type(exc).__name__}: {exc}); "
                             f"rebuild it with build_lmdb_cache --overwrite") from exc
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

    def get_blob(self, key: str) -> bytes | None:
        with shared_reader(self.path).begin(buffers=False) as txn:
            return txn.get(key.encode("ascii"))

    def check_membership(self, keys: list[str], mismatch: str = "error") -> int:
        """How many of ``keys`` (a probe of the dataset's records) the cache holds.

        Fewer than half is a cache built from another dataset (or from a small part of this one):
        :class:`CacheError`, or with ``mismatch="warn"`` a warning (the misses are then counted per
        sample as ``cache.miss``).
        """
        if mismatch not in MISMATCH_MODES:
            raise ValueError(f"mismatch must be one of {MISMATCH_MODES}, got {mismatch!r}")
        found = sum(self.get_blob(k) is not None for k in keys)
        if keys and 2 * found < len(keys):
            message = (f"{self.path}: the LMDB cache holds only {found} of {len(keys)} probed records of this dataset; "
                       f"it was built from {self.meta.get('source_jsons')} — another dataset, or only part of this "
                       f"one. Build it for this dataset (build_lmdb_cache resumes and adds missing images)")
            if mismatch == "error":
                raise CacheError(message + ", or pass --lmdb_mismatch warn to use it anyway (misses rendered online "
                                 "and counted as cache.miss)")
            logger.warning("%s; using it anyway (--lmdb_mismatch warn)", message)
        return found
