"""Inference fast paths against the eager reference, on the tiny config at 64x64.

* The pipeline's host-sync-free sampling loops (``inference/fast_sampling.py``) equal the reference samplers
  (``distillation/samplers.py``, diffusers ``step`` at every step) bit for bit, and read nothing back to the
  host while they run.
* ``torch.compile`` and channels-last (``anytext2/acceleration.py``) stay within float round-off of eager.
  Tolerances: compiled or channels-last module outputs within 1e-4 absolute of eager (fp32 round-off of
  reordered/fused convolutions and reductions; observed up to ~2e-5), images within 1 uint8 level.

Compile cost on this 2-core machine (tiny config, 64x64, inductor, measured once): WriteNet ~46 s,
VAE decoder ~26 s, UNet ~53 s for the first call. So the suite compiles the VAE decoder alone with
inductor (real kernel generation and its numerics), and runs the whole pipeline with all three modules
compiled through ``backend="aot_eager"`` (~9 s: the same Dynamo capture, guards and AOT graphs as
inductor, without kernel generation), which checks that the compiled modules serve real requests:
in-place ``nn.Module.compile``, fixed-shape graphs for the student batch, state dicts unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_model_v2.anytext2.acceleration import accelerate_model
from student_model_v2.anytext2.checkpoint import build_random_teacher
from student_model_v2.distillation.samplers import (
    StudentSampling,
    repeat_conditions,
    sample_student,
    sample_teacher_ddim,
)
from student_model_v2.inference import fast_sampling
from student_model_v2.inference.fast_sampling import ddim_steps, run_student, run_teacher, student_steps
from student_model_v2.inference.pipeline import AnyText2Pipeline, SamplingOptions, TextRequest

from .conftest import TINY_YAML

MODULE_ATOL = 1e-4
SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _request() -> TextRequest:
    return TextRequest(prompt='a sign that reads "Hi", "Yo"', width=64, height=64,
                       positions=[[4, 4, 60, 28], [4, 34, 60, 60]])


@pytest.fixture(scope="module")
def encoded(tiny_teacher):
    """cond and uncond conditions of one request (batch 1)."""
    pipe = AnyText2Pipeline(tiny_teacher)
    conditioning = pipe.prepare(_request())
    masked_x = pipe._masked_latent(conditioning, torch.Generator().manual_seed(0))
    return tiny_teacher.encode_conditions(conditioning.text_info(masked_x), [conditioning.image_caption],
                                          [conditioning.text_caption], conditioning.negative_caption)


def _latents() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, gamma", [("lcm", 0.3), ("tcd", 0.3), ("pcm", 0.3)])
def test_student_loop_equals_the_reference_sampler(tiny_teacher, encoded, name, gamma):
    cond, _ = encoded
    plan = StudentSampling(name, 4, 50)
    reference = sample_student(tiny_teacher, cond, plan, torch.Generator().manual_seed(2), latents=_latents(),
                               gamma=gamma, images_per_condition=2)
    fast = run_student(tiny_teacher, cond, student_steps(plan, tiny_teacher.alphas_cumprod, gamma), _latents(),
                       torch.Generator().manual_seed(2), images_per_condition=2)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)


@pytest.mark.parametrize("eta, anytext2_grid", [(0.0, False), (0.5, True)])
def test_teacher_loop_equals_the_reference_ddim(tiny_teacher, encoded, eta, anytext2_grid):
    cond, uncond = encoded
    reference = sample_teacher_ddim(tiny_teacher, cond, uncond, 4, 7.5, eta, torch.Generator().manual_seed(2),
                                    latents=_latents(), images_per_condition=2, anytext2_grid=anytext2_grid)
    fast = run_teacher(tiny_teacher, cond, uncond, ddim_steps(4, eta, tiny_teacher.alphas_cumprod, anytext2_grid),
                       _latents(), torch.Generator().manual_seed(2), 7.5, images_per_condition=2)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)


def test_no_host_sync_inside_the_sampling_loops(tiny_teacher, monkeypatch):
    """Count tensor read-backs while the denoising loops run (conditioning before them may read freely)."""
    calls: list[str] = []
    counting = [False]
    for method in SYNC_METHODS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):
            if counting[0]:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)

    def watched(loop):
        def run(*args, **kwargs):
            counting[0] = True
            try:
                return loop(*args, **kwargs)
            finally:
                counting[0] = False
        return run

    loops = []
    for name in ("denoise_student", "denoise_teacher"):
        loop = getattr(fast_sampling, name)
        monkeypatch.setattr(fast_sampling, name, watched(lambda *a, _loop=loop, _name=name, **k: loops.append(_name)
                                                         or _loop(*a, **k)))
    pipe = AnyText2Pipeline(tiny_teacher)
    pipe(_request(), SamplingOptions(num_images=2, seed=0, steps=2))
    pipe(_request(), SamplingOptions(sampler="tcd", num_images=2, seed=0, steps=2))
    pipe(_request(), SamplingOptions(sampler="teacher", num_images=2, seed=0, steps=2, eta=0.5))
    assert loops == ["denoise_student", "denoise_student", "denoise_teacher"]
    assert calls == []
    counting[0] = True   # the counter sees a read-back (so an .item() in the loop would fail the test)
    torch.ones(1).item()
    counting[0] = False
    assert calls == ["item"]


def _module_outputs(model, encoded) -> dict[str, torch.Tensor]:
    """UNet eps at the student's batch (2 images), WriteNet residuals and the VAE decode of the same rows."""
    cond, _ = encoded
    with torch.no_grad():
        residuals = model.control_residuals(cond)
        rows = [r.repeat_interleave(2, dim=0) for r in residuals]
        eps = model.predict_eps(_latents(), torch.full((2,), 499), repeat_conditions(cond, 2), rows)
        return {"writenet": torch.cat([r.flatten() for r in residuals]), "unet": eps,
                "vae_decode": model.vae_decode(_latents())}


def test_channels_last_modules_match_eager(tiny_teacher, encoded):
    model = build_random_teacher(TINY_YAML)
    info = accelerate_model(model, compile=False, channels_last=True)
    assert info.channels_last and not any(info.compiled.values())
    assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    eager, fast = _module_outputs(tiny_teacher, encoded), _module_outputs(model, encoded)
    for name in eager:
        torch.testing.assert_close(fast[name], eager[name], rtol=0, atol=MODULE_ATOL, msg=name)


def test_inductor_compiled_vae_decoder_matches_eager(tiny_teacher, encoded):
    model = build_random_teacher(TINY_YAML)
    keys = set(model.state_dict())
    info = accelerate_model(model, compile=True, channels_last=False, modules=("vae_decoder",))
    assert info.compiled == {"vae_decoder": "default"}
    assert set(model.state_dict()) == keys   # compiled in place: checkpoints and LoRA names unchanged
    with torch.no_grad():
        latents = _latents()
        torch.testing.assert_close(model.vae_decode(latents), tiny_teacher.vae_decode(latents), rtol=0, atol=MODULE_ATOL)


def test_student_images_with_all_fast_paths_match_eager(tiny_teacher, encoded):
    """Compiled (aot_eager) UNet, WriteNet and VAE decoder in channels-last serve the pipeline: modules and
    images match the eager pipeline; a second request reuses the graphs."""
    model = build_random_teacher(TINY_YAML)
    fast = AnyText2Pipeline(model)
    info = fast.accelerate(compile=True, channels_last=True, backend="aot_eager")
    assert info.compiled == {"unet": "aot_eager", "writenet": "aot_eager", "vae_decoder": "aot_eager"}
    eager = AnyText2Pipeline(tiny_teacher)
    options = SamplingOptions(num_images=2, seed=3, steps=2)
    for _ in range(2):
        images, reference = fast(_request(), options).images, eager(_request(), options).images
        assert max(np.abs(a.astype(int) - b).max() for a, b in zip(images, reference)) <= 1
    eager_out, fast_out = _module_outputs(tiny_teacher, encoded), _module_outputs(model, encoded)
    for name in eager_out:
        torch.testing.assert_close(fast_out[name], eager_out[name], rtol=0, atol=MODULE_ATOL, msg=name)


def test_bad_compile_mode_is_refused(tiny_teacher):
    with pytest.raises(ValueError, match="compile mode must be one of default, reduce-overhead, max-autotune"):
        accelerate_model(tiny_teacher, compile=True, compile_mode="fast", channels_last=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU (see docs/benchmarks.md)")
def test_no_cuda_synchronisation_inside_the_sampling_loops(monkeypatch):
    """On a GPU: CUDA's own sync detector raises on any synchronising call while the loops run."""
    model = build_random_teacher(TINY_YAML).to("cuda")
    for name in ("denoise_student", "denoise_teacher"):
        loop = getattr(fast_sampling, name)

        def strict(*args, _loop=loop, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _loop(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        monkeypatch.setattr(fast_sampling, name, strict)
    pipe = AnyText2Pipeline(model)
    pipe(_request(), SamplingOptions(num_images=2, seed=0, steps=4))
    pipe(_request(), SamplingOptions(sampler="teacher", num_images=2, seed=0, steps=2, eta=0.5))
