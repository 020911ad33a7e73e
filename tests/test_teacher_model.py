"""Teacher structure, checkpoint I/O, precision and batching semantics."""

from __future__ import annotations

import json

import pytest
import torch

from student_model_v2.anytext2.checkpoint import (
    CheckpointError,
    build_random_teacher,
    load_teacher,
    read_state_dict,
    save_state_dict,
)
from student_model_v2.anytext2.config import ConfigError, load_model_config
from student_model_v2.anytext2.model import AnyText2Model, TextInfo, concat_conditions
from tests.conftest import FULL_YAML, REPO_ROOT, TINY_YAML

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def test_full_model_on_meta_matches_the_released_manifest():
    manifest = json.loads((REPO_ROOT / "tests" / "data" / "full_manifest.json").read_text())["keys"]
    with torch.device("meta"):
        model = AnyText2Model(load_model_config(FULL_YAML))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(manifest) == 2047
    assert set(ours) == set(manifest), (sorted(set(ours) - set(manifest))[:5], sorted(set(manifest) - set(ours))[:5])
    assert {k: v for k, v in ours.items() if v != manifest[k]["shape"]} == {}
    assert sum(k.split(".")[-1].startswith(("attn1x", "attn2x")) or ".attn1x." in k or ".attn2x." in k for k in ours) == 70


def test_tiny_weights_equal_the_init_rule_bit_for_bit(tiny_teacher):
    import hashlib

    manifest = json.loads((REPO_ROOT / "tests" / "data" / "golden" / "tiny_a" / "state_dict_manifest.json").read_text())["keys"]
    state = tiny_teacher.state_dict()
    assert set(state) == set(manifest)
    bad = [k for k, v in state.items() if hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16] != manifest[k]["sha256_16"]]
    assert bad == []


def _tiny_text_info(batch: int = 2, size: int = 64, lines: int = 2) -> TextInfo:
    g = torch.Generator().manual_seed(3)
    positions = []
    for j in range(lines):
        mask = torch.zeros(batch, 1, size, size)
        mask[:, :, 8 + 20 * j : 20 + 20 * j, 6:58] = 1
        positions.append(mask)
    return TextInfo(
        glyphs=[p.expand(-1, 3, -1, -1) * (torch.rand(batch, 3, size, size, generator=g) > 0.5) for p in positions],
        gly_line=[(torch.rand(batch, 1, 80, 512, generator=g) > 0.8).float() for _ in range(lines)],
        positions=positions,
        colors=[torch.full((batch, 3), 500 / 255) for _ in range(lines)],
        font_hint=(torch.rand(batch, 1, size, size, generator=g) > 0.7).float(),
        masked_x=torch.randn(batch, 4, size // 8, size // 8, generator=g),
        n_lines=[lines] * batch,
    )


def test_checkpoint_round_trip_is_strict(tiny_teacher, tmp_path):
    state = tiny_teacher.state_dict()
    path = save_state_dict(state, tmp_path / "tiny.safetensors")
    loaded = load_teacher(TINY_YAML, path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    wrapped = dict(state)
    wrapped[POSITION_IDS] = torch.arange(77).unsqueeze(0)
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "tiny.ckpt")
    assert torch.equal(load_teacher(TINY_YAML, tmp_path / "tiny.ckpt").unet.out[2].weight, tiny_teacher.unet.out[2].weight)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.pop("control_model.zero_convs.0.0.weight"), "missing keys, first ['control_model.zero_convs.0.0.weight']"),
        (lambda s: s.__setitem__("model.diffusion_model.extra.weight", torch.zeros(1)), "unexpected keys, first ['model.diffusion_model.extra.weight']"),
        (lambda s: s.__setitem__("embedding_manager.proj.0.bias", torch.zeros(5)), "embedding_manager.proj.0.bias: model (768,) vs file (5,)"),
    ],
)
def test_checkpoint_key_problems_are_named(tiny_teacher, tmp_path, edit, expected):
    state = dict(tiny_teacher.state_dict())
    edit(state)
    path = save_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_teacher(TINY_YAML, path)
    assert expected in str(info.value)
    assert "prefixes" in str(info.value) or "shapes" in str(info.value)


@pytest.mark.parametrize("name, payload", [("junk.ckpt", b"not a checkpoint at all"), ("junk.safetensors", b"\x00\x01garbage")])
def test_a_file_that_is_not_a_checkpoint_fails_clearly(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="not a"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.ckpt")


def test_unknown_config_key_fails_with_a_suggestion(tmp_path):
    text = TINY_YAML.read_text().replace("num_res_blocks: 1\n        channel_mult", "num_res_block: 1\n        channel_mult", 1)
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="did you mean 'num_res_blocks'"):
        load_model_config(path)


@pytest.mark.parametrize("old, new, key", [
    ("add_pos: true", "add_pos: false", "add_pos"),
    ("add_style_ocr: true", "add_style_ocr: false", "add_style_ocr"),
    ("add_color: true", "add_color: false", "add_color"),
    ("\n        add_color: true", "", "add_color"),  # absent: upstream's default (false) would apply
    ("img_concat_text: false", "img_concat_text: true", "img_concat_text"),
    ("use_vision: false", "use_vision: true", "use_vision"),
    ("enable_flag: false", "enable_flag: true", "enable_flag"),
])
def test_settings_the_model_ignores_are_refused_naming_the_key(tmp_path, old, new, key):
    text = TINY_YAML.read_text()
    assert text.count(old) == 1
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=rf"params\.{key} is .*only the released AnyText2 setting {key}"):
        load_model_config(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precisions_run_and_stay_finite(dtype):
    model = build_random_teacher(TINY_YAML, dtype=dtype)
    assert model.dtype == dtype and model.alphas_cumprod.dtype == torch.float32
    info = _tiny_text_info()
    with torch.no_grad():
        cond, uncond = model.encode_conditions(info, ["a sign", "a wall"], ["Text says * , * . "] * 2, "low quality")
        residuals = model.control_residuals(cond)
        eps = model.predict_eps(torch.randn(2, 4, 8, 8), 500, cond, residuals)
        image = model.vae_decode(torch.randn(2, 4, 8, 8))
    assert eps.dtype == dtype and torch.isfinite(eps.float()).all() and torch.isfinite(image.float()).all()
    assert uncond.text_context.shape == cond.text_context.shape


def test_cond_and_uncond_rows_batch_into_one_call_without_changing_numbers(tiny_teacher):
    """A long caption (2 chunks) batched with a short one (1 chunk): padded keys are masked out."""
    info = _tiny_text_info()
    long_caption = " ".join(["a very long caption about a shop sign"] * 12)
    with torch.no_grad():
        cond, uncond = tiny_teacher.encode_conditions(info, [long_caption] * 2, ["Text says * , * . "] * 2, "bad")
        assert cond.image_context.shape[1] == 154 and uncond.image_context.shape[1] == 77
        x = torch.randn(2, 4, 8, 8)
        res_c, res_u = tiny_teacher.control_residuals(cond), tiny_teacher.control_residuals(uncond)
        separate = torch.cat([tiny_teacher.predict_eps(x, 321, cond, res_c), tiny_teacher.predict_eps(x, 321, uncond, res_u)])
        both = concat_conditions([cond, uncond])
        joint_res = tiny_teacher.control_residuals(both)
        joint = tiny_teacher.predict_eps(torch.cat([x, x]), 321, both, joint_res)
    assert both.image_context_mask is not None
    torch.testing.assert_close(joint, separate, rtol=1e-4, atol=1e-5)


def test_all_caption_windows_share_one_clip_call(tiny_teacher, monkeypatch):
    """Image-caption chunks and the text caption go through CLIP together, with the numbers of one
    window at a time (placeholders still consume the lines in caption order)."""
    from student_model_v2.anytext2.text_encoder import split_chunks

    encoder = tiny_teacher.cond_stage_model
    info = _tiny_text_info()
    long_caption = "a * sign " + " ".join(["a very long caption about a shop sign"] * 12) + " and *"
    with torch.no_grad():
        lines = tiny_teacher.line_embeddings(info).per_sample
        used = [0, 0]
        windows = split_chunks(encoder.tokenize_image_captions([long_caption] * 2))
        expected = [encoder._transform(encoder._window_embeddings(w, lines, used)) for w in windows]
        used = [0, 0]
        text_ids = encoder.tokenize_text_captions(["Text says * , * . "] * 2)
        expected_text = encoder._transform(encoder._window_embeddings(text_ids, lines, used))
        calls = []
        forward = encoder.transformer.text_model.encoder.forward
        monkeypatch.setattr(encoder.transformer.text_model.encoder, "forward",
                            lambda *a, **k: calls.append(k["inputs_embeds"].shape[0]) or forward(*a, **k))
        image_context, text_context = encoder.encode([long_caption] * 2, ["Text says * , * . "] * 2, lines)
    assert len(windows) == 2 and calls == [6]
    torch.testing.assert_close(image_context, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_context, expected_text, rtol=1e-5, atol=1e-5)


def test_writenet_ignores_latent_and_timestep_and_placeholders_must_match_lines(tiny_teacher):
    from student_model_v2.anytext2.text_encoder import PlaceholderMismatch

    info = _tiny_text_info(lines=1)
    with torch.no_grad():
        cond, _ = tiny_teacher.encode_conditions(info, ["a sign"] * 2, ["Text says * . "] * 2)
        with pytest.raises(PlaceholderMismatch, match="sample 0"):
            tiny_teacher.encode_conditions(info, ["a sign"] * 2, ["Text says * , * . "] * 2)
        half = [r * 0.5 for r in tiny_teacher.control_residuals(cond)]
        torch.testing.assert_close(tiny_teacher.control_residuals(cond, strength=0.5), half)
