"""VAE (``first_stage_model.``) and DDPM schedule buffers against the original's golden data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from student_model_v2.anytext2.init_rule import apply_init_rule
from student_model_v2.anytext2.schedule import SCHEDULE_BUFFER_NAMES, make_schedule_buffers
from student_model_v2.anytext2.vae import AutoencoderKL, DiagonalGaussian

DATA = Path(__file__).parent / "data"
CASE_DIR = DATA / "golden" / "tiny_a"
PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215

# ddconfig of models_yaml/anytext2_sd15.yaml (the stock SD1.5 VAE).
SD_VAE_PARAMS = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}


def _sha16(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def _assert_golden(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    err = (ours.float() - ref.float()).abs().max().item()
    bound = 1e-3 * max(1e-6, ref.abs().max().item())
    assert err <= bound, f"{name}: max|ours-ref| = {err:.3e} exceeds {bound:.3e}"


@pytest.fixture(scope="module")
def model_params() -> dict:
    with open(CASE_DIR / "model.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)["model"]["params"]


@pytest.fixture(scope="module")
def manifest() -> dict:
    with open(CASE_DIR / "state_dict_manifest.json", encoding="utf-8") as f:
        return json.load(f)["keys"]


@pytest.fixture(scope="module")
def case() -> dict:
    with open(CASE_DIR / "case.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(str(CASE_DIR / "tensors.safetensors"))


@pytest.fixture(scope="module")
def tiny_vae(model_params: dict) -> AutoencoderKL:
    vae = AutoencoderKL.from_params(model_params["first_stage_config"]["params"]).eval()
    apply_init_rule(vae, prefix=PREFIX)
    return vae


def test_tiny_vae_state_dict_matches_manifest(tiny_vae: AutoencoderKL, manifest: dict) -> None:
    expected = {k[len(PREFIX):]: v for k, v in manifest.items() if k.startswith(PREFIX)}
    state = tiny_vae.state_dict()
    assert sorted(state) == sorted(expected), (
        f"missing {sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}"
    )
    for key, tensor in state.items():
        info = expected[key]
        assert list(tensor.shape) == info["shape"], f"{PREFIX}{key}: shape {list(tensor.shape)} != {info['shape']}"
        assert str(tensor.dtype).removeprefix("torch.") == info["dtype"], f"{PREFIX}{key}: dtype {tensor.dtype}"
        assert _sha16(tensor) == info["sha256_16"], f"{PREFIX}{key}: values differ from the reference init"


def test_vae_moments(tiny_vae: AutoencoderKL, tensors: dict) -> None:
    with torch.no_grad():
        moments = tiny_vae.encode_moments(tensors["in.vae.image"])
    _assert_golden("out.vae.moments", moments, tensors["out.vae.moments"])


def test_vae_sample_uses_global_cpu_rng(tiny_vae: AutoencoderKL, tensors: dict, case: dict) -> None:
    with torch.no_grad():
        posterior = tiny_vae.encode(tensors["in.vae.image"])
        torch.manual_seed(case["vae_sample_seed"])
        z = SCALE_FACTOR * posterior.sample()
    _assert_golden("out.vae.z_sample", z, tensors["out.vae.z_sample"])


def test_encode_to_latent_sample_and_mean(tiny_vae: AutoencoderKL, tensors: dict, case: dict) -> None:
    image = tensors["in.vae.image"]
    with torch.no_grad():
        torch.manual_seed(case["vae_sample_seed"])
        z = tiny_vae.encode_to_latent(image, SCALE_FACTOR)
        z_mean = tiny_vae.encode_to_latent(image, SCALE_FACTOR, sample=False)
    _assert_golden("out.vae.z_sample", z, tensors["out.vae.z_sample"])
    mean = tensors["out.vae.moments"][:, :4]
    _assert_golden("scaled posterior mean", z_mean, SCALE_FACTOR * mean)


def test_vae_decode(tiny_vae: AutoencoderKL, tensors: dict) -> None:
    with torch.no_grad():
        decoded = tiny_vae.decode_latent(tensors["in.vae.latent"], SCALE_FACTOR)
    _assert_golden("out.vae.decoded", decoded, tensors["out.vae.decoded"])


def test_diagonal_gaussian_clamps_logvar_and_honours_generator() -> None:
    moments = torch.cat([torch.zeros(1, 2, 3, 3), torch.full((1, 2, 3, 3), 50.0)], dim=1)
    posterior = DiagonalGaussian(moments)
    assert torch.equal(posterior.logvar, torch.full((1, 2, 3, 3), 20.0))
    assert torch.equal(posterior.moments, moments)
    first = posterior.sample(torch.Generator().manual_seed(5))
    again = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    expected = posterior.std * torch.randn((1, 2, 3, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, expected)


def test_full_vae_keys_and_shapes_on_meta() -> None:
    with open(DATA / "full_manifest.json", encoding="utf-8") as f:
        full = json.load(f)["keys"]
    expected = {k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}
    assert len(expected) == 248
    with torch.device("meta"):
        vae = AutoencoderKL.from_params(SD_VAE_PARAMS)
    state = vae.state_dict()
    assert sorted(state) == sorted(expected), (
        f"missing {sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}"
    )
    for key, tensor in state.items():
        assert list(tensor.shape) == expected[key]["shape"], f"{PREFIX}{key}: shape {list(tensor.shape)}"
        assert str(tensor.dtype).removeprefix("torch.") == expected[key]["dtype"], f"{PREFIX}{key}"


def test_vae_rejects_unknown_ddconfig_key() -> None:
    params = {"embed_dim": 4, "ddconfig": {**SD_VAE_PARAMS["ddconfig"], "tanh_out": True}}
    with pytest.raises(ValueError, match="tanh_out"):
        AutoencoderKL.from_params(params)


def test_schedule_buffers_bit_exact(model_params: dict, manifest: dict) -> None:
    buffers = make_schedule_buffers(
        model_params["linear_start"], model_params["linear_end"], model_params["timesteps"]
    )
    root_keys = sorted(k for k in manifest if "." not in k)
    assert sorted(buffers) == root_keys == sorted(SCHEDULE_BUFFER_NAMES)
    for name, tensor in buffers.items():
        info = manifest[name]
        assert tensor.dtype == torch.float32 and list(tensor.shape) == info["shape"], name
        assert _sha16(tensor) == info["sha256_16"], f"schedule buffer {name} differs from the original's bytes"
