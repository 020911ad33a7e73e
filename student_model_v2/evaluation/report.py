"""What the evaluations leave behind: ``report.md``, a bar chart and sample grids (PIL only), and JSON files.

The chart has one panel of Sen.ACC / NED bars per language group (overall first), one bar per model,
and, for generated images, a panel of seconds per image with the speed-up. A grid row is the prompt
(the ground-truth lines drawn in their polygons, the caption below) followed by each model's first
image with what the OCR read on every line underneath (green: exact match, red: not).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.glyph_render import GlyphFont, colorize, render_glyphs

MODEL_COLORS = ((70, 110, 190), (230, 140, 40), (80, 160, 90), (150, 90, 170))
GRIDS_PER_FILE = 4
OK_COLOR, BAD_COLOR, INK = (20, 130, 40), (200, 30, 30), (30, 30, 30)
STAGES = ("prepare", "encode", "sample", "decode")


@dataclass(frozen=True, eq=False)
class GridCell:
    """One model's image of a prompt and its reads: (prediction, ground truth, exact match) per line."""

    image: np.ndarray
    reads: list[tuple[str, str, bool]]


@dataclass(frozen=True, eq=False)
class GridRow:
    caption: str
    lines: list[tuple[str, np.ndarray]]
    cells: list[GridCell]


def write_json(data: dict, path: str | Path) -> Path:
    """``data`` as UTF-8 JSON, parent folders created: one format for every file the eval and bench
    commands write (metrics, sidecars, settings, ``--json`` / ``--output_json`` results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------------
# chart


def _bar_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, groups: list[str],
               values: list[list[float | None]], top: float, font: ImageFont.FreeTypeFont, digits: int) -> None:
    """Grouped bars in ``box`` (x0, y0, x1, y1): ``values[group][model]`` on a 0..top axis."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill=INK, font=font)
    plot_top, plot_bottom, plot_left = y0 + 28, y1 - 24, x0 + 44
    for tick in range(5):
        value = top * tick / 4
        y = plot_bottom - (plot_bottom - plot_top) * tick / 4
        draw.line((plot_left, y, x1, y), fill=(225, 225, 225))
        draw.text((x0, y - 7), f"{value:.2f}", fill=INK, font=font)
    draw.line((plot_left, plot_top, plot_left, plot_bottom), fill=INK)
    models = max((len(v) for v in values), default=1)
    slot = (x1 - plot_left) / max(len(groups), 1)
    bar = min(60.0, slot * 0.8 / max(models, 1))
    for g, (group, row) in enumerate(zip(groups, values)):
        start = plot_left + g * slot + (slot - bar * models) / 2
        for m, value in enumerate(row):
            left = start + m * bar
            if value is not None:
                height = (plot_bottom - plot_top) * min(value / top, 1.0) if top > 0 else 0
                draw.rectangle((left + 2, plot_bottom - height, left + bar - 2, plot_bottom),
                               fill=MODEL_COLORS[m % len(MODEL_COLORS)])
                draw.text((left + 2, plot_bottom - height - 15), f"{value:.{digits}f}", fill=INK, font=font)
        label_w = draw.textlength(group, font=font)
        draw.text((plot_left + g * slot + (slot - label_w) / 2, plot_bottom + 4), group, fill=INK, font=font)


def write_chart(metrics: dict, path: Path, glyph_font: GlyphFont) -> Path:
    """Sen.ACC / NED per language group and model, plus seconds per image when there are timings."""
    font = glyph_font.get(13)
    names = list(metrics["models"])
    groups = ["overall"] + sorted({lang for m in metrics["models"].values() for lang in m["per_language"]})

    def stat(name: str, group: str, key: str) -> float | None:
        block = metrics["models"][name]
        block = block["overall"] if group == "overall" else block["per_language"].get(group)
        return None if block is None else block[key]

    timings = [metrics["models"][n]["timing"].get("seconds_per_image") for n in names]
    timed = any(t is not None for t in timings)
    panel_w = max(420, 110 * len(groups) * max(1, len(names)) // 2 + 80)
    width = panel_w * 2 + (300 if timed else 0) + 40
    height = 380 + 22 * len(names)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, key in enumerate(("sen_acc", "ned")):
        title = "Sen.ACC" if key == "sen_acc" else "NED"
        _bar_panel(draw, (20 + p * panel_w, 14, 20 + (p + 1) * panel_w - 30, 340), title, groups,
                   [[stat(n, g, key) for n in names] for g in groups], 1.0, font, 3)
    if timed:
        top = max(t for t in timings if t is not None) * 1.15
        title = "seconds / image" + (f"  (speed-up {metrics['speedup']:.2f}x)" if metrics.get("speedup") else "")
        _bar_panel(draw, (20 + 2 * panel_w, 14, width - 20, 340), title, ["end to end"], [timings], top, font, 3)
    for m, name in enumerate(names):
        y = 352 + 22 * m
        draw.rectangle((20, y + 2, 34, y + 16), fill=MODEL_COLORS[m % len(MODEL_COLORS)])
        draw.text((42, y), metrics["models"][name]["label"], fill=INK, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# --------------------------------------------------------------------------------------------------
# grids


def _prompt_panel(row: GridRow, size: int, glyph_font: GlyphFont) -> np.ndarray:
    """The ground-truth lines rendered in their polygons (black on white, outlines in red)."""
    coverage = np.zeros((size, size), np.float32)
    for text, polygon in row.lines:
        coverage = np.maximum(coverage, colorize(render_glyphs(glyph_font, text, polygon), None, size, size)[0])
    panel = np.repeat((255 - coverage * 225)[..., None], 3, axis=2).astype(np.uint8)
    for _, polygon in row.lines:
        cv2.polylines(panel, [np.round(polygon).astype(np.int32).reshape(-1, 1, 2)], True, BAD_COLOR, 1)
    return panel


def _text_block(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, lines: list[tuple[str, tuple]],
                font: ImageFont.FreeTypeFont, line_h: int) -> int:
    """Wrapped coloured lines from (x, y) within ``width``; returns the height used."""
    chars = max(8, int(width / max(font.getlength("n"), 1)))
    used = 0
    for text, color in lines:
        for piece in textwrap.wrap(text, chars) or [""]:
            draw.text((x, y + used), piece, fill=color, font=font)
            used += line_h
    return used


def _render_row(row: GridRow, size: int, glyph_font: GlyphFont, font: ImageFont.FreeTypeFont, line_h: int,
                text_h: int) -> Image.Image:
    gap = 6
    tiles = [_prompt_panel(row, size, glyph_font)] + [cell.image for cell in row.cells]
    canvas = Image.new("RGB", (len(tiles) * (size + gap) - gap, size + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    for t, tile in enumerate(tiles):
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (t * (size + gap), 0))
    _text_block(draw, 2, size + 4, size - 4, [(row.caption or "(no caption)", INK)], font, line_h)
    for c, cell in enumerate(row.cells, start=1):
        reads = [(f"{pred or '[none]'}  ({gt})" if not ok else pred, OK_COLOR if ok else BAD_COLOR)
                 for pred, gt, ok in cell.reads]
        _text_block(draw, c * (size + gap) + 2, size + 4, size - 4, reads, font, line_h)
    return canvas


def write_grids(rows: Sequence[GridRow], labels: Sequence[str], folder: Path, glyph_font: GlyphFont) -> list[Path]:
    """``grid_<n>.png`` files of up to four rows: prompt | one column per model (``labels``)."""
    if not rows:
        return []
    size = rows[0].cells[0].image.shape[0] if rows[0].cells else 256
    font = glyph_font.get(max(10, min(14, size // 20)))
    line_h = font.size + 4
    chars = max(8, int((size - 4) / max(font.getlength("n"), 1)))

    def wrapped(texts: list[str]) -> int:
        return sum(len(textwrap.wrap(t, chars)) or 1 for t in texts)

    text_lines = max(max(wrapped([r.caption]) for r in rows),
                     max((wrapped([f"{p}  ({g})" for p, g, _ in c.reads]) for r in rows for c in r.cells), default=0))
    text_h = min(text_lines, 24) * line_h + 8
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("grid_*.png"):
        stale.unlink()
    paths = []
    for n, start in enumerate(range(0, len(rows), GRIDS_PER_FILE)):
        rendered = [_render_row(r, size, glyph_font, font, line_h, text_h) for r in rows[start:start + GRIDS_PER_FILE]]
        header_h = 2 * line_h + 6
        width = max(r.width for r in rendered)
        sheet = Image.new("RGB", (width, header_h + sum(r.height + 10 for r in rendered)), "white")
        draw = ImageDraw.Draw(sheet)
        for c, label in enumerate(["prompt (ground truth)", *labels]):
            _text_block(draw, c * (size + 6) + 2, 4, size - 4, [(label, INK)], font, line_h)
        y = header_h
        for r in rendered:
            sheet.paste(r, (0, y))
            y += r.height + 10
        path = folder / f"grid_{n:02d}.png"
        sheet.save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# report


def write_report(metrics: dict, path: Path, chart: str, grids: Sequence[Path]) -> Path:
    """``report.md``: the results table, per-language tables, timing stages, skipped lines and protocol."""
    models = metrics["models"]
    teacher_s = models.get("teacher", {}).get("timing", {}).get("seconds_per_image")
    out = ["# OCR evaluation", "",
           f"`{metrics['benchmark_json']}`: {metrics['prompts']} prompts, {metrics['lines']} lines, "
           f"{metrics['images_per_prompt']} image(s) per prompt at {metrics['resolution']}x{metrics['resolution']} "
           f"({metrics['mode']} images).", ""]
    if metrics["mode"] == "generated":
        out += [f"Teacher weights: `{metrics['teacher_ckpt']}`; student LoRA: `{metrics['lora_path'] or 'none'}`; "
                f"dtype {metrics['dtype']}.", ""]
        if "random init" in str(metrics["teacher_ckpt"]):
            out += ["**Random-init weights**: the images are noise, so Sen.ACC and NED are ~0 by construction; "
                    "this run checks the plumbing and the timing, not quality.", ""]
    out += ["| model | line reads | Sen.ACC | NED | s / image | speed-up |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        seconds = m["timing"].get("seconds_per_image")
        speedup = f"{teacher_s / seconds:.2f}x" if teacher_s and seconds else "—"
        out.append(f"| {m['label']} | {m['overall']['lines']} | {_fmt(m['overall']['sen_acc'])} | "
                   f"{_fmt(m['overall']['ned'])} | {_fmt(seconds, 3)} | {speedup} |")
    languages = sorted({lang for m in models.values() for lang in m["per_language"]})
    out += ["", "Per language (Sen.ACC / NED, line reads):", "",
            "| model | " + " | ".join(languages) + " |", "|---" * (len(languages) + 1) + "|"]
    for m in models.values():
        cells = []
        for lang in languages:
            block = m["per_language"].get(lang)
            cells.append("—" if block is None
                         else f"{_fmt(block['sen_acc'])} / {_fmt(block['ned'])} ({block['lines']})")
        out.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    timed = {n: m["timing"] for n, m in models.items() if m["timing"].get("seconds_per_image") is not None}
    if timed:
        found = {s for t in timed.values() for s in t["stage_seconds_per_image"]}
        stages = [s for s in STAGES if s in found] + sorted(found - set(STAGES))
        out += ["", "Seconds per image by stage (mean over prompts; warm-up excluded; prepare = glyph rendering, "
                "encode = OCR/CLIP/VAE-encode conditioning, sample = denoising, decode = VAE decode):", "",
                "| model | " + " | ".join(stages) + " | total | device |", "|---" * (len(stages) + 3) + "|"]
        for name, t in timed.items():
            out.append(f"| {models[name]['label']} | " + " | ".join(_fmt(t['stage_seconds_per_image'].get(s), 4)
                                                              for s in stages)
                       + f" | {_fmt(t['seconds_per_image'], 4)} | {', '.join(t['devices'])} |")
    out += ["", f"![metrics]({chart})", ""]
    if grids:
        out += ["Sample grids (prompt | " + " | ".join(m["label"] for m in models.values()) + "):", ""]
        out += [f"![grid]({g.as_posix()})" for g in grids] + [""]
    if metrics["issues"]:
        out += ["Skipped or repaired while reading the benchmark (see docs/evaluation.md):", "",
                "| counter | count |", "|---|---|"]
        out += [f"| `{key}` | {count} |" for key, count in metrics["issues"].items()] + [""]
    protocol = metrics["protocol"]
    norm = protocol["normalization"]
    out += ["Protocol: " + f"{protocol['recognizer']}; crop: {protocol['crop']}; whitespace "
            f"{'removed' if norm['strip_whitespace'] else 'kept'}, case {'folded' if norm['ignore_case'] else 'kept'}; "
            f"NED dictionary {protocol['dictionary']} (unknown characters share one id); max {protocol['max_lines']} "
            f"lines x {protocol['max_chars']} characters"
            + (f"; seed {protocol['seed']}." if metrics["mode"] == "generated" else "."), ""]
    if metrics.get("command"):
        out += ["```bash", metrics["command"], "```", ""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path
