"""Build the LMDB cache of per-line renders (glyphs, glyph line, font-hint base) for AnyText2 datasets.

    python -m student_model_v2.build_lmdb_cache \
        --dataset_json demodataset/annotations/demo_data.json --output_lmdb dataset_cache/demo_lmdb

Resumable: re-running with the same options skips images already stored (an interrupted build picks up
where it stopped; a grown dataset only renders the new images). Safe: the meta record's ``complete``
flag is set only after the last record is committed, and the dataset refuses a cache without it.
Different render options on an existing cache, or a cache built by an older version of this tool (format
version 1: no image digests), are an error unless ``--overwrite``. Every record stores the content digest
of its image file, so training re-renders (and counts as ``cache.stale``) an image replaced after the build.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

from student_model_v2.data.anytext_record import RenderOptions
from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH
from student_model_v2.data.lmdb_build import build_cache


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_json", nargs="+", required=True,
                        help="JSON/JSONL files, comma lists or .list/.txt files (relative to the repo root)")
    parser.add_argument("--output_lmdb", required=True, help="cache directory (created; relative to the repo root)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--max_chars", type=int, default=20)
    parser.add_argument("--font_path", default=str(DEFAULT_FONT_PATH))
    parser.add_argument("--font_dir", default=None,
                        help="folder of fonts: each line drawn in one that covers it (as the dataset's --font_dir)")
    parser.add_argument("--glyph_scale", type=float, default=1.0)
    parser.add_argument("--vert_ang", type=float, default=10.0)
    parser.add_argument("--add_space", action=argparse.BooleanOptionalAction, default=True,
                        help="AnyText2's inter-letter spacing in glyphs (--no-add_space to disable)")
    parser.add_argument("--wm_thresh", type=float, default=1.0, help="skip items with wm_score > this")
    parser.add_argument("--cache_dir", default=None, help="where the JSON offset indexes go")
    parser.add_argument("--num_workers", type=int, default=4, help="render processes (0 = in-process)")
    parser.add_argument("--commit_interval", type=int, default=200, help="records per LMDB transaction")
    parser.add_argument("--map_size_gb", type=float, default=256, help="LMDB map size (sparse) in GiB")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing cache in --output_lmdb")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items (smoke tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = RenderOptions(resolution=args.resolution, max_chars=args.max_chars, glyph_scale=args.glyph_scale,
                         vert_ang=args.vert_ang, add_space=args.add_space)
    meta = build_cache(args.dataset_json, args.output_lmdb, opts=opts, font_path=args.font_path, font_dir=args.font_dir,
                       num_workers=args.num_workers, commit_interval=args.commit_interval,
                       map_size_gb=args.map_size_gb, overwrite=args.overwrite, wm_thresh=args.wm_thresh,
                       cache_dir=args.cache_dir, limit=args.limit, progress=sys.stderr.isatty())
    print(json.dumps(meta, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
