"""OCR evaluation: metric values on fixed strings, the line crop + OCR chain, and eval_ocr end to end."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from student_model_v2.data.glyph_render import GlyphFont, render_glyphs
from student_model_v2.evaluation.ocr_metrics import (
    CharDictionary,
    Normalization,
    levenshtein,
    load_dictionary,
    score_line,
    summarize,
)

from .conftest import REPO_ROOT, TINY_YAML, png_claiming

DEMO_JSON = REPO_ROOT / "demodataset" / "annotations" / "demo_data.json"


@pytest.fixture(scope="module")
def font() -> GlyphFont:
    return GlyphFont(REPO_ROOT / "font" / "NotoSansCJKsc-Regular-subset.otf")


@pytest.fixture(scope="module")
def reader():
    from student_model_v2.evaluation.line_ocr import LineReader
    return LineReader(threads=1)


# --------------------------------------------------------------------------------------------------
# metrics on fixed strings


def test_levenshtein_hand_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("春天你好", "春天你们") == 1
    assert levenshtein([1, 2, 3], [1, 3]) == 1


def test_dictionaries_match_anytext2_class_counts():
    """['sos'] + dictionary + [' ']: 6625 classes for ch, 97 for en, unknown characters -> the last id."""
    ch, en = load_dictionary("ch"), load_dictionary("en")
    assert (ch.size, en.size) == (6625, 97)
    assert en.ids("A") != en.ids("a")
    assert en.ids("价") == en.ids("格") == [en.unknown_id]
    assert ch.ids("价") != ch.ids("格")
    with pytest.raises(ValueError, match="unknown OCR dictionary"):
        load_dictionary("fr")


@pytest.mark.parametrize("pred, gt, language, dictionary, norm, sen_acc, ned", [
    # Chinese: one substitution in four characters
    ("春天你们", "春天你好", "Chinese_sim", "ch", Normalization(), 0.0, 0.75),
    ("春天你好", "春天你好", "Chinese_tra", "ch", Normalization(), 1.0, 1.0),
    # mixed case: case is kept by default (2 substitutions in 10 characters once spaces are removed) ...
    ("hello world", "Hello World", "Latin", "en", Normalization(), 0.0, 0.8),
    # ... and folded on request
    ("hello world", "Hello World", "Latin", "en", Normalization(ignore_case=True), 1.0, 1.0),
    # empty prediction
    ("", "OPEN", "Latin", "en", Normalization(), 0.0, 0.0),
    # longer prediction: 3 insertions, divided by the longer length 7
    ("SALES!!", "SALE", "Latin", "en", Normalization(), 0.0, 4 / 7),
    # whitespace is removed by default, kept on request (1 deletion in 15 characters)
    ("BooksMilk Shop", "Books Milk Shop", "Latin", "en", Normalization(), 1.0, 1.0),
    ("BooksMilk Shop", "Books Milk Shop", "Latin", "en", Normalization(strip_whitespace=False), 0.0, 1 - 1 / 15),
    # characters outside the dictionary share one id: equal for NED, still different for Sen.ACC
    ("价钱", "价格", "Chinese", "en", Normalization(), 0.0, 1.0),
    ("价钱", "价格", "Chinese", "ch", Normalization(), 0.0, 0.5),
    # both empty
    ("", " ", "Latin", "en", Normalization(), 1.0, 1.0),
])
def test_score_line_hand_values(pred, gt, language, dictionary, norm, sen_acc, ned):
    score = score_line(pred, gt, language, load_dictionary(dictionary), norm)
    assert score.sen_acc == sen_acc
    assert score.ned == pytest.approx(ned, abs=1e-12)


def test_unknown_characters_are_reported():
    score = score_line("abc", "a€c", "Latin", CharDictionary(list("abc"), "tiny"))
    assert score.gt_unknown_chars == "€"
    assert score.ned == pytest.approx(2 / 3)


def test_summarize_per_language_and_overall():
    ch, en = load_dictionary("ch"), load_dictionary("en")
    scores = [score_line("春天你们", "春天你好", "Chinese_sim", ch), score_line("春天", "春天", "Chinese_tra", ch),
              score_line("OPEN", "OPEN", "Latin", en), score_line("", "SALE", "Latin", en),
              score_line("SALES!!", "SALE", "Latin", en)]
    summary = summarize(scores)
    assert summary["overall"]["lines"] == 5
    assert summary["overall"]["sen_acc"] == pytest.approx(2 / 5)
    assert summary["overall"]["ned"] == pytest.approx((0.75 + 1 + 1 + 0 + 4 / 7) / 5)
    assert set(summary["per_language"]) == {"Chinese", "Latin"}
    assert summary["per_language"]["Chinese"]["sen_acc"] == pytest.approx(0.5)
    assert summary["per_language"]["Latin"]["ned"] == pytest.approx((1 + 0 + 4 / 7) / 3)
    assert summarize([])["overall"] == {"lines": 0, "sen_acc": None, "ned": None, "lines_with_unknown_chars": 0}


def test_dictionary_choice_follows_the_benchmark(tmp_path):
    from student_model_v2.eval_ocr import dictionary_name

    assert dictionary_name("auto", tmp_path / "laion_word" / "test1k.json", "Chinese") == "en"
    assert dictionary_name("auto", tmp_path / "wukong_word" / "test1k.json", "Latin") == "ch"
    assert dictionary_name("auto", DEMO_JSON, "Latin") == "en"
    assert dictionary_name("auto", DEMO_JSON, "Chinese_sim") == "ch"
    assert dictionary_name("ch", DEMO_JSON, "Latin") == "ch"


# --------------------------------------------------------------------------------------------------
# crop + OCR on a rendered image


def _render_page(font: GlyphFont, lines: list[tuple[str, np.ndarray]], size: int = 320) -> np.ndarray:
    """Black text drawn in its polygon on a light grey page (RGB uint8)."""
    page = np.full((size, size), 235, np.uint8)
    for text, polygon in lines:
        coverage = render_glyphs(font, text, polygon).to_canvas(size, size).astype(np.float32) / 255.0
        page = (page * (1 - coverage) + 20 * coverage).astype(np.uint8)
    return np.repeat(page[..., None], 3, axis=2)


def _rotated_box(cx: float, cy: float, w: float, h: float, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    along, across = np.array([np.cos(angle), -np.sin(angle)]), np.array([np.sin(angle), np.cos(angle)])
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    return np.array([[cx, cy] + sx * w / 2 * along + sy * h / 2 * across for sx, sy in corners], np.float32)


def test_rotated_and_tall_lines_are_cropped_upright_and_read(font, reader):
    from student_model_v2.evaluation.line_ocr import crop_line

    rotated = ("OPEN 24", _rotated_box(150, 100, 220, 44, 30.0))
    tall = ("欢迎光临", np.array([[250, 120], [296, 120], [296, 300], [250, 300]], np.float32))
    page = _render_page(font, [rotated, tall])
    crops = [crop_line(page, polygon) for _, polygon in (rotated, tall)]
    for crop in crops:
        height, width = crop.shape[:2]
        assert width > height, f"crop {crop.shape} is not a horizontal line"
        # upright: the ink sits in the middle rows, not along an edge
        ink = (crop[..., 0] < 128).mean(axis=1)
        assert ink[height // 4: 3 * height // 4].sum() > ink[: height // 8].sum() + ink[-(height // 8):].sum()
    reads = reader.read(crops)
    assert ["".join(text.split()) for text, _ in reads] == ["OPEN24", "欢迎光临"]
    assert all(conf > 0.8 for _, conf in reads)
    # the same tall crop without the 90-degree turn is a column of characters the recogniser cannot read
    assert reader.read([np.ascontiguousarray(np.rot90(crops[1], k=-1))])[0][0] != "欢迎光临"


def test_empty_crop_reads_as_empty(font, reader):
    assert reader.read([np.zeros((0, 5, 3), np.uint8)]) == [("", 0.0)]
    # a polygon that covers no pixel reads as nothing, not as the text in the image's corner
    corner = np.array([[4, 4], [150, 4], [150, 40], [4, 40]], np.float32)
    page = _render_page(font, [("OPEN", corner)], size=160)
    outside = np.array([[200, 200], [260, 200], [260, 230], [200, 230]], np.float32)
    assert reader.read_lines(page, [outside, corner])[0] == ("", 0.0)
    assert "".join(reader.read_lines(page, [corner])[0][0].split()) == "OPEN"


# --------------------------------------------------------------------------------------------------
# benchmark records -> prompts


def test_prompts_scale_polygons_and_count_skips(tmp_path, font):
    from student_model_v2.evaluation.prompts import load_prompts

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (1024, 512), "white").save(imgs / "wide.jpg")
    (imgs / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (imgs / "broken.png").write_text("not an image")
    box = [[100, 100], [500, 100], [500, 200], [100, 200]]
    records = [
        {"img_name": "wide.jpg", "caption": "a sign that says * here",
         "annotations": [{"polygon": box, "text": "Hello", "language": "Latin"},
                         {"polygon": [[600, 300], [900, 300], [900, 400], [600, 400]], "text": 'say "hi"'},
                         {"polygon": [[10, 10], [12, 10], [12, 12], [10, 12]], "text": "much too long for this"},
                         {"polygon": box, "text": "x", "valid": False}]},
        {"img_name": "absent.jpg", "caption": "no image on disk",
         "annotations": [{"polygon": box, "text": "你好世界"}]},
        {"img_name": "empty.jpg", "annotations": []},
        {"img_name": "bomb.png", "annotations": [{"polygon": box, "text": "Hi"}]},
        {"img_name": "broken.png", "annotations": [{"polygon": box, "text": "Hi"}]},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"data_root": "imgs", "data_list": records}), encoding="utf-8")
    issues = Counter()
    prompts = load_prompts(path, resolution=256, max_lines=20, max_chars=20, font=font, issues=issues)
    assert [p.img_name for p in prompts] == ["wide.jpg", "absent.jpg"]
    wide, absent = prompts
    assert wide.caption == "a sign that says   here"
    assert [line.text for line in wide.lines] == ["Hello"]
    np.testing.assert_allclose(wide.lines[0].polygon, [[25, 50], [125, 50], [125, 100], [25, 100]])  # (1024, 512) -> 256
    np.testing.assert_allclose(absent.lines[0].polygon, np.array(box) / 2)  # assumed 512x512 frame
    assert absent.lines[0].language == "Chinese_sim"
    assert issues["line.double_quote"] == 1 and issues["line.degenerate_polygon"] == 1
    assert issues["fix.assumed_512_frame"] == 1 and issues["record.no_usable_line"] == 1
    assert issues["record.image_too_large"] == 1 and issues["record.bad_image"] == 1
    with_images = load_prompts(path, resolution=256, max_lines=20, max_chars=20, font=font, need_images=True,
                               issues=Counter())
    assert [p.img_name for p in with_images] == ["wide.jpg"]
    assert load_prompts(path, resolution=256, max_lines=20, max_chars=20, font=font, limit=1)[0].img_name == "wide.jpg"


# --------------------------------------------------------------------------------------------------
# end to end


def test_ground_truth_mode_on_the_demo_dataset(tmp_path, reader):
    """The demo data's own images: the crop + OCR + metric chain reads its rendered text (upper bound)."""
    from student_model_v2.eval_ocr import main

    out = tmp_path / "gt"
    assert main(["--images_from_dataset", "--output_dir", str(out), "--no_progress", "--num_grids", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    dataset = metrics["models"]["dataset"]
    assert metrics["mode"] == "dataset" and metrics["prompts"] == 47
    assert dataset["overall"]["lines"] == metrics["lines"] > 100
    assert dataset["overall"]["sen_acc"] >= 0.9
    assert dataset["overall"]["ned"] >= 0.95
    assert {"Chinese", "Latin"} <= set(dataset["per_language"])
    assert (out / "report.md").is_file() and (out / "metrics.png").is_file() and (out / "grids" / "grid_00.png").is_file()
    rows = [json.loads(line) for line in (out / "lines_dataset.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == metrics["lines"] and {"gt", "pred", "sen_acc", "ned"} <= set(rows[0])


@pytest.fixture(scope="module")
def fresh_adapter(tmp_path_factory):
    from student_model_v2.anytext2.checkpoint import build_random_teacher
    from student_model_v2.distillation.lora import add_lora

    folder = tmp_path_factory.mktemp("adapter")
    add_lora(build_random_teacher(TINY_YAML), 4, 4).save_pretrained(str(folder))
    return folder


def test_tiny_teacher_and_student_end_to_end(tmp_path, fresh_adapter, reader):
    from student_model_v2.eval_ocr import main

    out = tmp_path / "tiny"
    argv = ["--config", str(TINY_YAML), "--teacher_ckpt", "", "--lora_path", str(fresh_adapter), "--with_teacher",
            "--limit", "2", "--num_images", "2", "--resolution", "128", "--device", "cpu", "--output_dir", str(out),
            "--no_progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for name in ("metrics.json", "report.md", "metrics.png", "grids/grid_00.png"):
        assert (out / name).is_file(), name
    assert list(metrics["models"]) == ["teacher", "student"]
    for name, model in metrics["models"].items():
        assert model["overall"]["lines"] == 2 * metrics["lines"]
        assert 0.0 <= model["overall"]["sen_acc"] <= 1.0
        assert model["timing"]["generated_now"] == 2 and model["timing"]["seconds_per_image"] > 0
        assert set(model["timing"]["stage_seconds_per_image"]) == {"prepare", "encode", "sample", "decode"}
        assert len(list((out / "images" / name).glob("*.jpg"))) == 4
    assert metrics["speedup"] > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| model | line reads | Sen.ACC | NED | s / image | speed-up |" in report and "Random-init" in report
    teacher_seed = json.loads((out / "images" / "teacher" / "0000.json").read_text(encoding="utf-8"))["seed"]
    student_seed = json.loads((out / "images" / "student" / "0000.json").read_text(encoding="utf-8"))["seed"]
    assert teacher_seed == student_seed == 100

    # a second run reuses every image and keeps the recorded timings
    assert main(argv) == 0
    again = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for name in ("teacher", "student"):
        assert again["models"][name]["timing"]["generated_now"] == 0
        assert again["models"][name]["timing"]["seconds_per_image"] == metrics["models"][name]["timing"]["seconds_per_image"]
        assert again["models"][name]["overall"] == metrics["models"][name]["overall"]
    # other settings on the same folder are refused
    with pytest.raises(SystemExit, match="other settings"):
        main([*argv, "--seed", "7"])


def test_bad_arguments_fail_with_a_message(tmp_path):
    from student_model_v2.eval_ocr import main

    with pytest.raises(SystemExit, match="drop --with_teacher"):
        main(["--images_from_dataset", "--with_teacher", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--lora_path .*: not an adapter folder \(no adapter_config.json\)"):
        main(["--lora_path", str(tmp_path), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not found"):
        main(["--benchmark_json", str(tmp_path / "missing.json"), "--images_from_dataset", "--output_dir", str(tmp_path)])


def test_the_adapter_record_sets_the_student_sampler_and_refuses_other_step_counts(tmp_path, fresh_adapter):
    import shutil

    from student_model_v2.distillation.adapter_info import AdapterInfo
    from student_model_v2.eval_ocr import build_parser, main, student_sampling

    pcm = tmp_path / "pcm"
    shutil.copytree(fresh_adapter, pcm)
    AdapterInfo(version="v2_5", objective="pcm", num_inference_steps=50, lora_targets="attention", lora_rank=4,
                lora_alpha=4, num_phases=2).save(pcm)
    tiny = ["--config", str(TINY_YAML), "--teacher_ckpt", ""]
    plan = student_sampling(build_parser().parse_args(["--lora_path", str(pcm), "--output_dir", str(tmp_path)]))
    assert (plan.name, plan.steps) == ("pcm", 2)
    plain = ["--lora_path", str(fresh_adapter), "--output_dir", str(tmp_path)]
    plan = student_sampling(build_parser().parse_args(plain))
    assert (plan.name, plan.steps) == ("lcm", 4)  # a folder without the record: LCM, as before
    with pytest.raises(SystemExit, match=r"2 phases, so its sampler takes exactly 2 steps \(one jump per phase\), not 4"):
        main([*tiny, "--lora_path", str(pcm), "--student_steps", "4", "--output_dir", str(tmp_path / "out")])


def test_bench_json_option_writes_the_printed_result(tmp_path, capsys):
    from student_model_v2 import bench

    target = tmp_path / "sub" / "teacher.json"
    bench.main(["teacher", "--config", str(TINY_YAML), "--batch_size", "1", "--repeats", "1", "--warmup", "0",
                "--device", "cpu", "--json", str(target)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(target.read_text(encoding="utf-8")) == printed
    assert printed["command"] == "teacher" and printed["random_init_teacher"] is True
