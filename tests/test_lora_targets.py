"""LoRA target sets: the diffusers LCM-LoRA set mapped to AnyText2's LDM names, and the original one.

The SD1.5-size checks build both models on the ``meta`` device (no weights, no download): AnyText2 from
``models_yaml/anytext2_sd15.yaml`` and diffusers' ``UNet2DConditionModel`` with the SD1.5 config, each
wrapped by peft with its target list, and compare the LoRA parameter counts layer group by layer group.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from student_model_v2.anytext2.checkpoint import build_random_teacher
from student_model_v2.anytext2.model import AnyText2Model
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.distillation.lora import (
    OFFICIAL_LDM_MAP,
    WRITENET_OUTPUTS,
    add_lora,
    detect_lora_targets,
    load_lora,
    lora_parameter_counts,
    lora_target_groups,
    lora_target_modules,
)
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
from student_model_v2.training import trainer as trainer_module
from tests.conftest import FULL_YAML, TINY_YAML
from tests.test_teacher_model import _tiny_text_info

RANK = 64
# The diffusers LCM-LoRA script's list (train_lcm_distill_lora_sd_wds.py), written out independently here.
DIFFUSERS_LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                              "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                              "time_emb_proj"]
# The original toolkit's set on SD1.5 at rank 64, as main counted it before the official set existed.
ATTENTION_SET_COUNTS = {"unet": 12_754_944, "unet_attnx": 6_995_968, "writenet": 7_241_728, "total": 26_992_640}


def _lora_module(param_name: str) -> str:
    return param_name.split(".lora_")[0].removeprefix("base_model.model.")


def _diffusers_counts_by_target() -> Counter:
    """LoRA parameters of the official script's peft config on diffusers' SD1.5 UNet, by target name."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        peft_unet = get_peft_model(unet, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=DIFFUSERS_LCM_LORA_TARGETS))
    counts = Counter()
    for name, param in peft_unet.named_parameters():
        if ".lora_" in name:
            module = _lora_module(name)
            matches = [t for t in DIFFUSERS_LCM_LORA_TARGETS if module == t or module.endswith("." + t)]
            assert len(matches) == 1, (module, matches)
            counts[matches[0]] += param.numel()
    return counts


def _anytext2_sd15(targets: str):
    with torch.device("meta"):
        model = AnyText2Model.from_yaml(FULL_YAML)
        groups = lora_target_groups(model, targets)
        return add_lora(model, RANK, RANK, targets=targets), groups


def test_official_set_matches_the_diffusers_lcm_lora_count_on_sd15(capsys):
    peft_model, groups = _anytext2_sd15("official")
    group_of = {module: group for group, modules in groups.items() for module in modules}
    by_group, attnx = Counter(), 0
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        module = _lora_module(name)
        if not module.startswith("model.diffusion_model."):
            continue
        if ".attn1x." in module or ".attn2x." in module:
            attnx += param.numel()
        else:
            by_group[group_of[module]] += param.numel()
    diffusers = _diffusers_counts_by_target()
    counts = lora_parameter_counts(peft_model)
    with capsys.disabled():
        print(f"\nSD1.5 rank {RANK}, official targets: AnyText2 UNet {counts['unet']:,} (+ AttnX {counts['unet_attnx']:,}), "
              f"WriteNet {counts['writenet']:,}, total {counts['total']:,}; diffusers LCM-LoRA UNet "
              f"{sum(diffusers.values()):,}")
    assert set(diffusers) == {name for name, _, _ in OFFICIAL_LDM_MAP} == set(DIFFUSERS_LCM_LORA_TARGETS)
    assert counts["unet"] == sum(by_group.values()) and counts["unet_attnx"] == attnx > 0
    assert abs(counts["unet"] - sum(diffusers.values())) <= 0.05 * sum(diffusers.values())
    # layer group by layer group the mapping is exact: every diffusers module has its LDM twin
    assert dict(by_group) == dict(diffusers)
    assert counts["writenet"] > 0 and counts["total"] == counts["unet"] + counts["unet_attnx"] + counts["writenet"]
    assert len(groups[WRITENET_OUTPUTS]) == 13


def test_attention_set_reproduces_the_original_count_on_sd15():
    with torch.device("meta"):
        base = AnyText2Model.from_yaml(FULL_YAML)
    original_rule = sorted(
        name for name, module in base.named_modules()
        if name.startswith(("model.diffusion_model.", "control_model."))
        and not any(b in name for b in ("glyph_block", "position_block", "fuse_block_za"))
        and ((isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")))
             or (isinstance(module, torch.nn.Conv2d) and (".zero_convs." in name or "middle_block_out." in name))))
    assert lora_target_modules(base, "attention") == original_rule
    official = set(lora_target_modules(base, "official"))
    assert set(original_rule) < official, "the official set contains the original one"
    assert not any(b in n for n in official for b in ("glyph_block", "position_block", "fuse_block_za", "time_embed",
                                                      "input_blocks.0.0", "diffusion_model.out."))
    with torch.device("meta"):
        peft_model = add_lora(base, RANK, RANK, targets="attention")
    assert lora_parameter_counts(peft_model) == ATTENTION_SET_COUNTS
    assert lora_target_modules(peft_model.get_base_model(), "attention") == original_rule, "wrapped model, same names"


def test_every_official_target_is_on_the_student_path():
    model = build_random_teacher(TINY_YAML)
    peft_model = add_lora(model, rank=4, alpha=4)
    info = _tiny_text_info()
    with torch.no_grad():
        cond, _ = model.encode_conditions(info, ["a sign"] * 2, ["Text says * , * . "] * 2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = model.predict_eps(x, torch.tensor([400, 20]), cond, model.control_residuals(cond))
    eps.square().mean().backward()
    lora_b = {n: p for n, p in peft_model.named_parameters() if ".lora_B." in n}
    assert len(lora_b) == len(lora_target_modules(model, "official"))
    silent = [n for n, p in lora_b.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not silent, f"adapted modules the student never uses: {silent[:5]}"


@pytest.mark.parametrize("targets", ["official", "attention"])
def test_a_saved_adapter_reports_its_target_set(tmp_path, targets):
    add_lora(build_random_teacher(TINY_YAML), 4, 4, targets=targets).save_pretrained(str(tmp_path))
    assert detect_lora_targets(load_lora(build_random_teacher(TINY_YAML), tmp_path)) == targets


def test_unknown_target_set_is_refused():
    with pytest.raises(ValueError, match="--lora_targets 'all' is not one of official, attention"):
        lora_target_groups(torch.nn.Module(), "all")


def test_trainer_records_the_target_set_and_keeps_a_resumed_adapters(tmp_path, caplog):
    common = ["--resolution", "64", "--train_batch_size", "1",
              "--eval_batches", "0", "--save_steps", "0", "--use_mock_dataset", "--mock_size", "2", "--train_ratio",
              "1.0", "--val_ratio", "0", "--test_ratio", "0", "--output_dir", str(tmp_path)]
    first = trainer_module.run(LCMObjective, common + ["--max_train_steps", "1", "--lora_targets", "attention",
                                                       "--lora_rank", "4", "--lora_alpha", "4"], "t")
    expected = {"unet": 0, "unet_attnx": 0, "writenet": 0}
    for module in lora_target_modules(first.model, "attention"):
        part = "writenet" if module.startswith("control_model.") else (
            "unet_attnx" if (".attn1x." in module or ".attn2x." in module) else "unet")
        weight = dict(first.model.named_modules())[module].base_layer.weight
        expected[part] += 4 * (weight.shape[1] * weight[0, 0].numel() + weight.shape[0])
    assert first.lora_parameters == {**expected, "total": sum(expected.values())}
    info = AdapterInfo.load(tmp_path / "checkpoint-final")
    assert (info.lora_targets, info.lora_rank, info.lora_alpha) == ("attention", 4, 4.0)
    # resumed with the default flags (official, rank 64): the adapter's own set, rank and alpha are recorded
    resumed = trainer_module.run(
        LCMObjective, common + ["--max_train_steps", "2", "--resume_path", str(tmp_path / "checkpoint-final")], "t")
    assert resumed.args.lora_targets == "attention" and resumed.lora_parameters == first.lora_parameters
    info = json.loads((tmp_path / "checkpoint-final" / "distillation.json").read_text())
    assert (info["lora_targets"], info["lora_rank"], info["lora_alpha"]) == ("attention", 4, 4.0)


def test_bench_train_reports_the_lora_parameter_count(tmp_path, capsys):
    from student_model_v2 import bench

    out = tmp_path / "bench.json"
    bench.main(["train", "--resolution", "32", "--batch_size", "1", "--steps", "1", "--warmup", "0", "--lora_rank", "4",
                "--lora_targets", "attention", "--json", str(out)])
    capsys.readouterr()
    report = json.loads(out.read_text())
    counts = report["versions"]["v2_4"]["lora_parameters"]
    assert report["lora_targets"] == "attention"
    with torch.device("meta"):
        model = AnyText2Model.from_yaml(TINY_YAML)
        expected = lora_parameter_counts(add_lora(model, 4, 4, targets="attention"))
    assert counts == expected and counts["total"] > 0
