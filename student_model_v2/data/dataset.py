"""AnyText2 training samples: the conditioning the teacher was trained with (upstream T3 semantics).

Layout contract (every image-like tensor is channel-first; collated batches are NCHW):

=============== ======================================= =============================================
field           per sample                              batch (``collate_fn``)
=============== ======================================= =============================================
img             float32 [3,H,W] in [-1,1]               [B,3,H,W]
masked_img      float32 [3,H,W] in [-1,1]               [B,3,H,W]
hint            float32 [1,H,W] {0,1}                   [B,1,H,W]
font_hint       float32 [1,H,W] {0,1}                   [B,1,H,W]
inv_mask        float32 [1,H,W] {0,1}                   [B,1,H,W]
glyphs          L x float32 [3,sH,sW] in [0,1]          L x [B,3,sH,sW]   (s = glyph_scale)
gly_line        L x float32 [1,80,512] {0,1}            L x [B,1,80,512]
positions       L x float32 [1,H,W] {0,1}               L x [B,1,H,W]
color           L x float32 [3] = RGB/255 (500/255 =    L x [B,3]
                "no colour")
texts, language L x str (padding ' ')                   L x list[B] of str  (indexed [line][sample])
fonts           L x str: font file name (padding '')    L x list[B] of str  (font of each line)
n_lines         int                                     int64 [B]
img_caption,    str                                     list[B] of str
text_caption
sample_id       str ("<json file>:<img_name>")          list[B] of str
data_issues     dict[str, int]                          dict[str, int], summed over the batch
=============== ======================================= =============================================

L = ``max_lines``; lines past ``n_lines`` are zero tensors, the 500 colour sentinel and text ' '.

Problems are skipped and counted, never rendered blank: an unusable record (missing/corrupt image,
malformed record) is replaced by the next index and counted as ``sample.<kind>``; an unusable line is
dropped and counted as ``line.<kind>`` (its area kept out of the loss through ``inv_mask``). Counts
travel with each sample in ``data_issues`` (so they survive DataLoader workers; the trainer sums the
batch values) and the dataset object also accumulates what its own process saw
(:meth:`AnyTextDataset.issue_counts`).

Randomness: every access draws from its own generator, seeded from ``(seed, epoch, index)`` when a
seed is given (reproducible; call :meth:`set_epoch` for new draws per epoch) or from OS entropy.
Records are re-read from the file on every access, so nothing accumulates across epochs.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .anytext_record import (
    TEXT_CAPTION_PHRASES,
    LineAnn,
    LineRender,
    RenderOptions,
    SampleError,
    fake_line,
    find_image,
    image_caption,
    image_roots,
    load_image,
    parse_annotations,
    record_cache_key,
    render_line_text,
    squash_to,
    text_caption,
)
from .glyph_render import (
    COLOR_SENTINEL,
    DEFAULT_FONT_PATH,
    GLY_LINE_HEIGHT,
    GLY_LINE_WIDTH,
    FontSet,
    GlyphFont,
    HintAugment,
    Patch,
    as_font_set,
    colorize,
    empty_patch,
    fill_polygon,
    font_hint_base,
    is_small_line,
    occlude_font_hint,
    render_position,
    sample_position_morph,
)
from .json_index import (
    DEFAULT_SPLIT_RATIOS,
    DatasetFileError,
    JsonIndex,
    expand_dataset_paths,
    split_indices,
    wm_score,
)
from .lmdb_glyph_cache import CacheError, LineRenderCache, decode_record, source_digest
from .synthetic import synth_sample

logger = logging.getLogger(__name__)

SAMPLE_TENSOR_KEYS = ("img", "masked_img", "hint", "font_hint", "inv_mask")
LINE_TENSOR_KEYS = ("glyphs", "gly_line", "positions", "color")
LINE_STR_KEYS = ("texts", "language", "fonts")
STR_KEYS = ("img_caption", "text_caption", "sample_id")


class _RenderedLine(NamedTuple):
    line: LineAnn
    color: tuple[int, int, int]
    glyphs: np.ndarray
    gly_line: np.ndarray
    hint_base: Patch | None


class SampleBuilder:
    """Turns (record, decoded image) into a sample; shared by the real and the mock dataset.

    Both datasets pass their sample options straight through, so these keyword defaults are the one
    place the dataset defaults live (upstream ``train.py`` values, see docs/data.md).
    """

    def __init__(self, *, resolution: int = 512, max_lines: int = 5, max_chars: int = 20,
                 font_path: str | os.PathLike[str] = DEFAULT_FONT_PATH,
                 font_dir: str | os.PathLike[str] | None = None, glyph_scale: float = 1.0,
                 vert_ang: float = 10.0, add_space: bool = True, mask_img_prob: float = 0.5,
                 mask_pos_prob: float = 1.0, font_hint_prob: float = 0.8,
                 font_hint_area: Sequence[float] = (0.7, 1.0), font_hint_randaug: bool = True,
                 color_prob: float = 1.0, trunc_cap: int = 128, cap_watermark: bool = True,
                 caption_phrases: Sequence[str] = TEXT_CAPTION_PHRASES,
                 lmdb_path: str | os.PathLike[str] | None = None) -> None:
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if max_lines < 1 or max_chars < 1:
            raise ValueError(f"max_lines and max_chars must be >= 1, got {max_lines}, {max_chars}")
        if glyph_scale < 1 or float(glyph_scale * resolution) != int(glyph_scale * resolution):
            raise ValueError(f"glyph_scale must be >= 1 and glyph_scale * resolution a whole number of pixels, "
                             f"got {glyph_scale}")
        lo, hi = (float(v) for v in font_hint_area)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"font_hint_area must satisfy 0 <= lo <= hi <= 1, got {tuple(font_hint_area)}")
        if not caption_phrases or any("*" in p for p in caption_phrases):
            raise ValueError("caption_phrases must be non-empty and must not contain the '*' placeholder")
        self.font = GlyphFont(font_path)  # also draws the mock dataset's synthetic images
        # what lines are rendered in: font_dir's fonts (a covering one chosen per line), else font_path's
        self.fonts = FontSet.load(font_dir=font_dir) if font_dir is not None else as_font_set(self.font)
        self.render_opts = RenderOptions(resolution=resolution, max_chars=max_chars, glyph_scale=float(glyph_scale),
                                         vert_ang=float(vert_ang), add_space=bool(add_space))
        self.resolution = resolution
        self.glyph_size = int(glyph_scale * resolution)
        self.max_lines = max_lines
        self.mask_img_prob = mask_img_prob
        self.mask_pos_prob = mask_pos_prob
        self.font_hint_prob = font_hint_prob
        self.font_hint_area = (lo, hi)
        self.font_hint_randaug = font_hint_randaug
        self.color_prob = color_prob
        self.trunc_cap = trunc_cap
        self.cap_watermark = cap_watermark
        self.caption_phrases = tuple(caption_phrases)
        self.cache = LineRenderCache(lmdb_path, self.render_opts, self.fonts) if lmdb_path else None
        self._corrupt_logged = 0

    def _line_render(self, line: LineAnn, cached: dict[int, LineRender] | None,
                     issues: Counter) -> tuple[Patch, np.ndarray, Patch | None]:
        """(glyph coverage, OCR strip, font-hint base or None) of a line — from the cache when it has it."""
        if cached is not None:
            hit = cached.get(line.ann_index)
            if hit is not None:
                return hit.glyph, hit.gly_line, hit.hint_base
            issues["cache.miss_line"] += 1
        glyph, strip = render_line_text(line, self.render_opts)
        return glyph, strip, None

    def _cached_renders(self, record: dict, image_size: tuple[int, int], source: Path | None,
                        issues: Counter, where: str) -> dict | None:
        """The record's cached renders, or None (counted) when absent, undecodable or built from another
        version of the image (other size or other file content)."""
        if self.cache is None:
            return None
        blob = self.cache.get_blob(record_cache_key(record))
        if blob is None:
            issues["cache.miss"] += 1
            return None
        try:
            entry = decode_record(blob)
        except CacheError as exc:
            issues["cache.corrupt"] += 1
            self._corrupt_logged += 1
            if self._corrupt_logged <= 20:
                logger.warning("corrupt LMDB record for %s in %s (%s): rendering online", where, self.cache.path, exc)
            return None
        if entry.image_size != tuple(image_size) or source is None or entry.digest != source_digest(source):
            issues["cache.stale"] += 1
            return None
        issues["cache.hit"] += 1
        return entry.renders

    def build(self, record: dict, image: np.ndarray, image_size: tuple[int, int], rng: np.random.Generator,
              issues: Counter, where: str, source: Path | None = None) -> dict:
        """One sample from a record and its (resolution, resolution, 3) uint8 image of stored size
        ``image_size`` read from file ``source`` (checked against the LMDB record's digest); upstream T3
        order of operations, all random draws from ``rng``."""
        R, L = self.resolution, self.max_lines
        edit_mode = bool(rng.random() < self.mask_img_prob)
        raw_caption = record.get("caption")
        if raw_caption is not None and not isinstance(raw_caption, str):
            issues["fix.bad_caption"] += 1
        score, bad_score = wm_score(record)
        if bad_score:
            issues["fix.bad_wm_score"] += 1
        caption = image_caption(raw_caption, score, rng, max_words=self.trunc_cap, cap_watermark=self.cap_watermark)
        key = record_cache_key(record)
        parsed = parse_annotations(record.get("annotations"), image_size=image_size, resolution=R,
                                   max_chars=self.render_opts.max_chars, font=self.fonts, where=where, record_key=key)
        issues.update(parsed.issues)
        lines, ignore = parsed.lines, list(parsed.ignore_polygons)
        if len(lines) > L:
            order = rng.permutation(len(lines))
            ignore += [lines[k].polygon for k in order[L:]]
            lines = [lines[k] for k in order[:L]]
        colors = []
        for line in lines:
            keep = self.color_prob >= 1.0 or rng.random() < self.color_prob
            colors.append(line.color if keep else (COLOR_SENTINEL,) * 3)
        phrase = self.caption_phrases[int(rng.integers(len(self.caption_phrases)))]

        G = self.glyph_size
        cached = self._cached_renders(record, image_size, source, issues, where) if lines else None
        rendered: list[_RenderedLine] = []
        for line, color in zip(lines, colors):
            glyph, strip, hint_base = self._line_render(line, cached, issues)
            if not glyph.visible_in(G, G):
                issues["line.glyph_outside"] += 1
                ignore.append(line.polygon)
                continue
            rendered.append(_RenderedLine(line, color, colorize(glyph, color, G, G), strip, hint_base))
        if not rendered:
            blank = fake_line(R)
            issues["fix.fake_line"] += 1
            rendered = [_RenderedLine(blank, blank.color, np.zeros((3, G, G), np.float32),
                                      np.zeros((GLY_LINE_HEIGHT, GLY_LINE_WIDTH), np.uint8), None)]

        positions = []
        hint = np.zeros((R, R), np.uint8)
        font_hint = np.zeros((R, R), np.uint8)
        for line, _, _, _, hint_base in rendered:
            if self.mask_pos_prob >= 1.0 or rng.random() < self.mask_pos_prob:
                morph = sample_position_morph(float(rng.random()), is_small_line(line.polygon, R))
                pos = render_position(line.polygon, R, R, morph)
            else:
                pos = empty_patch()
            positions.append(pos)
            pos.paste_max(hint)
            if self.font_hint_prob > 0 and rng.random() >= 1.0 - self.font_hint_prob:
                augment = HintAugment.sample(rng) if self.font_hint_randaug else None
                area = float(rng.uniform(*self.font_hint_area))
                offset = float(rng.random())
                if hint_base is None or augment is not None:
                    hint_base = font_hint_base(image, line.polygon, augment)
                occlude_font_hint(hint_base, line.polygon, R, R, area, offset).paste_max(font_hint)

        inv_mask = np.zeros((R, R), np.uint8)
        if not edit_mode:
            for poly in ignore:
                fill_polygon(poly, R, R).paste_max(inv_mask)

        img = image.transpose(2, 0, 1).astype(np.float32)
        img *= np.float32(1.0 / 127.5)
        img -= np.float32(1.0)
        if edit_mode:
            masked = np.clip(img - np.float32(10.0) * hint, -1.0, 1.0)
        else:
            masked = np.full_like(img, -1.0)
        n = len(rendered)
        pad = L - n
        return {
            "img": torch.from_numpy(img),
            "masked_img": torch.from_numpy(masked),
            "hint": _mask_tensor(hint),
            "font_hint": _mask_tensor(font_hint),
            "inv_mask": _mask_tensor(inv_mask),
            "glyphs": [torch.from_numpy(r.glyphs) for r in rendered] + [_zeros(3, G, G) for _ in range(pad)],
            "gly_line": [_mask_tensor(r.gly_line) for r in rendered]
            + [_zeros(1, GLY_LINE_HEIGHT, GLY_LINE_WIDTH) for _ in range(pad)],
            "positions": [_mask_tensor(p.to_canvas(R, R)) for p in positions] + [_zeros(1, R, R) for _ in range(pad)],
            "color": [torch.from_numpy(np.asarray(r.color, np.float32) / np.float32(255.0)) for r in rendered]
            + [torch.from_numpy(np.full(3, COLOR_SENTINEL / 255.0, np.float32)) for _ in range(pad)],
            "texts": [r.line.text for r in rendered] + [" "] * pad,
            "language": [r.line.language for r in rendered] + [" "] * pad,
            "fonts": [r.line.font.path.name if r.line.font is not None else "" for r in rendered] + [""] * pad,
            "n_lines": n,
            "img_caption": caption,
            "text_caption": text_caption(n, phrase),
        }


def _zeros(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.zeros(shape, np.float32))


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """uint8 {0,1} (H, W) -> float32 [1, H, W]; numpy does the arithmetic so sample building never
    touches torch's intra-op thread pool (which thrashes on busy CPUs)."""
    return torch.from_numpy(mask.astype(np.float32)[None])


class _BaseDataset(Dataset):
    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.epoch = 0
        self._issues: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        """New random draws for every epoch when a seed is set (like DistributedSampler.set_epoch).

        DataLoader workers hold copies of the dataset, so a loader passes the epoch with every index
        instead (``dataset[(epoch, index)]``, see :class:`EpochSubset`); this is for direct use.
        """
        self.epoch = int(epoch)

    def _unpack(self, item: int | tuple[int, int]) -> tuple[int, int]:
        """(epoch, index) of ``dataset[index]`` (this object's epoch) or ``dataset[(epoch, index)]``."""
        if isinstance(item, tuple):
            epoch, index = item
            return int(epoch), int(index)
        return self.epoch, int(item)

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, epoch, index])

    def issue_counts(self) -> dict[str, int]:
        """Skips and fixes seen by this process (the main process only when num_workers > 0; use the
        batches' ``data_issues`` then)."""
        return dict(self._issues)

    def _finish(self, sample: dict, issues: Counter) -> dict:
        sample["data_issues"] = dict(issues)
        self._issues.update(issues)
        return sample


class AnyTextDataset(_BaseDataset):
    """Samples from one or more AnyText2 / AnyWord-3M annotation files (``.json`` or ``.jsonl``).

    ``dataset_json`` takes paths, comma lists and ``.list``/``.txt`` files (see
    :func:`json_index.expand_dataset_paths`). Items with ``wm_score > wm_thresh`` are dropped.
    ``sample_options`` are :class:`SampleBuilder`'s keywords (resolution, max_lines, ..., lmdb_path). With
    ``lmdb_path`` the glyph renders come from a cache built by ``build_lmdb_cache`` (validated against
    these options and probed for this dataset's records: ``lmdb_mismatch="error"`` refuses a cache built
    from another dataset, ``"warn"`` uses it with a warning and counted misses); the font hint still
    comes out of the cache only with ``font_hint_randaug=False``. With
    ``font_dir`` each line is drawn in one of that folder's fonts that covers it (see :class:`FontSet`).

    Start-up fails, naming the file, for a missing/unreadable file, a file without ``data_list``, a
    dataset with no items, and (``validate=True``) a dataset where no item makes a usable sample.
    """

    def __init__(self, dataset_json: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                 wm_thresh: float = 1.0, cache_dir: str | os.PathLike[str] | None = None, seed: int | None = None,
                 validate: bool = True, max_retries: int = 16, lmdb_mismatch: str = "error",
                 **sample_options) -> None:
        super().__init__(seed)
        specs = [dataset_json] if isinstance(dataset_json, (str, os.PathLike)) else list(dataset_json)
        self.json_paths = expand_dataset_paths(specs)
        if not self.json_paths:
            raise DatasetFileError(f"no dataset files in {specs!r}")
        self.builder = SampleBuilder(**sample_options)
        self.indexes = [JsonIndex(p, cache_dir=cache_dir, wm_thresh=wm_thresh) for p in self.json_paths]
        self._roots = [image_roots(ix.data_root, ix.path) for ix in self.indexes]
        self._starts = np.cumsum([0] + [len(ix) for ix in self.indexes])
        self.max_retries = max_retries
        if len(self) == 0:
            names = ", ".join(str(p) for p in self.json_paths)
            raise DatasetFileError(f"dataset is empty (no items after the wm_thresh={wm_thresh} filter): {names}")
        if self.builder.cache is not None:
            self.builder.cache.check_membership(self._probe_keys(), lmdb_mismatch)
        if validate:
            self._validate()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _probe_keys(self, count: int = 32) -> list[str]:
        """LMDB keys of up to ``count`` records spread evenly over the dataset (the cache membership probe)."""
        keys = []
        for index in np.unique(np.linspace(0, len(self) - 1, min(count, len(self))).astype(int)):
            f, local = self._locate(int(index))
            record = self.indexes[f][local]
            if isinstance(record, dict) and isinstance(record.get("img_name"), str) and record["img_name"]:
                keys.append(record_cache_key(record))
        return keys

    def _locate(self, index: int) -> tuple[int, int]:
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, index - int(self._starts[f])

    def _load(self, index: int, rng: np.random.Generator, issues: Counter) -> dict:
        f, local = self._locate(index)
        source = self.indexes[f]
        record = source[local]
        name = record.get("img_name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name:
            raise SampleError("bad_record", f"{source.path}: item {source.position(local)} has no img_name")
        where = f"{source.path.name}:{name}"
        path = find_image(self._roots[f], name)
        if path is None:
            roots = ", ".join(str(r) for r in self._roots[f])
            raise SampleError("missing_image", f"{source.path}: image {name!r} not found under {roots}")
        image, size = load_image(path, self.builder.resolution)
        sample = self.builder.build(record, image, size, rng, issues, where, source=path)
        sample["sample_id"] = where
        return sample

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = self._unpack(item)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range ({len(self)} samples)")
        index %= len(self)
        issues: Counter = Counter()
        last = None
        for attempt in range(self.max_retries + 1):
            current = (index + attempt) % len(self)
            try:
                return self._finish(self._load(current, self._rng(current, epoch), issues), issues)
            except SampleError as exc:
                issues[f"sample.{exc.kind}"] += 1
                last = exc
                if sum(v for k, v in self._issues.items() if k.startswith("sample.")) < 20:
                    logger.warning("skipping sample: %s", exc)
        self._issues.update(issues)
        raise RuntimeError(f"{self.max_retries + 1} consecutive unusable samples from index {index} "
                           f"({', '.join(str(p) for p in self.json_paths)}); last: {last}")

    def _validate(self) -> None:
        """Fail at start-up when no item is usable (stops at the first usable one)."""
        kinds: Counter = Counter()
        last: SampleError | None = None
        for index in range(len(self)):
            try:
                self._load(index, self._rng(index, self.epoch), Counter())
                return
            except SampleError as exc:
                kinds[exc.kind] += 1
                last = exc
        names = ", ".join(str(p) for p in self.json_paths)
        raise DatasetFileError(f"no usable sample in {names}: {dict(kinds)}; last problem: {last}")


MOCK_FRAME = 512


class MockAnyTextDataset(_BaseDataset):
    """``--use_mock_dataset``: synthetic images with real rendered text (the demo generator, in
    memory) run through the same sample builder, so the contract is identical and no files are read
    besides the font. Samples are drawn in a 512 frame and scaled to ``resolution`` like real images,
    so any resolution works. ``sample_options`` are :class:`SampleBuilder`'s keywords except ``lmdb_path``."""

    def __init__(self, size: int = 1000, *, seed: int | None = 0, data_seed: int = 0, **sample_options) -> None:
        super().__init__(seed)
        if "lmdb_path" in sample_options:
            raise TypeError("MockAnyTextDataset renders every sample online; it takes no lmdb_path")
        self.size = size
        self.data_seed = data_seed
        self.builder = SampleBuilder(**sample_options)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = self._unpack(item)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range ({self.size} mock samples)")
        image, record = synth_sample(self.data_seed, index, MOCK_FRAME, self.builder.font)
        image = squash_to(image, self.builder.resolution)
        issues: Counter = Counter()
        sample = self.builder.build(record, image, (MOCK_FRAME, MOCK_FRAME), self._rng(index, epoch), issues,
                                    f"mock:{index}")
        sample["sample_id"] = f"mock:{index}"
        return self._finish(sample, issues)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` through numpy: same result, but no intra-op thread pool (several times faster
    in a loader process on a busy CPU)."""
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def collate_fn(samples: Sequence[dict]) -> dict:
    """Stack samples into the teacher's batch layout (see the module docstring)."""
    if not samples:
        raise ValueError("collate_fn got an empty list of samples")
    n_lines = {len(s["glyphs"]) for s in samples}
    if len(n_lines) != 1:
        raise ValueError(f"samples have different max_lines: {sorted(n_lines)}")
    L = n_lines.pop()
    batch: dict = {k: _stack([s[k] for s in samples]) for k in SAMPLE_TENSOR_KEYS}
    for k in LINE_TENSOR_KEYS:
        batch[k] = [_stack([s[k][j] for s in samples]) for j in range(L)]
    for k in LINE_STR_KEYS:
        batch[k] = [[s[k][j] for s in samples] for j in range(L)]
    for k in STR_KEYS:
        batch[k] = [s[k] for s in samples]
    batch["n_lines"] = torch.tensor([s["n_lines"] for s in samples], dtype=torch.int64)
    issues: Counter = Counter()
    for s in samples:
        issues.update(s.get("data_issues", {}))
    batch["data_issues"] = dict(issues)
    return batch


class EpochSubset(Subset):
    """A ``Subset`` that also takes ``(epoch, index)`` items and passes the epoch through.

    The loaders' samplers yield such pairs, so every sample's random draws follow the sampler's epoch
    even in persistent DataLoader workers, whose dataset copies never see ``set_epoch``.
    """

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        if isinstance(item, tuple):
            epoch, index = item
            return self.dataset[(epoch, self.indices[index])]
        return self.dataset[self.indices[item]]

    def __getitems__(self, items: list) -> list[dict]:
        return [self[item] for item in items]


def make_splits(dataset: Dataset, ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS, seed: int = 42) -> dict[str, Subset]:
    """Deterministic train/val/test subsets at image level (see :func:`json_index.split_indices`)."""
    parts = split_indices(len(dataset), ratios, seed)
    return {name: EpochSubset(dataset, idx.tolist()) for name, idx in parts.items()}
