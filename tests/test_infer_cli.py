"""The inference CLI in its three modes (dataset sample, free-form prompt, edit) and its input errors.

A random tiny teacher cannot draw text, so the tests check the conditioning each mode builds and the
files the CLI writes, not image content."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from student_model_v2 import infer_lcm_anytext_v2 as cli
from student_model_v2.data.dataset import MockAnyTextDataset

from .conftest import TINY_YAML

PLACEHOLDER_ID = 265


def _argv(lora_dir, out, *extra: str) -> list[str]:
    return ["--config", str(TINY_YAML), "--teacher_ckpt", "", "--lora_path", str(lora_dir), "--device", "cpu",
            "--seed", "7", "--output_path", str(out), *extra]


def _run(argv: list[str], capsys) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_dataset_sample(student_lora_dir, tmp_path, capsys):
    argv = _argv(student_lora_dir, tmp_path / "s.png", "--use_mock_dataset", "--resolution", "64", "--sample_index", "13")
    report = _run(argv, capsys)
    sample = MockAnyTextDataset(10, resolution=64, seed=7)[3]
    n = sample["n_lines"]
    assert report["mode"] == "dataset" and report["texts"] == sample["texts"][:n]
    assert report["text_caption"] == sample["text_caption"] and report["text_caption"].count("*") == n
    assert Image.open(tmp_path / "s.png").size == (64, 64)
    assert (tmp_path / "s_glyphs.png").is_file() and (tmp_path / "s_font_hint.png").is_file()
    assert report["runs"]["student"]["steps"] == 4 and report["runs"]["student"]["seed"] == 7
    cond = cli.prepare_conditioning(cli.build_parser().parse_args(argv), 7)
    for built, stored in zip(cond.positions + cond.glyphs, sample["positions"][:n] + sample["glyphs"][:n]):
        assert torch.equal(built[0], stored)
    assert torch.equal(cond.masked_image[0], sample["masked_img"])


def test_free_form_prompt_with_positions(student_lora_dir, tmp_path, capsys):
    from student_model_v2.anytext2.config import BUNDLED_TOKENIZER_DIR
    from student_model_v2.anytext2.text_encoder import load_tokenizer

    argv = _argv(student_lora_dir, tmp_path / "free.png", "--prompt", 'a sign that reads "Hi", "Yo"', "--resolution", "64",
                 "--positions", "[[4, 4, 60, 28], [[4, 34], [60, 34], [60, 60], [4, 60]]]", "--num_images", "2",
                 "--colors", "255,0,0")
    report = _run(argv, capsys)
    assert report["mode"] == "gen" and report["texts"] == ["Hi", "Yo"] and report["size"] == [64, 64]
    assert [Image.open(tmp_path / f"free_{k}.png").size for k in (0, 1)] == [(64, 64)] * 2
    tokenizer = load_tokenizer(BUNDLED_TOKENIZER_DIR)
    for caption in (report["image_caption"], report["text_caption"]):
        assert tokenizer(caption)["input_ids"].count(PLACEHOLDER_ID) == 2
    cond = cli.prepare_conditioning(cli.build_parser().parse_args(argv), 7)
    assert cond.positions[0][0, 0, 4:29, 4:61].all() and cond.positions[0].sum() == 25 * 57
    assert cond.positions[1][0, 0, 34:61, 4:61].all() and torch.all(cond.masked_image == -1)
    assert all(g.sum() > 0 for g in cond.glyphs) and cond.colors[0].tolist() == [[1.0, 0.0, 0.0]]
    box = _argv(student_lora_dir, tmp_path / "box.png", "--prompt", '"HELLO"', "--resolution", "128",
                "--positions", "[[8, 8, 120, 100]]")
    drawn = cli.prepare_conditioning(cli.build_parser().parse_args(box), 7)
    revised = cli.prepare_conditioning(cli.build_parser().parse_args(box + ["--revise_position"]), 7)
    assert 0 < revised.positions[0].sum() < drawn.positions[0].sum()   # fitted to the glyphs inside the box
    assert torch.equal(revised.hint, drawn.hint) and revised.warnings == drawn.warnings


def test_edit_mode_from_image_and_mask_files(student_lora_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (140, 100, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((140, 100), np.uint8)
    mask[20:60, 10:90] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    argv = _argv(student_lora_dir, tmp_path / "edit.png", "--prompt", 'a poster that reads "Hi"',
                 "--edit_image", str(tmp_path / "photo.png"), "--edit_mask", str(tmp_path / "mask.png"))
    report = _run(argv, capsys)
    assert report["mode"] == "edit" and report["size"] == [64, 128] and report["texts"] == ["Hi"]
    assert Image.open(tmp_path / "edit.png").size == (64, 128)
    cond = cli.prepare_conditioning(cli.build_parser().parse_args(argv), 7)
    hint = cond.hint[0, 0] > 0
    assert hint[40, 32] and not hint[120, 5]
    assert torch.all(cond.masked_image[0][:, hint] == -1) and torch.all(cond.masked_image[0][:, ~hint] > -1)


def test_compare_teacher_writes_a_grid_with_timings(student_lora_dir, tmp_path, capsys):
    argv = _argv(student_lora_dir, tmp_path / "cmp.png", "--prompt", '"Hi"', "--resolution", "64",
                 "--positions", "[[4, 4, 60, 28]]", "--teacher_steps", "3")
    report = _run(argv + ["--compare_teacher"], capsys)
    runs = report["runs"]
    assert runs["student"]["steps"] == 4 and runs["teacher"]["steps"] == 3
    assert report["speedup"] == pytest.approx(runs["teacher"]["seconds"]["total"] / runs["student"]["seconds"]["total"],
                                              rel=1e-2)
    grid = Image.open(report["compare"])
    assert grid.width >= 2 * 64 and grid.height > 64


@pytest.mark.parametrize("extra, message", [
    (["--prompt", '"A", "B"', "--positions", "[[4, 4, 60, 28]]"], "2 quoted texts but 1 position"),
    (["--prompt", '""', "--positions", "[[4, 4, 60, 28]]"], "text line 1 is empty"),
    (["--prompt", '"A"', "--positions", "[[4, 4, 600, 28]]"], "position 1 reaches outside"),
    (["--prompt", '"5€"', "--positions", "[[4, 4, 60, 28]]"], "no glyph for '€'"),
    (["--prompt", '"A"', "--positions", "[[4, 4"], "not valid JSON"),
    (["--prompt", '"A"', "--edit_image", "{tmp}/broken.png", "--edit_mask", "{tmp}/broken.png"], "cannot read edit mask"),
    (["--prompt", '"A"', "--edit_image", "{tmp}/broken.png"], "--edit_image needs --edit_mask"),
    (["--prompt", '"A"'], "1 quoted text but 0 positions were given"),
    (["--lora_path", ""], "--lora_path (the student adapter folder) is required"),
    (["--lora_path", "{tmp}"], "--lora_path {tmp}: not an adapter folder (no adapter_config.json)"),
    (["--lora_path", "{tmp}/missing"], "--lora_path {tmp}/missing: no such folder"),
    (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
])
def test_bad_input_is_one_clear_error_line(student_lora_dir, tmp_path, capsys, extra, message):
    (tmp_path / "broken.png").write_text("not an image")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    message = message.replace("{tmp}", str(tmp_path))
    assert cli.main(_argv(student_lora_dir, tmp_path / "x.png", "--resolution", "64", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def no_model(monkeypatch):
    """The model builder, replaced by one that fails the test if a flag check lets the run get that far."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was built although a flag is bad")

    monkeypatch.setattr(cli.AnyText2Pipeline, "from_pretrained", refuse)
    return calls


@pytest.fixture
def grid8_lora(student_lora_dir, tmp_path):
    """The student adapter with a recorded 8-step training grid."""
    import shutil

    from student_model_v2.distillation.adapter_info import AdapterInfo

    folder = tmp_path / "grid8"
    shutil.copytree(student_lora_dir, folder)
    AdapterInfo(version="v2_4", objective="lcm", num_inference_steps=8, lora_targets="default", lora_rank=4,
                lora_alpha=4).save(folder)
    return folder


GEN = ["--prompt", 'a sign that reads "Hi", "Yo"', "--positions", "[[4, 4, 60, 28], [4, 34, 60, 60]]"]


@pytest.mark.parametrize("extra, message", [
    (["--num_inference_steps", "60"], "--num_inference_steps 60: the student takes 1 to 50 LCM steps"),
    (["--num_inference_steps", "0"], "--num_inference_steps 0: the student takes 1 to 50 LCM steps"),
    (["--lora_path", "{grid8}", "--num_inference_steps", "9"], "--num_inference_steps 9: the student takes 1 to 8"),
    (["--sampler", "teacher", "--teacher_steps", "2000"], "--teacher_steps 2000: the teacher's DDIM takes 1 to 1000"),
    (["--compare_teacher", "--teacher_steps", "0"], "--teacher_steps 0: the teacher's DDIM takes 1 to 1000"),
    (["--use_mock_dataset", "--resolution", "72"], "--resolution 72: must be a positive multiple of 64"),
    ([*GEN, "--width", "0"], "--width 0: must be a positive multiple of 64"),
    ([*GEN, "--height", "0"], "--height 0: must be a positive multiple of 64"),
    ([*GEN, "--width", "96"], "--width 96: must be a positive multiple of 64"),
    (["--output_path", "{tmp}/missing/x.png"], "--output_path {tmp}/missing/x.png: the folder {tmp}/missing does not"),
    (["--output_path", "{tmp}/x.txt"], "--output_path {tmp}/x.txt: .txt is not an image file extension"),
    (["--output_path", "{tmp}/file.png/x.png"], "{tmp}/file.png is a file, not a folder"),
    (["--output_path", "/proc/x.png"], "--output_path /proc/x.png: cannot write in /proc"),
    ([*GEN, "--mimic", "9", "a.png", "b.png"], "--mimic 9: LINE is the number of a quoted text of the prompt (1 to 2)"),
    ([*GEN, "--colors", "1,2,3", "4,5,6", "7,8,9"], "--colors gives 3 values but the prompt quotes 2 texts"),
    (["--fonts", "none"], "--fonts styles the quoted texts of --prompt"),
    (["--prompt", '"A"', "--edit_image", "{tmp}/file.png", "--edit_mask", "{tmp}/black.png"],
     "--edit_mask {tmp}/black.png: the mask is empty (all black)"),
    (["--prompt", '"A"', "--positions", "{tmp}/black.png"], "--positions {tmp}/black.png: the mask is empty"),
    (["--prompt", '"A"', "--edit_image", "{tmp}/file.png", "--edit_mask", "{tmp}/black.png", "--width", "64"],
     "--width: editing keeps the edit image's size"),
    (["--lora_path", "{tmp}/missing"], "--lora_path {tmp}/missing: no such folder"),
    (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
])
def test_each_bad_flag_exits_2_naming_it_before_the_model_is_built(student_lora_dir, grid8_lora, tmp_path, capsys,
                                                                   no_model, extra, message):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "file.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    extra = [e.replace("{tmp}", str(tmp_path)).replace("{grid8}", str(grid8_lora)) for e in extra]
    argv = _argv(student_lora_dir, tmp_path / "x.png", "--resolution", "64")
    lora = argv.index("--lora_path")
    if "--lora_path" in extra:
        del argv[lora: lora + 2]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert no_model == []


def test_output_path_folder_gets_a_file_name_and_size_flags_are_kept(student_lora_dir, tmp_path):
    args = cli.build_parser().parse_args(_argv(student_lora_dir, tmp_path, *GEN, "--width", "128", "--height", "64"))
    cli.check_arguments(args)
    assert args.output_path == str(tmp_path / "sample.png")
    request = cli.text_request(args)
    assert (request.width, request.height) == (128, 64)


@pytest.fixture(scope="module")
def pcm_lora_dir(student_lora_dir, tmp_path_factory):
    """The student adapter recorded as a 2-phase PCM (v2_5) adapter."""
    import shutil

    from student_model_v2.distillation.adapter_info import AdapterInfo

    folder = tmp_path_factory.mktemp("pcm_lora") / "checkpoint-final"
    shutil.copytree(student_lora_dir, folder)
    AdapterInfo(version="v2_5", objective="pcm", num_inference_steps=50, lora_targets="attention", lora_rank=4,
                lora_alpha=4, num_phases=2).save(folder)
    return folder


def test_the_adapter_record_picks_the_pcm_sampler(pcm_lora_dir, tmp_path, capsys):
    report = _run(_argv(pcm_lora_dir, tmp_path / "p.png", "--use_mock_dataset", "--resolution", "64"), capsys)
    assert report["runs"]["student"]["student_sampler"] == "pcm" and report["runs"]["student"]["steps"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--num_inference_steps", "4"], "trained with 2 phases, so its sampler takes exactly 2 steps"),
    (["--sampler", "lcm"], "only jumps to its 2 phase edges"),
    (["--sampler", "tcd", "--num_inference_steps", "2"], "--sampler pcm (or auto) with 2 steps"),
    (["--sampler", "tcd", "--gamma", "2"], "--gamma must be in [0, 1]"),
])
def test_a_sampler_or_step_count_the_adapter_cannot_serve_is_refused(pcm_lora_dir, tmp_path, capsys, extra, message):
    assert cli.main(_argv(pcm_lora_dir, tmp_path / "x.png", "--use_mock_dataset", "--resolution", "64", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_channels_last_flag_gives_the_eager_images_within_one_level(student_lora_dir, tmp_path, capsys):
    """--channels_last reaches the model (reported in the JSON) and moves pixels by at most float round-off."""
    common = ["--use_mock_dataset", "--resolution", "64", "--num_inference_steps", "2"]
    eager = _run(_argv(student_lora_dir, tmp_path / "e.png", *common), capsys)
    fast = _run(_argv(student_lora_dir, tmp_path / "f.png", *common, "--channels_last"), capsys)
    assert (eager["channels_last"], fast["channels_last"]) == (False, True)
    assert fast["compiled"] == {"unet": None, "writenet": None, "vae_decoder": None} and eager["compiled"] is None
    difference = np.abs(np.asarray(Image.open(tmp_path / "e.png"), int) - np.asarray(Image.open(tmp_path / "f.png")))
    assert difference.max() <= 1
