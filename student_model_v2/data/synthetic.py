"""Synthetic AnyText2-format samples: images with real rendered text and exact annotations.

Used for the committed ``demodataset/`` (``make_demo_dataset.py``) and, in memory, by the mock
dataset. Every image is a deterministic function of (seed, index), so any sample regenerates alone.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .glyph_render import DEFAULT_FONT_PATH, GlyphFont, Patch, fill_polygon

LATIN_WORDS = (
    "OPEN", "SALE", "Coffee", "Bakery", "Hello", "World", "Welcome", "Fresh", "Market", "Station", "Garden",
    "Music", "Night", "Summer", "Winter", "Books", "Pizza", "Hotel", "Exit", "Street", "Park", "City", "Cafe",
    "Daily", "News", "Super", "Happy", "Studio", "Design", "Print", "Ocean", "River", "Mountain", "Travel",
    "Story", "Sport", "Club", "Shop", "Sunday", "Friday", "Light", "Green", "Orange", "Apple", "Tea", "Milk",
    "Family", "Dream", "Star", "Festival", "Library", "Museum", "School", "Gallery", "Bridge", "Harbor",
)
CHINESE_PHRASES = (
    "欢迎光临", "新年快乐", "生日快乐", "中国银行", "北京大学", "上海", "咖啡店", "面包房", "书店", "花园",
    "出口", "入口", "停车场", "地铁站", "超市", "水果", "新鲜", "特价", "优惠", "开业大吉", "万事如意",
    "恭喜发财", "春天", "夏天", "秋天", "冬天", "音乐会", "电影院", "图书馆", "博物馆", "学校", "医院",
    "火车站", "飞机场", "大海", "高山", "河流", "城市", "生活", "美食", "茶叶", "牛奶", "早餐", "晚安",
    "你好", "谢谢", "再见", "朋友", "家人", "梦想", "星空", "阳光", "雨天", "风景", "旅行", "故事",
)
TRADITIONAL_PHRASES = ("歡迎光臨", "新年快樂", "書店", "圖書館", "電影院", "學校", "飛機場", "風景", "國際")

_PALETTE = (
    (0, 0, 0), (255, 255, 255), (220, 30, 30), (30, 60, 200), (20, 140, 60), (250, 200, 20), (140, 40, 160),
    (240, 120, 20), (20, 160, 170), (90, 50, 20), (250, 250, 200), (200, 200, 200),
)
_COLOR_NAMES = ("black", "white", "red", "blue", "green", "yellow", "purple", "orange", "teal", "brown",
                "cream", "grey")
_SPACING = 3
"""Pixels a placed text box is grown by; later boxes must stay clear of the grown area."""
_SPACING_KERNEL = np.ones((2 * _SPACING + 1,) * 2, np.uint8)
_FILLER = ("The scene is lit by soft daylight", "A few shapes decorate the background", "Nothing else is visible",
           "The colours are calm and smooth", "The layout looks like a simple poster", "Edges are clean")


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    kind = int(rng.integers(5))
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    c2 = rng.integers(0, 256, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        ang = rng.uniform(0, 2 * math.pi)
        t = np.clip((np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) + 0.5, 0, 1)
        img, desc = c1 + (c2 - c1) * t[..., None], "linear gradient"
    elif kind == 1:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / 0.8, 0, 1)
        img, desc = c1 + (c2 - c1) * t[..., None], "radial gradient"
    elif kind == 2:
        img = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(int(rng.integers(3, 7))):
            r = rng.uniform(0.08, 0.3) * size
            cx, cy = rng.uniform(0, size, 2)
            blob = np.exp(-(((xx * size - cx) ** 2 + (yy * size - cy) ** 2) / (2 * r * r)))
            img += (rng.integers(0, 256, 3) - img.mean((0, 1))) * blob[..., None] * 0.8
        desc = "soft blurred blobs"
    elif kind == 3:
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in c1))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            w, h = (int(v) for v in rng.integers(40, size // 2, 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x0 + w, y0 + h], fill=fill)
        img, desc = np.asarray(canvas.filter(ImageFilter.GaussianBlur(2)), np.float32), "geometric shapes"
    else:
        light = rng.random() < 0.5
        base = rng.integers(200, 256, 3) if light else rng.integers(0, 60, 3)
        img, desc = np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy(), (
            "plain light" if light else "plain dark")
    return np.clip(img, 0, 255).astype(np.uint8), desc


def _text_for(rng: np.random.Generator, font: GlyphFont, vertical: bool) -> tuple[str, str]:
    """(text, language) drawn from the vocabularies, only using characters the font has."""
    for _ in range(20):
        roll = rng.random()
        if vertical or roll < 0.5:
            pool = TRADITIONAL_PHRASES if rng.random() < 0.15 else CHINESE_PHRASES
            text = pool[int(rng.integers(len(pool)))]
            if not vertical and rng.random() < 0.3:
                text += CHINESE_PHRASES[int(rng.integers(len(CHINESE_PHRASES)))]
            lang = "Chinese"
        else:
            words = [LATIN_WORDS[int(rng.integers(len(LATIN_WORDS)))] for _ in range(int(rng.integers(1, 4)))]
            text, lang = " ".join(words)[:20].strip(), "Latin"
        if not font.missing_chars(text):
            return text, lang
    raise RuntimeError(f"font {font.path} lacks the demo vocabulary")


def _layout(text: str, face, vertical: bool, pad: int) -> Image.Image:
    """Text as an L layer with ``pad`` px around it (vertical: characters stacked top-down)."""
    if not vertical:
        left, top, right, bottom = face.getbbox(text)
        layer = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=face, fill=255)
        return layer
    boxes = [face.getbbox(ch) for ch in text]
    gap = max(2, face.size // 8)
    col_w = max(b[2] - b[0] for b in boxes)
    height = sum(b[3] - b[1] for b in boxes) + gap * (len(text) - 1)
    layer = Image.new("L", (col_w + 2 * pad, height + 2 * pad), 0)
    draw = ImageDraw.Draw(layer)
    y = pad
    for ch, (left, top, right, bottom) in zip(text, boxes):
        draw.text((pad + (col_w - (right - left)) // 2 - left, y - top), ch, font=face, fill=255)
        y += bottom - top + gap
    return layer


def _pick_color(rng: np.random.Generator, region: np.ndarray) -> tuple[int, tuple[int, int, int]]:
    bg = _luma(region.reshape(-1, 3).mean(0))
    order = rng.permutation(len(_PALETTE))
    for k in order:
        if abs(_luma(_PALETTE[k]) - bg) > 110:
            return int(k), _PALETTE[k]
    k = 0 if bg > 128 else 1
    return k, _PALETTE[k]


def _caption(rng: np.random.Generator, desc: str, lines: list[dict], color_words: list[str]) -> str | None:
    roll = rng.random()
    if roll < 0.05:
        return None
    langs = sorted({a["language"] for a in lines})
    caption = (f"an image with a {desc} background and {len(lines)} lines of {' and '.join(langs)} text "
               f"in {', '.join(sorted(set(color_words)))}")
    if roll < 0.12:
        caption += ", a star * marks the corner"
    elif roll < 0.19:
        caption += ". " + ". ".join(_FILLER[int(rng.integers(len(_FILLER)))] + " " + " ".join(
            LATIN_WORDS[int(rng.integers(len(LATIN_WORDS)))].lower() for _ in range(6)) for _ in range(14))
    return caption


@functools.lru_cache(maxsize=8)
def _drawing_font(path: Path) -> GlyphFont:
    """The font that paints text into synthetic images, always with BASIC layout: these are the "photos",
    not the conditioning, and the committed demodataset was drawn that way, so it stays reproducible
    whichever layout engine this Pillow has."""
    return GlyphFont(path, layout="basic")


def synth_sample(seed: int, index: int, size: int = 512, font: GlyphFont | None = None,
                 n_lines: int | None = None) -> tuple[np.ndarray, dict]:
    """One synthetic image (size, size, 3) uint8 RGB and its ``data_list`` record (no ``img_name``);
    the text is painted in ``font``'s file (default: the bundled font)."""
    font = _drawing_font(font.path if font is not None else Path(DEFAULT_FONT_PATH).resolve())
    rng = np.random.default_rng([seed, index])
    img, desc = _background(rng, size)
    canvas = Image.fromarray(img)
    occupied = np.zeros((size, size), np.uint8)
    margin = max(4, size // 64)
    wanted = int(n_lines if n_lines is not None else (5 if rng.random() < 0.5 else rng.integers(1, 5)))
    annotations, color_words = [], []
    scale = size / 512.0
    for _ in range(wanted):
        vertical = rng.random() < 0.2
        text, lang = _text_for(rng, font, vertical)
        angle = 0.0 if vertical or rng.random() < 0.55 else float(rng.choice([-1, 1]) * rng.uniform(5, 40))
        fsize = int(rng.integers(20, 44 if wanted >= 4 else 60) * scale) or 1
        pad = max(2, int(round(3 * scale)))
        layer = _layout(text, font.get(fsize), vertical, pad)
        w, h = layer.size
        corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        rad = math.radians(angle)
        rot = np.array([[math.cos(rad), math.sin(rad)], [-math.sin(rad), math.cos(rad)]])
        corners = corners @ rot.T
        placed = None
        for _ in range(60):
            c = rng.uniform(margin, size - margin, 2)
            poly = np.round(corners + c).astype(np.int32)
            if poly.min() < margin or poly.max() > size - 1 - margin:
                continue
            mask = fill_polygon(poly, size, size, margin=_SPACING)
            mh, mw = mask.data.shape
            if not (mask.data & occupied[mask.y:mask.y + mh, mask.x:mask.x + mw]).any():
                placed = poly
                Patch(cv2.dilate(mask.data, _SPACING_KERNEL), mask.x, mask.y).paste_max(occupied)
                break
        if placed is None:
            continue
        x0, y0 = placed.min(0)
        x1, y1 = placed.max(0)
        k, rgb = _pick_color(rng, img[y0:y1 + 1, x0:x1 + 1])
        rotated = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        invalid = rng.random() < 0.08
        if invalid:
            rotated = rotated.filter(ImageFilter.GaussianBlur(radius=max(2.0, fsize / 6)))
        cx, cy = placed.mean(0)
        top_left = (int(round(cx - rotated.width / 2)), int(round(cy - rotated.height / 2)))
        canvas.paste(Image.new("RGB", rotated.size, rgb), top_left, rotated)
        ann = {"polygon": placed.tolist(), "text": text, "language": lang,
               "rec_score": round(float(rng.uniform(0.5, 1.0)), 3)}
        roll = rng.random()
        if roll < 0.7:
            ann["color"] = list(rgb)
        elif roll < 0.8:
            ann["color"] = [500, 500, 500]
        if invalid:
            ann["valid"] = False
        annotations.append(ann)
        color_words.append(_COLOR_NAMES[k])
    record: dict = {"annotations": annotations}
    caption = _caption(rng, desc, annotations, color_words) if annotations else f"a {desc} background"
    if caption is not None:
        record["caption"] = caption
    if rng.random() < 0.5:
        record["wm_score"] = round(float(rng.random()), 3)
    return np.asarray(canvas), record


def make_demo_dataset(out_dir: str | Path, count: int = 48, seed: int = 0, size: int = 512,
                      quality: int = 85, font_path: str | Path = DEFAULT_FONT_PATH) -> Path:
    """Write ``<out>/imgs/NNNN.jpg`` and ``<out>/annotations/demo_data.json``; returns the JSON path.

    ``data_root`` is ``../imgs``, relative to the JSON file, so the folder can be moved as a whole.
    """
    out = Path(out_dir)
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    font = GlyphFont(font_path)
    data_list = []
    for i in range(count):
        img, record = synth_sample(seed, i, size, font)
        name = f"{i:04d}.jpg"
        Image.fromarray(img).save(out / "imgs" / name, quality=quality, optimize=True)
        data_list.append({"img_name": name, **record})
    target = out / "annotations" / "demo_data.json"
    target.write_text(json.dumps({"data_root": "../imgs", "data_list": data_list}, ensure_ascii=False, indent=1),
                      encoding="utf-8")
    return target
