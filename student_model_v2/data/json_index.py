"""Streaming random access into AnyText2/AnyWord-3M annotation files, path lists and the data split.

AnyWord-3M JSON files reach several GB, so nothing here keeps parsed records: a one-pass streaming
scan records the byte offset and length of every ``data_list`` item (and its ``wm_score``) in a small
numpy index stored in a cache directory; an item is parsed from the source file only when it is read.
Memory per item is 16 bytes, memory-mapped.

Index files are written to temporary names and renamed into place, and carry the source file's size
and mtime, so a crash or a concurrent build never leaves a stale or truncated index that looks valid.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..anytext2.config import REPO_ROOT

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("wm", "<f4")])
_CHUNK = 1 << 20
_MAX_VALUE_CHARS = 256 << 20  # a single item larger than this is treated as a syntax error
_WS = " \t\n\r"


class DatasetFileError(ValueError):
    """An annotation file that cannot be used as a dataset (names the file)."""


def repo_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` expanded; a relative path is taken relative to the repo root, not the CWD."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def default_cache_dir() -> Path:
    """Where indexes go unless told otherwise: ``$ANYTEXT2_CACHE_DIR`` or ``~/.cache/anytext2_student``."""
    root = os.environ.get("ANYTEXT2_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "anytext2_student"
    return base / "json_index"


class _StreamReader:
    """Character cursor over a UTF-8 file that also tracks the byte offset of the cursor.

    A UTF-8 byte-order mark at the start (Windows editors write one) is skipped.
    """

    def __init__(self, fh) -> None:
        self._fh = fh
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.byte = 0
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:
            self.buf = self.buf[self.pos:]
            self.pos = 0
        data = self._fh.read(_CHUNK)
        at_start = self.byte == 0 and not self.buf
        self.eof = not data
        self.buf += self._decoder.decode(data, final=self.eof)
        if at_start and self.buf.startswith("\ufeff"):
            self.pos = 1
            self.byte = len(codecs.BOM_UTF8)
        return True

    def peek(self) -> str:
        while self.pos >= len(self.buf):
            if not self.fill():
                return ""
        return self.buf[self.pos]

    def _step(self) -> None:
        """Move past one ASCII character (whitespace or JSON punctuation: one byte)."""
        self.pos += 1
        self.byte += 1

    def skip_ws(self) -> None:
        while True:
            ch = self.peek()
            if not ch or ch not in _WS:
                return
            self._step()

    def take(self, allowed: str, where: str) -> str:
        """Consume the next non-blank character, which must be one of ``allowed``; returns it."""
        self.skip_ws()
        got = self.peek()
        if not got or got not in allowed:
            wanted = " or ".join(repr(c) for c in allowed)
            raise ValueError(f"expected {wanted} {where} at byte {self.byte}, found {got!r}")
        self._step()
        return got

    def accept(self, char: str) -> bool:
        """Consume ``char`` if it is the next non-blank character."""
        self.skip_ws()
        if self.peek() != char:
            return False
        self._step()
        return True

    def more_items(self, close: str, where: str) -> bool:
        """After a member or element: True on ``,`` (another follows), False on ``close``."""
        return self.take("," + close, where) == ","

    def value(self, decoder: json.JSONDecoder) -> tuple[object, int, int]:
        """Decode the JSON value at the cursor; returns (value, start byte, length in bytes)."""
        self.skip_ws()
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if len(self.buf) - self.pos < _MAX_VALUE_CHARS and self.fill():
                    continue
                raise
            if end == len(self.buf) and self.fill():
                continue
            break
        start = self.byte
        text = self.buf[self.pos:end]
        length = len(text) if text.isascii() else len(text.encode("utf-8"))
        self.pos = end
        self.byte += length
        return obj, start, length


def scan_json(path: Path) -> tuple[dict, Iterator[tuple[dict, int, int]]]:
    """Stream ``{"data_root": ..., "data_list": [...]}``: returns (header, items).

    ``items`` yields (record, byte offset, byte length) for each ``data_list`` entry; ``header``
    collects the other top-level keys and is complete once ``items`` is exhausted (keys may come in
    any order). Raises :class:`DatasetFileError` for a file that is not such an object.
    """
    header: dict = {}

    def items() -> Iterator[tuple[dict, int, int]]:
        decoder = json.JSONDecoder()
        with open(path, "rb") as fh:
            reader = _StreamReader(fh)
            try:
                reader.take("{", "at the start of the file")
                seen_list = False
                more = not reader.accept("}")
                while more:
                    key, start, _ = reader.value(decoder)
                    if not isinstance(key, str):
                        raise ValueError(f"expected a string key at byte {start}, found {key!r}")
                    reader.take(":", f"after key {key!r}")
                    if key == "data_list":
                        seen_list = True
                        yield from _scan_list(reader, decoder)
                    else:
                        header[key], _, _ = reader.value(decoder)
                    more = reader.more_items("}", "after a top-level value")
            except (ValueError, UnicodeDecodeError) as exc:
                raise DatasetFileError(f"{path}: not a valid AnyText2 JSON file: {exc}") from exc
        if not seen_list:
            raise DatasetFileError(f"{path}: no 'data_list' key (expected {{'data_root': ..., 'data_list': [...]}})")

    return header, items()


def _scan_list(reader: _StreamReader, decoder: json.JSONDecoder) -> Iterator[tuple[dict, int, int]]:
    reader.take("[", "to open data_list")
    more = not reader.accept("]")
    while more:
        yield reader.value(decoder)
        more = reader.more_items("]", "in data_list")


def _scan_jsonl(path: Path) -> Iterator[tuple[dict, int, int]]:
    offset = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    record = json.loads(line)  # bytes: a BOM on the first line is accepted
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DatasetFileError(f"{path}:{lineno}: invalid JSON line: {exc}") from exc
                yield record, offset, len(line)
            offset += len(line)


def wm_score(record: object) -> tuple[float | None, bool]:
    """(the record's ``wm_score``, whether it is malformed). Documented rule: a score that is not a finite
    number (a string, null, a bool, NaN) is malformed and treated as absent — the item is kept, not
    filtered, and gets no watermark caption tag — and counted (``fix.bad_wm_score`` per sample)."""
    if not isinstance(record, dict) or "wm_score" not in record:
        return None, False
    score = record["wm_score"]
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return float(score), False
    return None, True


def _index_wm(record: object) -> float:
    score, _ = wm_score(record)
    return float("nan") if score is None else score


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JsonIndex:
    """Random access to the items of one annotation file without holding parsed records.

    Accepts ``.json`` (``{"data_root", "data_list"}``) and ``.jsonl`` (one item per line, with
    ``data_root`` in a sidecar ``<stem>.meta.json``). Items with ``wm_score > wm_thresh`` are left out
    (AnyText2's rule; the default 1.0 keeps everything). ``len(index)`` counts kept items.
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                 wm_thresh: float = 1.0) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset file not found: {self.path}")
        self.wm_thresh = float(wm_thresh)
        cache = repo_path(cache_dir) if cache_dir else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(str(self.path).encode("utf-8")).hexdigest()[:12]
        self._index_file = cache / f"{self.path.name}.{digest}.idx.npy"
        self._meta_file = cache / f"{self.path.name}.{digest}.meta.json"
        meta = self._load_or_build()
        if meta.get("bad_wm_score"):
            logger.warning("%s: %d item(s) have a non-numeric wm_score; they are kept and treated as having no "
                           "score (counted as fix.bad_wm_score)", self.path, meta["bad_wm_score"])
        self.data_root: str = meta["data_root"]
        self.total = int(meta["count"])
        self._open_arrays()

    def _source_stamp(self) -> dict:
        st = self.path.stat()
        return {"source": str(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": INDEX_VERSION}

    def _load_or_build(self) -> dict:
        stamp = self._source_stamp()
        if self._meta_file.is_file() and self._index_file.is_file():
            try:
                meta = json.loads(self._meta_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                meta = {}
            fresh = all(meta.get(k) == v for k, v in stamp.items())
            if fresh and meta.get("index_bytes") == self._index_file.stat().st_size:
                return meta
        return self._build(stamp)

    def _build(self, stamp: dict) -> dict:
        if self.path.suffix == ".jsonl":
            header = self._jsonl_header()
            items = _scan_jsonl(self.path)
        else:
            header, items = scan_json(self.path)
        bad_wm = 0

        def rows() -> Iterator[tuple[int, int, float]]:
            nonlocal bad_wm
            for record, offset, length in items:
                bad_wm += wm_score(record)[1]
                yield offset, length, _index_wm(record)

        table = np.fromiter(rows(), INDEX_DTYPE)
        data_root = header.get("data_root", "")
        if not isinstance(data_root, str):
            raise DatasetFileError(f"{self.path}: 'data_root' must be a string, got {type(data_root).__name__}")
        _atomic_write(self._index_file, lambda fh: np.save(fh, table, allow_pickle=False))
        meta = dict(stamp, data_root=data_root, count=len(table), bad_wm_score=bad_wm,
                    index_bytes=self._index_file.stat().st_size)
        _atomic_write(self._meta_file, lambda fh: fh.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
        return meta

    def _jsonl_header(self) -> dict:
        sidecar = self.path.with_name(self.path.stem + ".meta.json")
        if not sidecar.is_file():
            raise DatasetFileError(f"{self.path}: a .jsonl dataset needs {sidecar.name} with its data_root")
        try:
            header = json.loads(sidecar.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetFileError(f"{sidecar}: invalid JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise DatasetFileError(f"{sidecar}: expected an object with 'data_root', got {type(header).__name__}")
        return header

    def _open_arrays(self) -> None:
        self._pid = os.getpid()
        self._fh = None
        self._table = np.load(self._index_file, mmap_mode="r", allow_pickle=False)
        keep = ~(self._table["wm"] > self.wm_thresh)
        self._kept: np.ndarray | None = None if keep.all() else np.flatnonzero(keep)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_fh", "_table", "_kept"):
            state[key] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_arrays()

    def __len__(self) -> int:
        return self.total if self._kept is None else len(self._kept)

    def position(self, i: int) -> int:
        """Position of kept item ``i`` in the file's ``data_list``."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {self.path} ({len(self)} items)")
        return int(i if self._kept is None else self._kept[i])

    def __getitem__(self, i: int) -> dict:
        """Item ``i`` parsed afresh from the source file (callers may modify it freely)."""
        offset, length, _ = self._table[self.position(i)]
        if self._fh is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._fh = open(self.path, "rb")
        self._fh.seek(int(offset))
        raw = self._fh.read(int(length))
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetFileError(f"{self.path}: item {i} at byte {int(offset)} is not valid JSON "
                                   f"(file changed after indexing?): {exc}") from exc
        return record


def expand_dataset_paths(specs: Sequence[str | os.PathLike[str]], base: Path = REPO_ROOT) -> list[Path]:
    """Dataset files named by ``specs``: paths, comma-separated lists, and ``.list``/``.txt`` files
    with one path per line (``#`` comments). Relative paths resolve against ``base`` (the repo root,
    not the CWD); inside a list file, against the list file's directory."""
    out: list[Path] = []

    def resolve(entry: str, rel: Path) -> Path:
        p = Path(entry).expanduser()
        return p if p.is_absolute() else rel / p

    def add(entry: str, rel: Path, depth: int) -> None:
        for part in (s.strip() for s in entry.split(",")):
            if not part:
                continue
            p = resolve(part, rel)
            if p.suffix in (".list", ".txt"):
                if depth > 4:
                    raise DatasetFileError(f"{p}: list files nested too deeply")
                if not p.is_file():
                    raise FileNotFoundError(f"dataset list file not found: {p}")
                try:
                    text = p.read_text(encoding="utf-8-sig")
                except UnicodeDecodeError as exc:
                    raise DatasetFileError(f"{p}: dataset list file is not UTF-8 text (byte {exc.start}: "
                                           f"{exc.reason}); save it as UTF-8") from exc
                for line in text.splitlines():
                    line = line.split("#", 1)[0].strip()
                    if line:
                        add(line, p.parent, depth + 1)
            else:
                out.append(p.resolve())

    for spec in specs:
        add(str(spec), base, 0)
    return out


DEFAULT_SPLIT_RATIOS = (0.9, 0.05, 0.05)


def split_lengths(total: int, ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS) -> tuple[int, int, int]:
    """(train, val, test) sizes: val/test = floor(total * ratio), at least 1 when their ratio is
    positive and total >= 3; train takes the rest. Fewer than 3 items all go to train."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {tuple(ratios)}")
    if total < 3:
        return total, 0, 0
    val = max(1, int(total * ratios[1])) if ratios[1] > 0 else 0
    test = max(1, int(total * ratios[2])) if ratios[2] > 0 else 0
    return total - val - test, val, test


def split_indices(total: int, ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS,
                  seed: int = 42) -> dict[str, np.ndarray]:
    """Deterministic image-level split: a seeded permutation cut by :func:`split_lengths`.

    Each part is returned sorted, which keeps reads from the streaming index roughly sequential.
    """
    n_train, n_val, _ = split_lengths(total, ratios)
    perm = np.random.default_rng(seed).permutation(total)
    parts = np.split(perm, [n_train, n_train + n_val])
    return {name: np.sort(part) for name, part in zip(("train", "val", "test"), parts)}
