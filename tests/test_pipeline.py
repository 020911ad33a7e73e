"""Inference conditioning (prompts, positions, glyphs, font hints, colours, modes) and the pipeline object."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from student_model_v2.anytext2.config import BUNDLED_TOKENIZER_DIR
from student_model_v2.anytext2.text_encoder import load_tokenizer
from student_model_v2.data.glyph_render import GlyphFont
from student_model_v2.inference.inputs import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    InferenceInputError,
    load_image_file,
    parse_color,
    parse_prompt,
    positions_from_mask,
)
from student_model_v2.inference.pipeline import (
    AnyText2Pipeline,
    LineStyle,
    SamplingOptions,
    TextRequest,
    build_conditioning,
    mimic_style_crop,
)

from .conftest import TINY_YAML, png_claiming

FONT = GlyphFont("font/NotoSansCJKsc-Regular-subset.otf")
PLACEHOLDER_ID = 265


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_TOKENIZER_DIR)


def _placeholders(tokenizer, caption: str) -> int:
    return tokenizer(caption)["input_ids"].count(PLACEHOLDER_ID)


@pytest.mark.parametrize("prompt, caption, texts", [
    ('a sign that reads "Hello", "World"', "a sign that reads * , *", ["Hello", "World"]),
    ("curly “Café” quotes", "curly * quotes", ["Café"]),
    ('"A","B"."C"', "* , * . *", ["A", "B", "C"]),
    ("no quotes at all", "no quotes at all", []),
])
def test_prompt_texts_become_placeholders_that_tokenise_to_265(tokenizer, prompt, caption, texts):
    parsed = parse_prompt(prompt)
    assert parsed.caption == caption and parsed.texts == texts and not parsed.warnings
    assert _placeholders(tokenizer, parsed.caption) == len(texts)
    assert tokenizer("reads *,")["input_ids"].count(PLACEHOLDER_ID) == 0  # the trap the spacing avoids


def test_stray_placeholders_are_removed_with_a_warning():
    parsed = parse_prompt('5 * 3 reads "x"')
    assert parsed.caption == "5 3 reads *" and parsed.texts == ["x"] and parsed.warnings


@pytest.mark.parametrize("value, rgb", [
    (None, (500, 500, 500)), ("", (500, 500, 500)), ("none", (500, 500, 500)), ("500,500,500", (500, 500, 500)),
    ("255,0,0", (255, 0, 0)), ("#00ff80", (0, 255, 128)), ("rgba(12.0, 34.4, 56, 1)", (12, 34, 56)),
    ((1, 2, 3), (1, 2, 3)),
])
def test_colors(value, rgb):
    assert parse_color(value) == rgb


@pytest.mark.parametrize("value", ["1,2", "red-ish", "300,0,0", "-1,0,0"])
def test_bad_colors_are_user_errors(value):
    with pytest.raises(InferenceInputError, match="colou?r"):
        parse_color(value, line=2)


def _gen_request(**kwargs) -> TextRequest:
    defaults = dict(prompt='a sign that reads "Hi", "Yo"', width=64, height=64,
                    positions=[[4, 4, 60, 28], [[4, 34], [60, 34], [60, 60], [4, 60]]])
    defaults.update(kwargs)
    return TextRequest(**defaults)


def test_generation_conditioning(tokenizer):
    styles = [LineStyle(color="255,0,0", font="font/NotoSansCJKsc-Regular-subset.otf"), LineStyle()]
    cond = build_conditioning(_gen_request(line_styles=styles), FONT)
    assert cond.mode == "gen" and cond.texts == ["Hi", "Yo"] and (cond.height, cond.width) == (64, 64)
    assert cond.image_caption == "a sign that reads * , * , " + DEFAULT_A_PROMPT
    assert cond.text_caption == "a sign that reads * , *" and cond.negative_caption == DEFAULT_N_PROMPT
    assert _placeholders(tokenizer, cond.image_caption) == _placeholders(tokenizer, cond.text_caption) == 2
    first, second = (p[0, 0].numpy() for p in cond.positions)
    assert first[4:29, 4:61].all() and first.sum() == 25 * 57 and second[34:61, 4:61].all() and not (first * second).any()
    assert torch.equal(cond.hint[0, 0], torch.from_numpy(np.maximum(first, second)))
    assert torch.all(cond.masked_image == -1)
    for glyph, mask in zip(cond.glyphs, (first, second)):
        ink = glyph[0].sum(0).numpy() > 0
        assert glyph.shape == (1, 3, 64, 64) and ink.any() and not (ink & (mask == 0)).any()
    assert cond.glyphs[0][0, 1:].max() == pytest.approx(10 / 255)  # red, channels clipped to >= 10 as upstream
    assert [g.shape for g in cond.gly_line] == [(1, 1, 80, 512)] * 2
    assert all(set(g.unique().tolist()) == {0.0, 1.0} for g in cond.gly_line)
    torch.testing.assert_close(cond.colors[0], torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(cond.colors[1], torch.full((1, 3), 500 / 255))
    hint = cond.font_hint[0, 0].numpy()
    assert hint.max() <= 1 and hint[first > 0].sum() > 0 and hint[second > 0].sum() == 0  # "No Font" line stays empty
    assert cond.glyph_image.shape == (64, 64, 3) and cond.font_hint_image.shape == (64, 64, 3)
    assert cond.mimic_crops == [None, None]


def test_font_hint_and_debug_image_equal_upstreams_full_canvas_sums():
    """Both are accumulated without a full 3-channel canvas per line; the numbers must be upstream's: the font
    hint clip(sum of each line's white glyph render, 0, 1), the debug image each line's render x 255 with its
    polygon outlined, summed and clipped. Overlapping lines make the sums matter."""
    from student_model_v2.data.glyph_render import colorize, render_glyphs

    font_path = "font/NotoSansCJKsc-Regular-subset.otf"
    positions = [[4, 4, 60, 40], [[10, 20], [60, 16], [62, 50], [12, 58]]]
    request = _gen_request(prompt='"Hi", "Yo"', positions=positions,
                           line_styles=[LineStyle(font=font_path, color="30,200,90"), LineStyle(font=font_path)])
    cond = build_conditioning(request, FONT)
    hint, outlines = np.zeros((64, 64), np.float32), []
    for text, polygon, glyph in zip(cond.texts, cond.polygons, cond.glyphs):
        hint += colorize(render_glyphs(FONT, text, polygon), (255, 255, 255), 64, 64)[0]
        outline = np.ascontiguousarray(glyph[0].numpy().transpose(1, 2, 0) * 255.0)
        cv2.drawContours(outline, [np.round(polygon).astype(np.int32).reshape(-1, 1, 2)], 0, (255, 255, 255), 1)
        outlines.append(outline)
    assert (hint > 1).any()   # the lines overlap, so the clip is exercised
    np.testing.assert_array_equal(cond.font_hint[0, 0].numpy(), np.clip(hint, 0, 1))
    np.testing.assert_array_equal(cond.glyph_image, np.clip(sum(outlines), 0, 255).astype(np.uint8))


def test_boxes_and_polygons_give_the_same_positions():
    boxes = build_conditioning(_gen_request(positions=[[4, 4, 60, 28], [4, 34, 60, 60]]), FONT)
    polygons = build_conditioning(_gen_request(), FONT)
    for a, b in zip(boxes.positions + boxes.glyphs, polygons.positions + polygons.glyphs):
        assert torch.equal(a, b)


def test_mask_positions_are_components_in_reading_order():
    mask = np.zeros((192, 256), np.uint8)
    mask[5:25, 170:250] = 255     # top right (cells of 102 px: row 0, column 2)
    mask[120:150, 5:50] = 255     # bottom left (row 1, column 0)
    mask[2:5, 2:5] = 255          # 9 px: dropped as noise
    vertical = positions_from_mask(mask, "↕")
    horizontal = positions_from_mask(mask, "↔")
    assert len(vertical) == 2 and vertical[0].mask[10, 200] and vertical[1].mask[130, 20]
    assert horizontal[0].mask[130, 20] and horizontal[1].mask[10, 200]
    assert vertical[0].mask.sum() == 20 * 80 and not vertical[0].mask[3, 3]
    cond = build_conditioning(_gen_request(positions=mask, width=256, height=192), FONT)
    assert cond.positions[0][0, 0, 10, 200] == 1 and cond.positions[1][0, 0, 130, 20] == 1


def test_edit_mode_resizes_and_masks_the_reference():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    mask = np.zeros((70, 100), np.uint8)
    mask[10:40, 10:90] = 255
    cond = build_conditioning(TextRequest(prompt='reads "Hi"', positions=mask, edit_image=image), FONT)
    assert cond.mode == "edit" and (cond.height, cond.width) == (64, 64)   # floor to multiples of 64
    hint = cond.hint[0, 0].numpy() > 0
    masked = cond.masked_image[0].numpy()
    assert hint[20, 40] and not hint[60, 5]
    assert np.all(masked[:, hint] == -1)
    expected = cv2.resize(image.clip(1, 255), (64, 64)).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(masked[:, ~hint], expected.transpose(2, 0, 1)[:, ~hint], atol=1e-6)
    boxes = build_conditioning(TextRequest(prompt='reads "Hi"', positions=[[10, 10, 90, 40]], edit_image=image), FONT)
    scaled = [[6.4, 64 / 7], [57.6, 64 / 7], [57.6, 256 / 7], [6.4, 256 / 7]]   # x * 64/100, y * 64/70
    np.testing.assert_allclose(boxes.polygons[0], scaled, rtol=1e-5)


def test_extra_positions_are_masked_but_get_no_text_and_long_texts_are_cut():
    cond = build_conditioning(_gen_request(prompt='"ABCDEFGHIJKLMNOPQRSTUVWXYZ"'), FONT)
    assert cond.texts == ["ABCDEFGHIJKLMNOPQRST"] and len(cond.positions) == 1
    assert cond.hint[0, 0, 50, 30] == 1 and len(cond.warnings) == 2


def test_extra_position_and_style_warnings_count_in_plain_words():
    cond = build_conditioning(_gen_request(prompt="a quiet beach", positions=[[4, 4, 60, 28]],
                                           line_styles=[LineStyle(color="1,2,3")]), FONT)
    assert cond.warnings == ["1 position for 0 quoted texts: the extra 1 position will be repainted without text; "
                             "quote one text per position in the prompt, or remove the extra positions",
                             "1 line style for 0 quoted texts: the extra styles are ignored"]


def test_no_quoted_text_gives_one_blank_line():
    cond = build_conditioning(TextRequest(prompt="a quiet beach", width=64, height=64), FONT)
    assert cond.texts == [" "] and not cond.glyphs[0].any() and not cond.positions[0].any()
    assert cond.colors[0][0, 0] == pytest.approx(500 / 255)


def _text_image() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 48), "white")
    ImageDraw.Draw(image).text((8, 8), "Ab", fill="black", font=FONT.get(28))
    mask = np.zeros((48, 96), np.uint8)
    mask[4:44, 4:60] = 255
    return np.asarray(image), mask


def test_mimic_font_replaces_the_style_crop_and_draws_no_font_hint():
    image, mask = _text_image()
    crop = mimic_style_crop(image, mask, 1)
    assert crop.shape[0] == 3 and crop.shape[1] >= 38 and crop.shape[2] >= 54 and crop.max() == 255
    styles = [LineStyle(mimic_image=image, mimic_mask=mask)]
    cond = build_conditioning(_gen_request(prompt='"Hi"', positions=[[4, 4, 60, 28]], line_styles=styles), FONT)
    assert torch.equal(cond.mimic_crops[0], crop) and not cond.font_hint.any()


def test_hollow_font_punches_the_noise_texture_into_the_strokes(tmp_path):
    from student_model_v2.inference.pipeline import hollow_font_hint, load_hollow_noise

    strokes = np.zeros((64, 64))
    strokes[16:48, 16:48] = 255
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    hollow = hollow_font_hint(strokes, noise)
    texture = cv2.resize(noise, (64, 64))
    texture[texture < 230] = 0
    texture = cv2.adaptiveThreshold(texture, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 11, 2)
    inside = strokes > 0
    assert texture[inside].min() == 0 and texture[inside].max() == 255
    np.testing.assert_array_equal(hollow[inside], 255.0 - texture[inside])   # texture punched out of the strokes
    np.testing.assert_array_equal(hollow[~inside & (texture > 0)], 255.0)   # and laid over the background
    styles = [LineStyle(font="font/NotoSansCJKsc-Regular-subset.otf")]
    request = _gen_request(prompt='"Hi"', positions=[[4, 4, 60, 28]], line_styles=styles)
    solid = build_conditioning(request, FONT)
    request.font_hollow = True
    hollowed = build_conditioning(request, FONT, hollow_noise=lambda: noise)
    assert not torch.equal(solid.font_hint, hollowed.font_hint)
    assert 0 <= hollowed.font_hint.min() and hollowed.font_hint.max() <= 1
    with pytest.raises(InferenceInputError, match="noise texture"):
        load_hollow_noise(tmp_path / "bg_noise.png")


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(positions=[[4, 4, 60, 28]]), "2 quoted texts but 1 position"),
    (dict(positions=None), "2 quoted texts but 0 positions"),
    (dict(prompt='reads "", "Yo"'), "text line 1 is empty"),
    (dict(prompt='reads "   ", "Yo"'), "text line 1 is empty"),
    (dict(positions=[[4, 4, 70, 28], [4, 34, 60, 60]]), "position 1 reaches outside the 64x64 image"),
    (dict(positions=[[4, 4, 60, 28], [[1, 1], [2, 2], [3, 3]]]), "position 2 has no area"),
    (dict(prompt='reads "5€", "Yo"'), "no glyph for '€'"),
    (dict(line_styles=[LineStyle(font="font/missing.ttf")]), "font file not found"),
    (dict(line_styles=[LineStyle(color="1,2")]), "colour '1,2' for line 1"),
    (dict(width=100), "multiple of 64"),
    (dict(positions=np.zeros((32, 32), np.uint8)), "mask is 32x32 but the image is 64x64"),
    (dict(edit_image=np.zeros((64, 64, 3), np.uint8), positions=None, prompt="no text"), "editing needs a mask"),
    (dict(edit_image=np.zeros((64, 64, 3), np.uint8), positions=np.zeros((64, 64), np.uint8), prompt="no text"),
     r"the edit mask is empty \(all black\)"),
    (dict(positions=np.zeros((64, 64), np.uint8)), r"the position mask is empty \(all black\)"),
    (dict(line_styles=[LineStyle(font="font/NotoSansCJKsc-Regular-subset.otf", mimic_image=np.zeros((8, 8, 3)),
                                 mimic_mask=np.zeros((8, 8)))]), "either a font or an image to mimic"),
    (dict(line_styles=[LineStyle(mimic_image=np.zeros((8, 8, 3)), mimic_mask=np.zeros((8, 8)))]), "selects nothing"),
])
def test_bad_requests_raise_user_errors(request_kwargs, message):
    with pytest.raises(InferenceInputError, match=message):
        build_conditioning(_gen_request(**request_kwargs), FONT)


def test_unreadable_image_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(InferenceInputError, match="cannot read edit image"):
        load_image_file(bad, "edit image")
    with pytest.raises(InferenceInputError, match="not found"):
        load_image_file(tmp_path / "missing.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(20000, 20000))
    with pytest.raises(InferenceInputError, match="edit image .*bomb.png is too large to decode safely"):
        load_image_file(bomb, "edit image")


def test_pipeline_generates_reproducible_images(tiny_teacher):
    pipe = AnyText2Pipeline(tiny_teacher)
    request = _gen_request()
    first = pipe(request, SamplingOptions(num_images=2, seed=5, steps=2))
    second = pipe(request, SamplingOptions(num_images=2, seed=5, steps=2))
    other = pipe(request, SamplingOptions(num_images=2, seed=6, steps=2))
    assert len(first.images) == 2 and first.images[0].shape == (64, 64, 3) and first.images[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first.images, second.images))
    assert not np.array_equal(first.images[0], other.images[0]) and not np.array_equal(*first.images)
    assert first.seed == 5 and first.steps == 2 and first.sampler == "student"
    assert set(first.timings) == {"prepare", "encode", "sample", "decode", "total"}
    assert first.prompt.startswith('a sign that reads "Hi" , "Yo" , best quality')
    assert any("no student LoRA" in w for w in first.warnings)
    assert pipe(request, SamplingOptions(seed=-1, steps=1)).seed >= 0


def test_pipeline_passes_per_run(tiny_teacher, monkeypatch):
    """Student: one UNet pass per step and one WriteNet pass per run; teacher: cond+uncond rows in one call."""
    unet, writenet = [], []
    eps, control = tiny_teacher.predict_eps, tiny_teacher.control_residuals
    monkeypatch.setattr(tiny_teacher, "predict_eps", lambda x, *a, **k: unet.append(x.shape[0]) or eps(x, *a, **k))
    monkeypatch.setattr(tiny_teacher, "control_residuals",
                        lambda c, *a, **k: writenet.append(c.batch_size) or control(c, *a, **k))
    pipe = AnyText2Pipeline(tiny_teacher)
    prepared = pipe.prepare(_gen_request())
    pipe.generate(prepared, SamplingOptions(num_images=3, seed=0))
    assert unet == [3, 3, 3, 3] and writenet == [1]
    unet.clear(), writenet.clear()
    pipe.generate(prepared, SamplingOptions(sampler="teacher", steps=5, num_images=3, seed=0))
    assert unet == [6] * 5 and writenet == [2]


def test_generation_reuses_the_blank_image_moments_and_the_uncond_captions(tiny_teacher, monkeypatch):
    """Request-independent work runs once per pipeline, and the cached results equal the uncached ones."""
    pipe = AnyText2Pipeline(tiny_teacher)
    prepared = pipe.prepare(_gen_request())
    generator = torch.Generator().manual_seed(3)
    direct = tiny_teacher.vae_encode(prepared.masked_image, generator=generator)
    for _ in range(2):
        cached = pipe._masked_latent(prepared, torch.Generator().manual_seed(3))
        torch.testing.assert_close(cached, direct.float(), rtol=0, atol=0)
    assert pipe._blank_latents.misses == 1
    pipe._masked_latent(pipe.prepare(_gen_request(width=128)), generator)
    assert pipe._blank_latents.misses == 2

    vae_calls, uncond_calls = [], []
    encode_moments = tiny_teacher.first_stage_model.encode_moments
    uncond = tiny_teacher.uncond_caption_contexts
    monkeypatch.setattr(tiny_teacher.first_stage_model, "encode_moments",
                        lambda x: vae_calls.append(1) or encode_moments(x))
    monkeypatch.setattr(tiny_teacher, "uncond_caption_contexts", lambda *a, **k: uncond_calls.append(1) or uncond(*a, **k))
    teacher = SamplingOptions(sampler="teacher", steps=2, seed=4)
    first = pipe.generate(prepared, teacher)
    second = pipe.generate(prepared, teacher)
    assert vae_calls == [] and uncond_calls == [1]
    np.testing.assert_array_equal(first.images[0], second.images[0])
    fresh = AnyText2Pipeline(tiny_teacher).generate(prepared, teacher)
    np.testing.assert_array_equal(first.images[0], fresh.images[0])
    prepared.negative_caption = "blurry *"   # depends on the lines: encoded per request
    pipe.generate(prepared, teacher)
    pipe.generate(prepared, teacher)
    assert len(uncond_calls) == 4   # first pipeline once, the fresh one once, then once per request
    assert len(vae_calls) == 1   # the fresh pipeline's first blank image
    edit = pipe.prepare(_gen_request(edit_image=np.full((64, 64, 3), 200, np.uint8)))
    for _ in range(2):
        pipe.generate(edit, SamplingOptions(steps=1, seed=0))
    assert len(vae_calls) == 3   # an edit image is encoded for each request


def test_lora_merged_unmerged_scale_and_teacher(student_lora_dir, tiny_teacher):
    request = _gen_request()
    options = SamplingOptions(num_images=1, seed=1, steps=2)
    base = AnyText2Pipeline(tiny_teacher)
    merged = AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=student_lora_dir, merge_lora=True, device="cpu")
    unmerged = AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=student_lora_dir, merge_lora=False, device="cpu")
    student = merged(request, options).images[0].astype(int)
    assert np.abs(student - unmerged(request, options).images[0]).max() <= 1
    assert np.abs(student - base(request, options).images[0]).max() > 8   # the adapter changes the images
    teacher = SamplingOptions(sampler="teacher", steps=2, seed=1)
    np.testing.assert_array_equal(unmerged(request, teacher).images[0], base(request, teacher).images[0])
    with pytest.raises(InferenceInputError, match="merged into the weights"):
        merged(request, teacher)
    zero = AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=student_lora_dir, lora_scale=0.0, merge_lora=False, device="cpu")
    np.testing.assert_array_equal(zero(request, options).images[0], base(request, options).images[0])
    with pytest.raises(InferenceInputError, match="already applied"):
        merged.load_lora(student_lora_dir)
    with pytest.raises(InferenceInputError, match=r"not an adapter folder \(no adapter_config.json\)"):
        AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=student_lora_dir.parent, device="cpu")


def test_bench_infer_reports_the_cost_model(capsys):
    """The JSON the speed goals are read from: pass counts, per-pass seconds and FLOPs, the predicted ratio and
    the measured one against it (figures are not asserted: timings belong to benchmarks)."""
    import json

    from student_model_v2 import bench

    bench.main(["infer", "--repeats", "1", "--warmup", "0", "--num_images", "2", "--lora_rank", "4"])
    report = json.loads(capsys.readouterr().out)
    teacher, student = report["teacher"], report["student"]
    assert (teacher["unet_calls"], teacher["unet_rows"], teacher["unet_passes"]) == (20, [4], 40)
    assert (teacher["writenet_calls"], teacher["writenet_rows"]) == (1, [2])
    assert (student["unet_calls"], student["unet_rows"], student["unet_passes"]) == (4, [2], 4)
    assert (student["writenet_calls"], student["writenet_rows"]) == (1, [1])
    assert report["pass_count_ratio"] == 8.4
    passes = report["pass_seconds"]
    assert {name: passes[name]["rows"] for name in ("unet_student", "unet_teacher", "writenet_student",
                                                     "writenet_teacher", "vae_decode")} == {
        "unet_student": 2, "unet_teacher": 4, "writenet_student": 1, "writenet_teacher": 2, "vae_decode": 2}
    assert passes["unet_teacher"]["gflops"] == pytest.approx(2 * passes["unet_student"]["gflops"], rel=1e-3)
    assert passes["unet_student"]["gflops"] > 0 and passes["vae_decode"]["achieved_tflops_per_s"] > 0
    predicted = {"teacher": 20 * passes["unet_teacher"]["seconds"] + passes["writenet_teacher"]["seconds"],
                 "student": 4 * passes["unet_student"]["seconds"] + passes["writenet_student"]["seconds"]}
    for name, value in predicted.items():
        assert report["predicted_sampling_seconds"][name] == pytest.approx(value, rel=1e-2, abs=1e-4)
    assert report["predicted_sampling_ratio"] == pytest.approx(predicted["teacher"] / predicted["student"], rel=1e-2)
    assert report["sampling_only_over_pass_ratio"] == pytest.approx(
        report["speedup_sampling_only"] / report["predicted_sampling_ratio"], rel=1e-2)
    for model in (teacher, student):
        stages = model["median_seconds"]
        assert stages["total"] == pytest.approx(stages["prepare"] + stages["encode"] + stages["sample"]
                                                + stages["decode"], abs=1e-3)
    share = (student["median_seconds"]["prepare"] + student["median_seconds"]["encode"]) / student["latency_s"]
    assert report["student_conditioning_share"] == pytest.approx(share, abs=2e-3)
    assert set(report["student_conditioning_parts_s"]) == {"glyph_rendering", "ocr_style_embedding", "clip",
                                                          "vae_encode_masked_image"}
    assert not any("target" in key for key in report)


@pytest.mark.parametrize("options, message", [
    (SamplingOptions(steps=51), "steps 51: the student takes 1 to 50 LCM steps"),
    (SamplingOptions(steps=0), "steps 0: the student takes 1 to 50 LCM steps"),
    (SamplingOptions(sampler="teacher", steps=1001), "steps 1001: the teacher's DDIM takes 1 to 1000 steps"),
])
def test_out_of_range_steps_are_user_errors_before_sampling(tiny_teacher, monkeypatch, options, message):
    pipe = AnyText2Pipeline(tiny_teacher)
    monkeypatch.setattr(tiny_teacher, "predict_eps", lambda *a, **k: pytest.fail("sampled with bad steps"))
    with pytest.raises(InferenceInputError, match=message):
        pipe(_gen_request(), options)
