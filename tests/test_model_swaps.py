"""AnyText2's optional model swaps (``model_swaps.py``): another SD1.5 base model and community LoRAs,
through the pipeline's rebuild, the inference CLI and the demo, on the tiny config.

The synthetic files are built from the tiny model itself: an "SD1.5 checkpoint" is its perturbed UNet and
text encoder without the AttnX keys (plus VAE keys that must be ignored), and the LoRAs name their layers
through the diffusers names of :class:`LayerNames`, written out as kohya or diffusers keys.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from student_model_v2.anytext2.checkpoint import build_random_teacher
from student_model_v2.anytext2.config import load_model_config
from student_model_v2.anytext2.model import AnyText2Model
from student_model_v2.inference import model_swaps as swaps
from student_model_v2.inference.inputs import InferenceInputError
from student_model_v2.inference.pipeline import AnyText2Pipeline, SamplingOptions, TextRequest

from .conftest import FULL_YAML, TINY_YAML

ATTNX = (".attn1x.", ".attn2x.")
REQUEST = TextRequest(prompt='a sign that reads "Hi"', positions=[[4, 4, 60, 28]], width=64, height=64)
STUDENT = SamplingOptions(seed=3, steps=2)
TEACHER = SamplingOptions(sampler="teacher", seed=3, steps=2)
# (LDM layer, rank, alpha or None): attention Linear layers, the 768-wide cross-attention input, a resnet 3x3
# conv (LoCon), a 1x1 proj_in conv, the upsampler conv, a time-embedding Linear and a text-encoder projection
LORA_LAYERS = [
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", 4, 2.0),
    ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k", 4, 8.0),
    ("model.diffusion_model.output_blocks.3.0.in_layers.2", 2, 1.0),
    ("model.diffusion_model.output_blocks.1.1.proj_in", 4, None),
    ("model.diffusion_model.output_blocks.1.2.conv", 3, 3.0),
    ("model.diffusion_model.time_embed.0", 4, 4.0),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj", 4, 2.0),
]


def _base_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.startswith(swaps.BASE_MODEL_PREFIXES) and not any(m in k for m in ATTNX)]


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An fp16 'SD1.5 checkpoint' of the tiny model: perturbed UNet + text encoder (no AttnX), CLIP's
    position_ids, and perturbed VAE keys that a base-model swap must ignore. Returns it and the expected tensors."""
    state = build_random_teacher(TINY_YAML).state_dict()
    base = set(_base_keys(state))
    generator = torch.Generator().manual_seed(1)
    noisy = {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).half() for k, v in state.items()
             if k in base or k.startswith("first_stage_model.encoder.")}
    noisy["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path_factory.mktemp("base") / "sd15_like.safetensors"
    save_file(noisy, str(path))
    return path, {k: v for k, v in noisy.items() if k in base}


def _low_rank_pair(shape: torch.Size, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight: Linear (r, in) / (out, r); Conv2d k x k (r, in, k, k) / (out, r, 1, 1) (LoCon)."""
    down = torch.randn((rank, *shape[1:]), generator=generator) * 0.1
    up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=generator) * 0.1
    return down, up


def _lora_file(folder: Path, style: str, teacher: AnyText2Model, seed: int = 0) -> tuple[Path, dict[str, tuple]]:
    """A LoRA for :data:`LORA_LAYERS` in kohya or diffusers form; also returns (down, up, alpha/rank) per layer."""
    layers = swaps.mergeable_layers(teacher)
    names = swaps.LayerNames(load_model_config(TINY_YAML).unet)
    generator = torch.Generator().manual_seed(seed)
    state, parts = {}, {}
    for index, (layer, rank, alpha) in enumerate(LORA_LAYERS):
        down, up = _low_rank_pair(layers[layer], rank, generator)
        diffusers = names.to_diffusers(layer)
        if style == "kohya":
            unet = diffusers.startswith("unet.")
            prefix = ("lora_unet_" + diffusers[len("unet."):] if unet
                      else "lora_te_" + diffusers[len("text_encoder."):]).replace(".", "_")
            keys = (f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha")
        else:  # diffusers: peft names for most layers, the older lora.down/lora.up for every other one
            down_name, up_name = ("lora_A", "lora_B") if index % 2 else ("lora.down", "lora.up")
            keys = (f"{diffusers}.{down_name}.weight", f"{diffusers}.{up_name}.weight", f"{diffusers}.alpha")
        state[keys[0]], state[keys[1]] = down, up
        if alpha is not None:
            state[keys[2]] = torch.tensor(alpha)
        parts[layer] = (down, up, (alpha if alpha is not None else rank) / rank)
    path = folder / ("kohya.safetensors" if style == "kohya" else "pytorch_lora_weights.bin")
    if style == "kohya":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, parts


@pytest.fixture(scope="module")
def kohya_lora(tmp_path_factory, tiny_teacher) -> Path:
    return _lora_file(tmp_path_factory.mktemp("kohya"), "kohya", tiny_teacher, seed=5)[0]


# --------------------------------------------------------------------------------------------------
# names


def _diffusers_unet(unet_config: dict) -> nn.Module:
    """diffusers' own UNet2DConditionModel for an LDM UNet config, on the meta device (names and shapes only)."""
    from diffusers import UNet2DConditionModel

    levels = range(len(unet_config["channel_mult"]))
    attention = {int(r) for r in unet_config["attention_resolutions"]}
    with torch.device("meta"):
        return UNet2DConditionModel(
            in_channels=4, out_channels=4, layers_per_block=int(unet_config["num_res_blocks"]),
            block_out_channels=tuple(int(unet_config["model_channels"]) * m for m in unet_config["channel_mult"]),
            down_block_types=tuple("CrossAttnDownBlock2D" if 2 ** k in attention else "DownBlock2D" for k in levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if 2 ** k in attention else "UpBlock2D"
                                 for k in reversed(levels)),
            cross_attention_dim=int(unet_config["context_dim"]), attention_head_dim=int(unet_config["num_heads"]))


@pytest.mark.parametrize("yaml", [TINY_YAML, FULL_YAML], ids=["tiny", "sd15"])
def test_layer_names_pair_every_unet_layer_with_diffusers(yaml):
    """Every Linear/Conv2d of our UNet but AttnX is a layer of diffusers' UNet of the same shape, and back."""
    config = load_model_config(yaml)
    with torch.device("meta"):
        ours = swaps.mergeable_layers(AnyText2Model(config))
    theirs = {f"unet.{name}": module.weight.shape for name, module in _diffusers_unet(config.unet).named_modules()
              if isinstance(module, (nn.Linear, nn.Conv2d))}
    names = swaps.LayerNames(config.unet)
    unet = {k: v for k, v in ours.items() if k.startswith(swaps.UNET_PREFIX) and not any(m in k for m in ATTNX)}
    paired = {names.to_diffusers(k): k for k in unet}
    assert set(paired) == set(theirs) and len(paired) == len(unet)
    assert all(theirs[d] == unet[k] and names.to_ldm(d) == k for d, k in paired.items())
    text_layer = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"
    assert names.to_diffusers(text_layer) == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    assert names.to_ldm("text_encoder.text_model.encoder.layers.0.mlp.fc1") == text_layer
    assert names.to_diffusers("control_model.input_blocks.1.1.proj_in") is None
    assert names.to_ldm(f"unet.down_blocks.{len(config.unet['channel_mult'])}.resnets.0.conv1") is None


def test_sd15_names_of_known_layers():
    names = swaps.LayerNames(load_model_config(FULL_YAML).unet)
    for diffusers, ldm in [("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
                            "input_blocks.5.1.transformer_blocks.0.attn2.to_k"),
                           ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
                           ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
                           ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
                           ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
                           ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
                           ("up_blocks.3.resnets.2.conv_shortcut", "output_blocks.11.0.skip_connection"),
                           ("time_embedding.linear_2", "time_embed.2"), ("conv_out", "out.2")]:
        assert names.to_ldm(f"unet.{diffusers}") == f"model.diffusion_model.{ldm}"
        assert names.to_diffusers(f"model.diffusion_model.{ldm}") == f"unet.{diffusers}"


# --------------------------------------------------------------------------------------------------
# base model


def test_base_model_swap_replaces_exactly_the_unet_and_text_encoder(sd_checkpoint, tiny_teacher):
    path, expected = sd_checkpoint
    weights = swaps.base_model_weights(path)
    assert set(weights) == set(expected)  # VAE keys and position_ids dropped
    model = build_random_teacher(TINY_YAML)
    report = swaps.apply_base_model(model, weights, str(path))
    before = tiny_teacher.state_dict()
    after = model.state_dict()
    for key, value in after.items():
        if key in expected:
            assert torch.equal(value, expected[key].float()), key
        else:  # AttnX, WriteNet, VAE, embedding manager, OCR
            assert torch.equal(value, before[key]), key
    attnx = sorted(k for k in after if k.startswith(swaps.UNET_PREFIX) and any(m in k for m in ATTNX))
    assert report.replaced == len(expected) and list(report.kept) == attnx and attnx
    assert report.kept_besides_attnx == ()
    assert f"{len(expected)} UNet and text-encoder tensors replaced, {len(attnx)} AttnX" in report.summary()


@pytest.fixture(scope="module")
def untouched_teacher():
    """A tiny teacher for refusal tests, which must leave it as built (each test checks that it does)."""
    return build_random_teacher(TINY_YAML)


@pytest.mark.parametrize("case, message", [
    ("other shape", r"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight: file \(32, 1024\) vs model \(32, 768\)"),
    ("unknown key", r"model.diffusion_model.input_blocks.4.1.proj_in.weight.*not shaped like this model's SD1.5"),
    ("no SD keys", r"no model.diffusion_model.\* or cond_stage_model.transformer.text_model.\* keys"),
    ("folder", "is a folder"),
    ("missing", "no such file"),
], ids=["other shape", "unknown key", "no SD keys", "folder", "missing"])
def test_foreign_base_models_are_refused_naming_the_file_and_key(untouched_teacher, tiny_teacher, tmp_path, case,
                                                                 message):
    good = "model.diffusion_model.out.2.bias"
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    tensors = {
        "other shape": {good: torch.ones(4), to_k: torch.ones(32, 1024)},
        "unknown key": {good: torch.ones(4), "model.diffusion_model.input_blocks.4.1.proj_in.weight": torch.ones(8, 8)},
        "no SD keys": {"first_stage_model.encoder.conv_in.weight": torch.ones(32, 3, 3, 3)},
    }.get(case)
    path = tmp_path / ("sd.safetensors" if case != "folder" else "")
    if tensors is not None:
        save_file(tensors, str(path))
    with pytest.raises(InferenceInputError, match=message) as info:
        swaps.apply_base_model(untouched_teacher, swaps.base_model_weights(path), str(path))
    assert str(path) in str(info.value)
    before = tiny_teacher.state_dict()  # nothing is copied from a refused file
    assert all(torch.equal(v, before[k]) for k, v in untouched_teacher.state_dict().items())


# --------------------------------------------------------------------------------------------------
# community LoRAs


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_lora_merges_w_plus_ratio_alpha_over_rank_up_down(tmp_path, tiny_teacher, style):
    path, parts = _lora_file(tmp_path, style, tiny_teacher)
    model = build_random_teacher(TINY_YAML)
    report = swaps.merge_lora(model, swaps.read_lora(path), -0.7, str(path))
    assert sorted(report.layers) == sorted(parts) and "merged into 6 UNet and 1 text-encoder layers" in report.summary()
    before, after = tiny_teacher.state_dict(), model.state_dict()
    for key, value in after.items():
        layer = key.removesuffix(".weight")
        if layer in parts:
            down, up, scale = parts[layer]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
            torch.testing.assert_close(value, before[key] - 0.7 * scale * delta, rtol=1e-6, atol=1e-7)
            assert not torch.equal(value, before[key])
        else:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("entries, message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(4, 32)},
     r"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a \(not a kohya or diffusers LoRA key\)"),
    ({"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32, 1, 1)},
     r"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight \(no such Linear/Conv2d layer"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32, 1, 1)},
     r"model.diffusion_model.input_blocks.1.1.proj_in \(has \['down'\] but needs both the down and the up"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 999),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 4)},
     r"self_attn.q_proj \(up \(768, 4\) @ down \(4, 999\) does not fit the layer's weight \(768, 768\)"),
], ids=["LoHa key", "layer not in model", "no up weight", "wrong rank"])
def test_loras_that_do_not_fit_are_refused_whole(untouched_teacher, tiny_teacher, tmp_path, entries, message):
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{good}.lora_down.weight": torch.ones(4, 32), f"{good}.lora_up.weight": torch.ones(32, 4), **entries}
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(InferenceInputError, match=message) as info:
        swaps.merge_lora(untouched_teacher, swaps.read_lora(path), 1.0, str(path))
    assert str(path) in str(info.value)
    before = tiny_teacher.state_dict()  # not even the good layer is merged
    assert all(torch.equal(v, before[k]) for k, v in untouched_teacher.state_dict().items())


@pytest.mark.parametrize("text, pairs", [
    ("", []),
    ("  \n", []),
    (swaps.LORA_EXAMPLE, [("/a/lora1.safetensors", 0.8), ("/b/lora2.safetensors", 0.5)]),
    ("a.safetensors -1\n'my loras/b.pt' 1e-1 c.pt 0.123456789", [("a.safetensors", -1.0), ("my loras/b.pt", 0.1),
                                                                   ("c.pt", 0.123456789)]),
])
def test_lora_textbox_pairs(text, pairs):
    assert swaps.parse_lora_list(text) == pairs
    assert swaps.parse_lora_list(swaps.format_lora_list(pairs)) == pairs


@pytest.mark.parametrize("text, message", [
    ("a.safetensors", "takes 'path ratio' pairs"),
    ("a.safetensors b.safetensors 0.5", "takes 'path ratio' pairs"),
    ("a.safetensors strong", "the ratio 'strong' of LoRA a.safetensors is not a number"),
    ("a.safetensors nan", "not a finite number"),
    ("'a.safetensors 0.5", "quote a path"),
])
def test_bad_lora_textbox_is_a_user_error(text, message):
    with pytest.raises(InferenceInputError, match=message):
        swaps.parse_lora_list(text)


# --------------------------------------------------------------------------------------------------
# the pipeline's rebuild


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_student_lora_is_reapplied_after_the_swaps(sd_checkpoint, kohya_lora, student_lora_dir, merge):
    swapped = (str(sd_checkpoint[0]), [(kohya_lora, 0.7)])
    direct = AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=student_lora_dir, merge_lora=merge, device="cpu",
                                              base_model_path=swapped[0], community_loras=swapped[1])
    later = AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=student_lora_dir, merge_lora=merge, device="cpu")
    before = later(REQUEST, STUDENT).images[0]
    notes = later.set_model_swaps(*swapped)
    assert notes == direct.swap_notes and len(notes) == 2
    assert (later.has_lora, later.lora_merged, later.can_sample_teacher) == (True, merge, not merge)
    after = later(REQUEST, STUDENT).images[0]
    np.testing.assert_array_equal(after, direct(REQUEST, STUDENT).images[0])
    assert not np.array_equal(after, before)
    if not merge:  # the teacher (adapters off) is the swapped base model
        np.testing.assert_array_equal(later(REQUEST, TEACHER).images[0], direct(REQUEST, TEACHER).images[0])


def test_unchanged_swaps_do_not_rebuild_and_errors_keep_the_model(monkeypatch, kohya_lora, tmp_path):
    builds = []
    build = swaps.build_random_teacher
    monkeypatch.setattr(swaps, "build_random_teacher", lambda *a, **k: builds.append(1) or build(*a, **k))
    pipe = AnyText2Pipeline.from_pretrained(TINY_YAML, device="cpu")
    plain = pipe(REQUEST, STUDENT).images[0]
    assert pipe.set_model_swaps(None, []) == [] and pipe.set_model_swaps("  ", ()) == [] and len(builds) == 1
    assert "merged into 6 UNet and 1 text-encoder layers" in pipe.set_community_loras([(kohya_lora, "0.5")])[0]
    assert len(builds) == 2
    assert pipe.set_community_loras([(os.path.relpath(kohya_lora), 0.5)]) == [] and len(builds) == 2
    merged = pipe(REQUEST, STUDENT).images[0]
    assert not np.array_equal(merged, plain)
    for call, message in [(lambda: pipe.set_community_loras([(kohya_lora, "strong")]), "is not a number"),
                          (lambda: pipe.set_base_model(tmp_path / "missing.safetensors"), "no such file"),
                          (lambda: pipe.set_base_model(tmp_path), "is a folder")]:
        with pytest.raises(InferenceInputError, match=message):
            call()
    assert len(builds) == 2 and pipe.recipe.community_loras == ((str(kohya_lora), 0.5),)
    np.testing.assert_array_equal(pipe(REQUEST, STUDENT).images[0], merged)
    assert pipe.set_community_loras([]) == [] and len(builds) == 3  # back to the plain teacher, rebuilt
    np.testing.assert_array_equal(pipe(REQUEST, STUDENT).images[0], plain)
    wrapped = AnyText2Pipeline(pipe.model)
    assert wrapped.set_model_swaps("", []) == []
    with pytest.raises(InferenceInputError, match="built elsewhere"):
        wrapped.set_base_model(kohya_lora)


# --------------------------------------------------------------------------------------------------
# command line and demo


def test_cli_flags(sd_checkpoint, kohya_lora, student_lora_dir, tmp_path, capsys):
    from student_model_v2 import infer_lcm_anytext_v2 as cli

    argv = ["--config", str(TINY_YAML), "--teacher_ckpt", "", "--lora_path", str(student_lora_dir), "--device", "cpu",
            "--seed", "7", "--output_path", str(tmp_path / "s.png"), "--prompt", '"Hi"', "--resolution", "64",
            "--positions", "[[4, 4, 60, 28]]", "--num_inference_steps", "2", "--base_model_path", str(sd_checkpoint[0])]
    assert cli.main([*argv, "--community_lora", str(kohya_lora), "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["base_model_path"] == str(sd_checkpoint[0])
    assert report["community_loras"] == [[str(kohya_lora), 0.5]]
    assert len(report["model_swaps"]) == 2 and "AttnX tensors kept" in report["model_swaps"][0]
    assert cli.main([*argv, "--community_lora", str(kohya_lora), "half"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "the ratio 'half' of LoRA" in err and "Traceback" not in err


def test_demo_textboxes_swap_the_model(sd_checkpoint, kohya_lora, tmp_path):
    from gradio_client import Client

    from student_model_v2 import demo_v2

    pipe = AnyText2Pipeline.from_pretrained(TINY_YAML, device="cpu")
    demo = demo_v2.build_demo(pipe, demo_v2.DemoConfig(save_dir=None, width=128, height=128, image_count=1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = demo_v2.launch(demo, port=port, block=False)
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False,
                        httpx_kwargs={"trust_env": False})
        _, details = client.predict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", edit_img=None, seed=1,
                                    base_model_path=str(sd_checkpoint[0]), lora_path_ratio=f"{kohya_lora} 0.5",
                                    api_name="/generate", **{f"mimic_{k}": None for k in range(1, 6)})
    finally:
        demo.close()
    assert pipe.recipe.base_model_path == str(sd_checkpoint[0])
    assert pipe.recipe.community_loras == ((str(kohya_lora), 0.5),)
    assert f"base model {sd_checkpoint[0]}: " in details and "merged into 6 UNet" in details
