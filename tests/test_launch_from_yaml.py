"""YAML launcher: merge rules, flag conversion, validation, dispatch, overrides, cache preparation, and
one real v2_4 run on the tiny config."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from student_model_v2 import launch_from_yaml as launcher
from student_model_v2.launch_from_yaml import Entry, LaunchError

REPO_ROOT = Path(__file__).resolve().parent.parent
V2_4_PATH = "student_model_v2/train_lcm_anytext_v2_4.py"
TEMPLATES = ["train_config_quickstart.yaml", "train_config_template_v4.yaml", "train_config_template_v4_LMDB.yaml"]

FAKE_SCRIPT = '''
import argparse

CALLS = []


def build_argument_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="")
    parser.add_argument("--output_dir", default="out")
    parser.add_argument("--dataset_json", nargs="+", default=["a.json"])
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--my_switch", action="store_true")
    parser.add_argument("--add_time_suffix", action="store_true")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--name", default="")
    return parser


def main(argv=None):
    CALLS.append((NAME, list(argv)))
'''


@pytest.fixture
def fake_scripts(tmp_path, monkeypatch):
    """Two importable fake training scripts (``fake_train_v2``, ``fake_train_v2_2``) sharing one call log."""
    folder = tmp_path / "fake_pkg"
    folder.mkdir()
    calls: list[tuple[str, list[str]]] = []
    for name in ("fake_train_v2", "fake_train_v2_2"):
        (folder / f"{name}.py").write_text(FAKE_SCRIPT.replace("CALLS = []", f"CALLS = []\nNAME = {name!r}"))
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(launcher, "DEFAULT_SCRIPT", "fake_train_v2")
    monkeypatch.setattr(launcher, "OPTIMIZED_SCRIPT", "fake_train_v2_2")

    def recorded() -> list[tuple[str, list[str]]]:
        calls.clear()
        for name in ("fake_train_v2", "fake_train_v2_2"):
            if name in sys.modules:
                calls.extend(sys.modules[name].CALLS)
        return calls

    return recorded


def write_yaml(folder: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        launcher.main(argv)
    assert excinfo.value.code == launcher.ERROR_EXIT_CODE
    return capsys.readouterr().err


def test_merge_order_and_section_rules():
    data = {
        "use_optimized": True,
        "a": "model", "d": "top-only",
        "model": {"a": "model", "b": "model"},
        "data": {"b": "data", "c": "data"},
        "train": {"c": "train"},
        "system": {"num_gpus": 8, "e": "ignored"},
    }
    merged = launcher.merge_sections(data, "x.yaml")
    assert {k: e.value for k, e in merged.items()} == {
        "a": "model", "b": "data", "c": "train", "use_optimized": True, "d": "top-only"}
    assert merged["a"].origin == "model section of x.yaml"
    assert merged["c"].origin == "train section of x.yaml"
    assert merged["d"].origin == "top level of x.yaml"


def test_top_level_key_conflicting_with_a_section_is_an_error(tmp_path, capsys, fake_scripts):
    cfg = write_yaml(tmp_path, {"learning_rate": 1e-3, "train": {"learning_rate": 1e-4}}, "two.yaml")
    err = run_error(["--config", str(cfg)], capsys)
    assert "key 'learning_rate' is 0.001 at the top level of two.yaml but 0.0001 in the train section" in err
    assert fake_scripts() == []


def test_section_must_be_a_mapping(tmp_path, capsys, fake_scripts):
    cfg = write_yaml(tmp_path, {"train": ["learning_rate", 1]})
    assert "section 'train' must be a mapping" in run_error(["--config", str(cfg)], capsys)


def test_bool_list_and_scalar_conversion(fake_scripts):
    import fake_train_v2

    parser = fake_train_v2.build_argument_parser()
    merged = {
        "my_switch": Entry(True, "t"), "add_time_suffix": Entry(False, "t"), "streaming": Entry(False, "t"),
        "dataset_json": Entry(["/d/a.json", "/d/b.json", "/d/c.json"], "t"),
        "learning_rate": Entry(1e-4, "t"), "resolution": Entry(64, "t"), "name": Entry("", "t"),
        "output_dir": Entry(None, "t"), "mixed_precision": Entry("bf16", "t"),
    }
    assert launcher.build_args(merged, parser) == [
        "--my_switch", "--no-streaming", "--dataset_json", "/d/a.json", "/d/b.json", "/d/c.json",
        "--learning_rate", "0.0001", "--resolution", "64", "--mixed_precision", "bf16"]
    single = launcher.build_args({"dataset_json": Entry("/d/a.json", "t")}, parser)
    assert single == ["--dataset_json", "/d/a.json"]


def test_unknown_key_exits_with_suggestion(tmp_path, capsys, fake_scripts):
    cfg = write_yaml(tmp_path, {"train": {"learnig_rate": 1e-4}}, "my_run.yaml")
    err = run_error(["--config", str(cfg)], capsys)
    assert "unknown key 'learnig_rate' in train section of my_run.yaml; did you mean 'learning_rate'?" in err
    assert fake_scripts() == []


def test_unknown_legacy_key_explains(tmp_path, capsys, fake_scripts):
    cfg = write_yaml(tmp_path, {"data": {"auto_list_path": "x.list"}})
    assert "original toolkit" in run_error(["--config", str(cfg)], capsys)


@pytest.mark.parametrize("section, expected", [
    ({"learning_rate": [1e-4, 2e-4]}, "expects a single value of type float, got a list"),
    ({"resolution": "big"}, "expects a value of type int, got 'big'"),
    ({"resolution": True}, "true/false is only for on/off flags"),
    ({"mixed_precision": "fp8"}, "must be one of no, fp16, bf16"),
    ({"my_switch": "yes"}, "is an on/off flag: use true or false"),
    ({"dataset_json": []}, "needs at least one value"),
    ({"name": {"nested": 1}}, "got a mapping"),
])
def test_wrong_typed_value_errors(tmp_path, capsys, fake_scripts, section, expected):
    cfg = write_yaml(tmp_path, {"train": section})
    err = run_error(["--config", str(cfg)], capsys)
    key = next(iter(section))
    assert f"key '{key}' in train section of cfg.yaml" in err
    assert expected in err
    assert fake_scripts() == []


def test_print_args_prints_module_and_quoted_args(tmp_path, capsys, fake_scripts):
    cfg = write_yaml(tmp_path, {"model": {"name": "two words"}, "train": {"my_switch": True}})
    assert launcher.main(["--config", str(cfg), "--print_args"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "script: fake_train_v2"
    assert out[1].startswith("args: ")
    assert shlex.split(out[1][len("args: "):]) == ["--name", "two words", "--my_switch"]
    assert fake_scripts() == []


def test_dispatch_default_and_use_optimized(tmp_path, fake_scripts):
    for flag, expected in ((None, "fake_train_v2"), (False, "fake_train_v2"), (True, "fake_train_v2_2")):
        data = {"train": {"resolution": 64}}
        if flag is not None:
            data["use_optimized"] = flag
        launcher.main(["--config", str(write_yaml(tmp_path, data))])
        assert fake_scripts()[-1] == (expected, ["--resolution", "64"])
    assert launcher.script_module_name(None, Entry(True, "t")) == "fake_train_v2_2"


def test_real_default_script_names():
    assert launcher.script_module_name(None, None) == "student_model_v2.train_lcm_anytext_v2"
    assert launcher.script_module_name(None, Entry(True, "t")) == "student_model_v2.train_lcm_anytext_v2_2"


def test_train_script_wins_and_is_never_forwarded(tmp_path, fake_scripts):
    script = tmp_path / "fake_pkg" / "fake_train_v2_2.py"
    cfg = write_yaml(tmp_path, {"train_script": str(script), "use_optimized": False, "train": {"resolution": 32}})
    launcher.main(["--config", str(cfg)])
    assert fake_scripts() == [("fake_train_v2_2", ["--resolution", "32"])]


def test_train_script_path_in_repo_becomes_module():
    assert launcher.script_module_name(Entry(V2_4_PATH, "t"), None) == "student_model_v2.train_lcm_anytext_v2_4"
    assert launcher.script_module_name(Entry("student_model_v2.train_lcm_anytext_v2_4", "t"), None) == \
        "student_model_v2.train_lcm_anytext_v2_4"
    with pytest.raises(LaunchError, match="no such Python file"):
        launcher.script_module_name(Entry("student_model_v2/train_nope.py", "train section of x.yaml"), None)


def test_missing_script_module_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "DEFAULT_SCRIPT", "no_such_training_module_xyz")
    cfg = write_yaml(tmp_path, {"train": {"resolution": 64}})
    assert "training script module 'no_such_training_module_xyz' not found" in run_error(["--config", str(cfg)], capsys)


def test_overrides_are_appended_after_yaml_args(tmp_path, fake_scripts):
    cfg = write_yaml(tmp_path, {"model": {"config": "/m/a.yaml"}, "train": {"resolution": 512, "my_switch": True}})
    launcher.main(["--config", str(cfg), "--resolution", "64", "--name", "x", "--", "--config", "/m/b.yaml"])
    name, argv = fake_scripts()[-1]
    assert argv == ["--config", "/m/a.yaml", "--resolution", "512", "--my_switch",
                    "--resolution", "64", "--name", "x", "--config", "/m/b.yaml"]
    import fake_train_v2

    parsed = fake_train_v2.build_argument_parser().parse_args(argv)
    assert (parsed.resolution, parsed.config) == (64, "/m/b.yaml")


def test_relative_paths_resolve_against_repo_root(tmp_path, fake_scripts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_yaml(tmp_path, {"model": {"config": "models_yaml/anytext2_tiny.yaml", "output_dir": "/abs/out"},
                                "data": {"dataset_json": ["a.json,b.json", "/abs/c.json"]},
                                "train": {"name": "not/a/path/key"}})
    launcher.main(["--config", str(cfg)])
    _, argv = fake_scripts()[-1]
    assert argv == ["--config", str(REPO_ROOT / "models_yaml/anytext2_tiny.yaml"), "--output_dir", "/abs/out",
                    "--dataset_json", f"{REPO_ROOT / 'a.json'},{REPO_ROOT / 'b.json'}", "/abs/c.json",
                    "--name", "not/a/path/key"]


def test_prepare_cache_builds_indexes_and_exits(tmp_path, capsys):
    cache = tmp_path / "cache"
    cfg = write_yaml(tmp_path, {"train_script": V2_4_PATH,
                                "data": {"dataset_json": ["demodataset/annotations/demo_data.json"],
                                         "cache_dir": str(cache)}})
    assert launcher.main(["--config", str(cfg), "--prepare_cache"]) == 0
    out = capsys.readouterr().out
    assert "demo_data.json: 48 of 48 items kept" in out
    assert len(list(cache.glob("demo_data.json.*.idx.npy"))) == 1
    assert len(list(cache.glob("demo_data.json.*.meta.json"))) == 1


def test_prepare_cache_only_on_rank_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cache = tmp_path / "cache"
    cfg = write_yaml(tmp_path, {"train_script": V2_4_PATH, "data": {"cache_dir": str(cache)}})
    assert launcher.main(["--config", str(cfg), "--prepare_cache"]) == 0
    assert "rank 1 skips" in capsys.readouterr().out
    assert not cache.exists()


def test_prepare_cache_names_a_missing_dataset_file(tmp_path, capsys):
    cfg = write_yaml(tmp_path, {"train_script": V2_4_PATH,
                                "data": {"dataset_json": "missing/nope.json", "cache_dir": str(tmp_path)}})
    assert "nope.json" in run_error(["--config", str(cfg), "--prepare_cache"], capsys)


@pytest.mark.parametrize("template", TEMPLATES)
def test_shipped_templates_resolve_against_v2_4(template, capsys):
    assert launcher.main(["--config", str(REPO_ROOT / "student_model_v2" / template), "--print_args"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "script: student_model_v2.train_lcm_anytext_v2_4"
    argv = shlex.split(out[1][len("args: "):])
    assert "--resume_path" not in argv and "--target_from_teacher" not in argv


def test_runs_as_a_file_from_any_directory(tmp_path):
    cfg = write_yaml(tmp_path, {"train_script": V2_4_PATH, "model": {"config": "models_yaml/anytext2_tiny.yaml"},
                                "train": {"lora_rank": 4, "add_time_suffix": True}})
    script = REPO_ROOT / "student_model_v2" / "launch_from_yaml.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    ok = subprocess.run([sys.executable, str(script), "--config", str(cfg), "--print_args"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"--config {REPO_ROOT / 'models_yaml/anytext2_tiny.yaml'} --lora_rank 4 --add_time_suffix" in ok.stdout
    fake = tmp_path / "fake_train_file.py"
    fake.write_text(FAKE_SCRIPT.replace("CALLS = []", "CALLS = []\nNAME = 'file'"))
    bad = write_yaml(tmp_path, {"train_script": str(fake), "train": {"learnig_rate": 4}}, "bad.yaml")
    failed = subprocess.run([sys.executable, str(script), "--config", str(bad)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == launcher.ERROR_EXIT_CODE
    assert "unknown key 'learnig_rate' in train section of bad.yaml; did you mean 'learning_rate'?" in failed.stderr


def test_end_to_end_v2_4_tiny_run(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        train_script: {V2_4_PATH}
        model:
          config: models_yaml/anytext2_tiny.yaml
          output_dir: {out}
          add_time_suffix: false
        data:
          dataset_json: [demodataset/annotations/demo_data.json]
          cache_dir: {tmp_path / "cache"}
          resolution: 64
          num_workers: 0
        train:
          max_train_steps: 2
          train_batch_size: 1
          gradient_accumulation_steps: 1
          lora_rank: 4
          lora_alpha: 4
          mixed_precision: "no"
          target_from_teacher: false
          save_steps: 0
          log_image_steps: 0
          eval_batches: 0
        system:
          notes: ignored
        """))
    assert launcher.main(["--config", str(cfg)]) == 0
    assert (out / "checkpoint-final" / "adapter_model.safetensors").is_file()
    assert (out / "RANDOM_INIT_TEACHER.txt").is_file()


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  learning_rate: 1.0e-4\n  resolution: 64\n  learning_rate: 1.0e-3\n", "learning_rate", (4, 2)),
    ("use_optimized: true\nmodel:\n  config: a.yaml\nuse_optimized: false\n", "use_optimized", (4, 1)),
])
def test_duplicate_yaml_key_is_refused_with_its_lines(tmp_path, capsys, fake_scripts, text, key, lines):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(text)
    assert yaml.safe_load(text) is not None, "plain YAML accepts the file (and silently keeps the last value)"
    err = run_error(["--config", str(cfg)], capsys)
    assert f"dup.yaml: duplicate key '{key}' on line {lines[0]} (first set on line {lines[1]})" in err
    assert fake_scripts() == []


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("base: &base {learning_rate: 1.0e-4, resolution: 64}\ntrain:\n  <<: *base\n  resolution: 128\n")
    assert launcher.load_template(cfg)["train"] == {"learning_rate": 1.0e-4, "resolution": 128}
