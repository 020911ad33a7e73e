"""A LoRA folder made for another model is refused before any weight is loaded, with one message, by every
entry point: the checker itself, the inference CLI, the pipeline, the demo's start-up, eval_ocr and
eval_distillation (each with its model builder replaced by one that fails the test if it is reached)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from student_model_v2 import demo_v2, eval_distillation, eval_ocr
from student_model_v2 import infer_lcm_anytext_v2 as cli
from student_model_v2.distillation.adapter_check import AdapterError, AdapterMismatchError, check_adapter
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.inference.inputs import InferenceInputError
from student_model_v2.inference.pipeline import AnyText2Pipeline

from .conftest import TINY_YAML

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def clip_qv_adapter(tmp_path_factory):
    """A peft LoRA on a CLIP text model's q/v projections: another model and another module set."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16))
    folder = tmp_path_factory.mktemp("clip_qv")
    get_peft_model(clip, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def wrong_shapes_adapter(student_lora_dir, tmp_path_factory):
    """The student adapter's names with the input width doubled, as if trained on a wider model; it records
    what it was trained for."""
    folder = tmp_path_factory.mktemp("wrong_shapes")
    shutil.copy(student_lora_dir / "adapter_config.json", folder)
    state = load_file(str(student_lora_dir / WEIGHTS))
    save_file({k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in state.items()}, str(folder / WEIGHTS))
    AdapterInfo(version="v2_4", objective="lcm", num_inference_steps=50, lora_targets="official", lora_rank=4,
                lora_alpha=4).save(folder)
    return folder


def test_the_matching_adapter_passes_with_every_tensor_checked(student_lora_dir):
    adapter = check_adapter(TINY_YAML, student_lora_dir)
    assert len(adapter.shapes) == len(load_file(str(student_lora_dir / WEIGHTS))) > 0 and adapter.info is None


def test_an_older_peft_bin_file_is_read_too(student_lora_dir, wrong_shapes_adapter, tmp_path):
    for name, source in (("good", student_lora_dir), ("bad", wrong_shapes_adapter)):
        (tmp_path / name).mkdir()
        shutil.copy(source / "adapter_config.json", tmp_path / name)
        torch.save(load_file(str(source / WEIGHTS)), tmp_path / name / "adapter_model.bin")
    assert check_adapter(TINY_YAML, tmp_path / "good").shapes == check_adapter(TINY_YAML, student_lora_dir).shapes
    with pytest.raises(AdapterMismatchError, match="LoRA tensors with other shapes"):
        check_adapter(TINY_YAML, tmp_path / "bad")


def test_an_adapter_for_another_model_is_one_message_with_counts_and_names(clip_qv_adapter):
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter(TINY_YAML, clip_qv_adapter)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{clip_qv_adapter} does not fit this model")
    assert "LoRA tensors missing from the file (first: cond_stage_model.transformer.text_model.encoder" in message
    assert "8 unexpected LoRA tensors (first: " in message and "self_attn.q_proj.lora_A.weight" in message
    assert "no distillation.json" in message


def test_wrong_shapes_are_reported_with_both_shapes_and_the_training_record(wrong_shapes_adapter, student_lora_dir):
    count = sum(".lora_A." in k for k in load_file(str(student_lora_dir / WEIGHTS)))
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter(TINY_YAML, wrong_shapes_adapter)
    message = str(info.value)
    assert f"{count} LoRA tensors with other shapes" in message and "missing" not in message
    shown = re.search(r"is \[4, (\d+)(?:, 3, 3)?\], the model needs \[4, (\d+)", message)
    assert shown and int(shown.group(1)) == 2 * int(shown.group(2)), message
    assert "trained by v2_4 for lcm on a 50-step grid, LoRA targets 'official', rank 4" in message


def test_target_modules_the_model_lacks_are_named(student_lora_dir, tmp_path):
    shutil.copytree(student_lora_dir, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"]) + ["model.diffusion_model.no_such_block.to_q"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="1 of its target modules are not in the model "
                                                   r"\(first: model.diffusion_model.no_such_block.to_q\)"):
        check_adapter(TINY_YAML, tmp_path / "a")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "missing: no such folder"),
    (lambda tmp: tmp, "not an adapter folder (no adapter_config.json)"),
    (lambda tmp: (tmp / "adapter_config.json").write_text('{"peft_type": "IA3"}') and tmp, "a IA3 adapter, not a LoRA"),
    (lambda tmp: (tmp / "adapter_config.json").write_text("{") and tmp, "adapter_config.json: unreadable"),
])
def test_folders_that_are_no_lora_adapter(tmp_path, make, message):
    with pytest.raises(AdapterError) as info:
        check_adapter(TINY_YAML, make(tmp_path))
    assert message in str(info.value)


def _refuse(calls: list):
    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was built although the adapter does not fit")
    return refuse


@pytest.mark.parametrize("adapter", ["clip_qv_adapter", "wrong_shapes_adapter"])
def test_every_entry_point_refuses_it_before_the_model_with_the_same_message(request, adapter, tmp_path, capsys,
                                                                            monkeypatch):
    folder = request.getfixturevalue(adapter)
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter(TINY_YAML, folder)
    core = str(info.value)
    built: list = []
    monkeypatch.setattr(AnyText2Pipeline, "from_pretrained", _refuse(built))
    monkeypatch.setattr(demo_v2, "load_pipeline", _refuse(built))

    common = ["--config", str(TINY_YAML), "--device", "cpu"]
    assert cli.main([*common, "--teacher_ckpt", "", "--lora_path", str(folder), "--output_path",
                     str(tmp_path / "x.png"), "--use_mock_dataset", "--resolution", "64"]) == 2
    assert capsys.readouterr().err == f"error: --lora_path {core}\n"
    assert demo_v2.main([*common, "--student_lora_path", str(folder)]) == 2
    assert capsys.readouterr().err == f"error: --student_lora_path {core}\n"
    with pytest.raises(SystemExit, match=f"^error: --lora_path {re.escape(core)}$"):
        eval_ocr.evaluate(eval_ocr.build_parser().parse_args([*common, "--teacher_ckpt", "", "--lora_path", str(folder),
                                                              "--output_dir", str(tmp_path / "ocr")]))
    assert built == []

    run = tmp_path / "run"
    shutil.copytree(folder, run / "checkpoint-final")
    (run / "args.json").write_text(json.dumps({"config": str(TINY_YAML), "use_mock_dataset": False}))
    monkeypatch.setattr(eval_distillation, "build_random_teacher", _refuse(built))
    monkeypatch.setattr(eval_distillation, "load_teacher", _refuse(built))
    with pytest.raises(SystemExit) as exit_info:
        eval_distillation.main(["--adapter", str(run / "checkpoint-final")])
    assert exit_info.value.code == 2 and built == []
    assert capsys.readouterr().err == f"error: --adapter {core.replace(str(folder), str(run / 'checkpoint-final'))}\n"


def test_the_pipeline_refuses_it_before_peft_loads_anything(wrong_shapes_adapter, tiny_teacher):
    pipe = AnyText2Pipeline(tiny_teacher)
    with pytest.raises(InferenceInputError, match=f"^student LoRA {re.escape(str(wrong_shapes_adapter))} does not fit this model: "):
        pipe.load_lora(wrong_shapes_adapter)
    assert not pipe.has_lora and not any("lora_" in name for name, _ in tiny_teacher.named_parameters())


def test_from_pretrained_checks_the_adapter_before_building_the_teacher(wrong_shapes_adapter, monkeypatch):
    from student_model_v2.inference import pipeline

    monkeypatch.setattr(pipeline, "load_swapped_teacher", _refuse([]))
    with pytest.raises(InferenceInputError, match=f"^student LoRA {re.escape(str(wrong_shapes_adapter))} does not fit"):
        AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=wrong_shapes_adapter, device="cpu")
