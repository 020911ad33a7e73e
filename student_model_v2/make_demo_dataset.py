"""Generate AnyText2-format data from scratch: images with real rendered text and exact annotations.

Used for the committed ``demodataset/`` (quick start, tests, benchmark) and, in memory, by the mock
dataset. Every image is a deterministic function of (seed, index), so any sample regenerates alone.

Each image: a smooth random background (gradients, blurred blobs, shapes, flat fills — smooth so the
JPEGs stay small), 1-5 text lines in Chinese or Latin, horizontal, rotated or vertical, coloured for
contrast with the local background. Annotations follow the AnyWord-3M schema: ``polygon`` (integer
corners of the text box, clockwise from the text's top-left), ``text``, ``language``, ``color``
(exact in ~70 % of lines, absent in ~20 %, the 500 sentinel in ~10 %), ``valid: false`` on a few
blurred lines, ``rec_score``; per image ``caption`` (a few containing ``*``, a few past 128 words, a
few absent) and ``wm_score`` on about half the images.

    python -m student_model_v2.make_demo_dataset --out demodataset --count 48 --seed 0
"""

from __future__ import annotations

import argparse

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH
from student_model_v2.data.synthetic import make_demo_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demodataset", help="output folder (imgs/ and annotations/ inside)")
    parser.add_argument("--count", type=int, default=48, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--font_path", default=str(DEFAULT_FONT_PATH))
    args = parser.parse_args(argv)
    path = make_demo_dataset(args.out, args.count, args.seed, args.size, args.quality, args.font_path)
    print(f"wrote {args.count} images and {path}")


if __name__ == "__main__":
    main()
