"""LCM-LoRA math checked against diffusers' schedulers and the teacher's schedule buffer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, LCMScheduler

from student_model_v2.distillation import lcm

GOLDEN_MANIFEST = Path(__file__).parent / "data" / "golden" / "tiny_a" / "state_dict_manifest.json"
SD15_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _ddim_scheduler(num_steps: int, prediction_type: str) -> DDIMScheduler:
    """DDIMScheduler on the solver grid: leading spacing with offset T//N − 1 gives t_i = (i+1)·(T//N) − 1, and its
    previous-timestep rule t − T//N (ᾱ[0] below 0 with set_alpha_to_one=False) is the solver's target rule."""
    step_ratio = 1000 // num_steps
    scheduler = DDIMScheduler(
        **SD15_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        steps_offset=step_ratio - 1,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def test_alphas_cumprod_is_the_teacher_buffer() -> None:
    alphas = lcm.anytext2_alphas_cumprod()
    assert alphas.dtype == torch.float32 and alphas.shape == (1000,)
    expected = json.loads(GOLDEN_MANIFEST.read_text())["keys"]["alphas_cumprod"]["sha256_16"]
    assert hashlib.sha256(alphas.numpy().tobytes()).hexdigest()[:16] == expected
    diffusers_alphas = DDIMScheduler(**SD15_BETAS).alphas_cumprod
    torch.testing.assert_close(alphas, diffusers_alphas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_ddim_timesteps", [50, 30, 1])
def test_solver_grid_equals_lcm_scheduler_origin_grid(num_ddim_timesteps: int) -> None:
    scheduler = LCMScheduler(**SD15_BETAS)
    scheduler.set_timesteps(num_ddim_timesteps, original_inference_steps=num_ddim_timesteps)
    grid = lcm.ddim_solver_timesteps(num_ddim_timesteps)
    assert grid.tolist() == sorted(scheduler.timesteps.tolist())
    if num_ddim_timesteps == 50:
        assert grid[0].item() == 19 and grid[-1].item() == 999 and torch.all(grid.diff() == 20)


def test_ddim_solver_timesteps_rejects_bad_n() -> None:
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        lcm.ddim_solver_timesteps(0)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 50])
def test_lcm_inference_timesteps_match_lcm_scheduler(num_steps: int) -> None:
    scheduler = LCMScheduler(**SD15_BETAS)
    scheduler.set_timesteps(num_steps)
    assert lcm.lcm_inference_timesteps(num_steps) == scheduler.timesteps.tolist()


def test_four_step_timesteps() -> None:
    assert lcm.lcm_inference_timesteps(4) == [999, 759, 499, 259]


def test_solver_alphas_follow_the_official_construction() -> None:
    alphas = lcm.anytext2_alphas_cumprod()
    solver = lcm.DDIMSolver(alphas, 50)
    grid = list(range(19, 1000, 20))
    torch.testing.assert_close(solver.ddim_alpha_cumprods, alphas[grid])
    torch.testing.assert_close(solver.ddim_alpha_cumprods_prev, alphas[[0] + grid[:-1]])
    all_indices = torch.arange(50)
    torch.testing.assert_close(solver.ddim_alpha_cumprods_prev, alphas[solver.target_timesteps(all_indices, 1)])


@pytest.mark.parametrize("num_steps", [50, 30])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_equals_ddim_scheduler(num_steps: int, prediction_type: str) -> None:
    scheduler = _ddim_scheduler(num_steps, prediction_type)
    solver = lcm.DDIMSolver(scheduler.alphas_cumprod, num_steps)
    assert solver.ddim_timesteps.tolist() == sorted(scheduler.timesteps.tolist())
    gen = torch.Generator().manual_seed(0)
    for index in [0, 1, num_steps // 2, num_steps - 1]:
        t = int(solver.ddim_timesteps[index])
        sample = torch.randn(2, 4, 8, 8, generator=gen)
        output = torch.randn(2, 4, 8, 8, generator=gen)
        timesteps = torch.full((2,), t)
        x0 = lcm.predicted_origin(output, timesteps, sample, prediction_type, scheduler.alphas_cumprod)
        eps = lcm.predicted_noise(output, timesteps, sample, prediction_type, scheduler.alphas_cumprod)
        ours = solver.ddim_step(x0, eps, torch.full((2,), index))
        reference = scheduler.step(output, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_ddim_step_with_teacher_schedule_matches_scheduler_within_schedule_rounding() -> None:
    scheduler = _ddim_scheduler(50, "epsilon")
    solver = lcm.DDIMSolver(lcm.anytext2_alphas_cumprod(), 50)
    gen = torch.Generator().manual_seed(1)
    sample, output = torch.randn(2, 2, 4, 4, 4, generator=gen)
    index = torch.tensor([0, 37])
    timesteps = solver.ddim_timesteps[index]
    alphas = solver.alphas_cumprod
    x0 = lcm.predicted_origin(output, timesteps, sample, "epsilon", alphas)
    ours = solver.ddim_step(x0, output, index)
    reference = torch.cat(
        [scheduler.step(output[i : i + 1], int(timesteps[i]), sample[i : i + 1]).prev_sample for i in range(2)]
    )
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_lcm_step_jumps_k_grid_intervals() -> None:
    alphas = lcm.anytext2_alphas_cumprod()
    solver = lcm.DDIMSolver(alphas, 50)
    index = torch.tensor([0, 1, 2, 10, 49])
    assert solver.target_timesteps(index, 1).tolist() == [0, 19, 39, 199, 979]
    assert solver.target_timesteps(index, 3).tolist() == [0, 0, 0, 159, 939]
    x0, eps = torch.ones(5, 1, 1, 1), torch.zeros(5, 1, 1, 1)
    jumped = solver.ddim_step(x0, eps, index, lcm_step=3).flatten()
    torch.testing.assert_close(jumped, alphas[[0, 0, 0, 159, 939]].sqrt())
    with pytest.raises(ValueError, match="lcm_step"):
        solver.target_timesteps(index, 0)


def test_timestep_pairs_are_seeded_and_follow_the_rule() -> None:
    solver = lcm.DDIMSolver(lcm.anytext2_alphas_cumprod(), 50)
    first = lcm.sample_timestep_pairs(solver, 256, generator=torch.Generator().manual_seed(7))
    second = lcm.sample_timestep_pairs(solver, 256, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.index, second.index)
    assert first.index.min() >= 0 and first.index.max() <= 49 and len(first.index.unique()) > 30
    assert torch.equal(first.start, 20 * first.index + 19)
    assert torch.equal(first.target, (first.start - 20).clamp(min=0))
    pairs_k2 = lcm.sample_timestep_pairs(solver, 256, lcm_step=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(pairs_k2.target, (first.start - 40).clamp(min=0))


def test_boundary_scalings_equal_lcm_scheduler() -> None:
    scheduler = LCMScheduler(**SD15_BETAS, timestep_scaling=10.0)
    timesteps = torch.arange(1000)
    c_skip, c_out = lcm.scalings_for_boundary_conditions(timesteps)
    ref = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in range(1000)]
    ref_skip = torch.tensor([r[0] for r in ref], dtype=torch.float64)
    ref_out = torch.tensor([r[1] for r in ref], dtype=torch.float64)
    torch.testing.assert_close(c_skip.double(), ref_skip, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(c_out.double(), ref_out, rtol=1e-6, atol=1e-7)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert c_skip[19] == pytest.approx(0.25 / (190.0**2 + 0.25))


def test_consistency_output_is_identity_at_t0_and_x0_at_high_t() -> None:
    sample, pred_x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = lcm.consistency_output(sample, pred_x0, torch.tensor([0, 999]))
    torch.testing.assert_close(out[0], sample[0])
    torch.testing.assert_close(out[1], pred_x0[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parameterisation_conversions_invert_each_other(prediction_type: str) -> None:
    alphas = lcm.anytext2_alphas_cumprod().double()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    timesteps = torch.tensor([19, 499, 999])
    sample = lcm.add_noise(x0, eps, timesteps, alphas)
    output = lcm.model_output_from_origin(x0, timesteps, sample, prediction_type, alphas)
    torch.testing.assert_close(lcm.predicted_origin(output, timesteps, sample, prediction_type, alphas), x0)
    torch.testing.assert_close(lcm.predicted_noise(output, timesteps, sample, prediction_type, alphas), eps)
    if prediction_type == "epsilon":
        torch.testing.assert_close(output, eps)
    if prediction_type == "v_prediction":
        abar = alphas[timesteps].view(-1, 1, 1, 1)
        torch.testing.assert_close(output, abar.sqrt() * eps - (1 - abar).sqrt() * x0)


def test_unknown_prediction_type_is_rejected() -> None:
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="prediction_type"):
        lcm.predicted_origin(x, torch.tensor([5]), x, "flow", lcm.anytext2_alphas_cumprod())  # type: ignore[arg-type]


def test_add_noise_equals_scheduler() -> None:
    scheduler = DDIMScheduler(**SD15_BETAS)
    gen = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 2, 4, 3, 3, generator=gen)
    timesteps = torch.tensor([0, 777])
    ours = lcm.add_noise(x0, eps, timesteps, scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, eps, timesteps))


def test_lcm_guidance_convention() -> None:
    cond, uncond = torch.full((2, 1, 2, 2), 3.0), torch.full((2, 1, 2, 2), 1.0)
    w = torch.tensor([0.0, 5.0])
    guided = lcm.lcm_guidance(cond, uncond, w)
    assert guided[0].unique().item() == 3.0
    assert guided[1].unique().item() == 3.0 + 5.0 * 2.0
    s = lcm.cfg_scale_from_lcm_w(w)
    torch.testing.assert_close(guided, uncond + lcm.append_dims(s, 4) * (cond - uncond))
    assert lcm.lcm_w_from_cfg_scale(7.5) == 6.5


def test_sample_guidance_scale_range_and_seed() -> None:
    w = lcm.sample_guidance_scale(1000, 5.0, 15.0, generator=torch.Generator().manual_seed(0))
    assert w.shape == (1000,) and w.min() >= 5.0 and w.max() <= 15.0 and w.std() > 2.0
    again = lcm.sample_guidance_scale(1000, 5.0, 15.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, again)
    with pytest.raises(ValueError, match="w_max"):
        lcm.sample_guidance_scale(1, 3.0, 2.0)


def test_pseudo_huber_equals_formula_and_differs_from_legacy() -> None:
    pred = torch.tensor([0.0, 0.5, -2.0, 1e-4])
    target = torch.tensor([0.0, 0.0, 1.0, 0.0])
    c = 0.001
    expected = sum(((d**2 + c**2) ** 0.5 - c) for d in [0.0, 0.5, 3.0, 1e-4]) / 4
    assert lcm.pseudo_huber_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert lcm.consistency_loss(pred, target, "huber", huber_c=c).item() == pytest.approx(expected, rel=1e-6)
    legacy = (0.0 + 0.5 * 0.5**2 + (3.0 - 0.5) + 0.5 * 1e-8) / 4
    assert lcm.legacy_toolkit_huber_loss(pred, target).item() == pytest.approx(legacy, rel=1e-6)
    assert lcm.consistency_loss(pred, target, "legacy_huber").item() == pytest.approx(legacy, rel=1e-6)
    assert lcm.consistency_loss(pred, target, "l2").item() == pytest.approx(F.mse_loss(pred, target).item())
    with pytest.raises(ValueError, match="loss_type"):
        lcm.consistency_loss(pred, target, "l1")  # type: ignore[arg-type]


def test_losses_compute_in_float32_for_half_inputs() -> None:
    pred, target = torch.ones(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16)
    assert lcm.l2_loss(pred, target).dtype == torch.float32
    assert lcm.pseudo_huber_loss(pred, target).dtype == torch.float32
