"""Teacher DDIM (+CFG) and student LCM / PCM / TCD samplers: schedules against the spec, batching against the unbatched
computation, and the number of UNet / WriteNet passes."""

from __future__ import annotations

import pytest
import torch

from student_model_v2.anytext2.schedule import make_schedule_buffers
from student_model_v2.data.glyph_render import GlyphFont
from student_model_v2.distillation.samplers import (
    anytext2_ddim_timesteps,
    make_ddim_scheduler,
    make_lcm_scheduler,
    make_tcd_scheduler,
    repeat_conditions,
    sample_student_lcm,
    sample_student_pcm,
    sample_student_tcd,
    sample_teacher_ddim,
    set_ddim_timesteps,
)
from student_model_v2.inference.pipeline import TextRequest, build_conditioning

ALPHAS = make_schedule_buffers(0.00085, 0.012, 1000)["alphas_cumprod"]
LONG_PROMPT = "a weathered wooden shop sign hanging above a narrow street " * 6 + 'that reads "Hi", "Yo"'


def _alpha_prev_used(scheduler, t: int) -> float:
    """Recover the alpha_prev a DDIM step used: with eps = 0 and eta = 0 it returns sqrt(a_prev / a_t) * x."""
    x = torch.ones(1, 1, 1, 1)
    out = scheduler.step(torch.zeros_like(x), t, x, eta=0.0).prev_sample
    return float(out.double() ** 2 * ALPHAS[t].double())


@pytest.mark.parametrize("steps, expected", [(1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259]),
                                             (8, [999, 879, 759, 639, 499, 379, 259, 139])])
def test_student_lcm_timesteps_are_on_the_training_grid(steps, expected):
    scheduler = make_lcm_scheduler(50, ALPHAS)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == expected


def test_ddim_grid_and_alpha_prev_match_anytext2_for_20_steps():
    scheduler = make_ddim_scheduler(ALPHAS)
    set_ddim_timesteps(scheduler, 20)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == list(range(951, 0, -50)) == anytext2_ddim_timesteps(20).tolist()
    assert torch.equal(scheduler.alphas_cumprod, ALPHAS)  # the checkpoint's buffer, not diffusers' float32 recompute
    assert _alpha_prev_used(scheduler, 951) == pytest.approx(float(ALPHAS[901]), rel=1e-6)
    assert _alpha_prev_used(scheduler, 1) == pytest.approx(float(ALPHAS[0]), rel=1e-6)
    assert float(ALPHAS[0]) == pytest.approx(0.99915, abs=1e-6)


def test_anytext2_ddim_quirk_gives_extra_steps_when_steps_do_not_divide_1000():
    upstream = make_ddim_scheduler(ALPHAS)
    set_ddim_timesteps(upstream, 30, anytext2_grid=True)
    assert upstream.timesteps.tolist() == list(range(991, 0, -33))
    assert len(upstream.timesteps) == 31
    assert _alpha_prev_used(upstream, 991) == pytest.approx(float(ALPHAS[958]), rel=1e-6)
    assert _alpha_prev_used(upstream, 1) == pytest.approx(float(ALPHAS[0]), rel=1e-6)
    exact = make_ddim_scheduler(ALPHAS)
    set_ddim_timesteps(exact, 30)
    assert len(exact.timesteps) == 30


@pytest.fixture(scope="module")
def conditions(tiny_teacher):
    """cond (image caption of two CLIP windows) and AnyText2's uncond (one window) for two lines at 64x64."""
    request = TextRequest(prompt=LONG_PROMPT, positions=[[4, 4, 60, 28], [4, 34, 60, 60]], width=64, height=64)
    prepared = build_conditioning(request, GlyphFont("font/NotoSansCJKsc-Regular-subset.otf"))
    masked_x = tiny_teacher.vae_encode(prepared.masked_image, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = tiny_teacher.encode_conditions(prepared.text_info(masked_x), [prepared.image_caption],
                                                      [prepared.text_caption], prepared.negative_caption)
    assert cond.image_context.shape[1] == 154 and uncond.image_context.shape[1] == 77
    return cond, uncond


def _latents(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class _Counter:
    def __init__(self, model, monkeypatch) -> None:
        self.unet: list[int] = []
        self.writenet: list[int] = []
        eps, control = model.predict_eps, model.control_residuals
        monkeypatch.setattr(model, "predict_eps", lambda x, *a, **k: self.unet.append(x.shape[0]) or eps(x, *a, **k))
        monkeypatch.setattr(model, "control_residuals",
                            lambda c, *a, **k: self.writenet.append(c.batch_size) or control(c, *a, **k))


def test_batched_cond_rows_equal_the_unbatched_call(tiny_teacher, conditions):
    """CFG scale 1 on a batched call (eps_u + 1 (eps_c - eps_u) = eps_c) equals the cond-only call."""
    from student_model_v2.anytext2.model import concat_conditions

    cond, uncond = conditions
    x = _latents(1)
    with torch.no_grad():
        both = concat_conditions([cond, uncond])
        batched = tiny_teacher.predict_eps(torch.cat([x, x]), 500, both, tiny_teacher.control_residuals(both))
        alone = tiny_teacher.predict_eps(x, 500, cond, tiny_teacher.control_residuals(cond))
    eps_c, eps_u = batched.chunk(2)
    torch.testing.assert_close(eps_u + 1.0 * (eps_c - eps_u), alone, rtol=1e-4, atol=1e-5)


def test_unit_guidance_runs_no_uncond_rows_and_equals_the_unguided_sampler(tiny_teacher, conditions, monkeypatch):
    cond, uncond = conditions
    counter = _Counter(tiny_teacher, monkeypatch)
    guided_off = sample_teacher_ddim(tiny_teacher, cond, uncond, steps=3, guidance_scale=1.0, latents=_latents(2),
                                     images_per_condition=2)
    assert counter.unet == [2, 2, 2] and counter.writenet == [1]
    no_uncond = sample_teacher_ddim(tiny_teacher, cond, None, steps=3, latents=_latents(2), images_per_condition=2)
    torch.testing.assert_close(guided_off, no_uncond)


def test_batched_cfg_equals_cond_and_uncond_run_separately(tiny_teacher, conditions, monkeypatch):
    cond, uncond = conditions
    counter = _Counter(tiny_teacher, monkeypatch)
    batched = sample_teacher_ddim(tiny_teacher, cond, uncond, steps=3, guidance_scale=7.5, latents=_latents(2),
                                  images_per_condition=2)
    assert counter.unet == [4, 4, 4] and counter.writenet == [2]  # one call per step, cond + uncond rows
    counter.unet.clear(), counter.writenet.clear()
    separate = sample_teacher_ddim(tiny_teacher, cond, uncond, steps=3, guidance_scale=7.5, latents=_latents(2),
                                   images_per_condition=2, batch_cfg=False)
    assert counter.unet == [2] * 6 and counter.writenet == [1, 1]
    # batch-size-dependent CPU round-off, amplified 7.5x by the guidance: a real mismatch is O(1)
    torch.testing.assert_close(batched, separate, rtol=1e-3, atol=2e-4)
    assert not torch.allclose(batched, sample_teacher_ddim(tiny_teacher, cond, None, steps=3, latents=_latents(2),
                                                           images_per_condition=2), atol=1e-3)


def test_shared_condition_rows_equal_an_explicit_batch(tiny_teacher, conditions):
    cond, uncond = conditions
    shared = sample_teacher_ddim(tiny_teacher, cond, uncond, steps=2, latents=_latents(3), images_per_condition=3)
    explicit = sample_teacher_ddim(tiny_teacher, repeat_conditions(cond, 3), repeat_conditions(uncond, 3), steps=2,
                                   latents=_latents(3))
    torch.testing.assert_close(shared, explicit, rtol=1e-3, atol=2e-4)


def test_student_lcm_is_one_unet_pass_per_step_and_one_writenet_pass(tiny_teacher, conditions, monkeypatch):
    cond, _ = conditions
    counter = _Counter(tiny_teacher, monkeypatch)
    generator = torch.Generator().manual_seed(3)
    first = sample_student_lcm(tiny_teacher, cond, steps=4, generator=generator, latents=_latents(2),
                               images_per_condition=2)
    assert counter.unet == [2, 2, 2, 2] and counter.writenet == [1]
    again = sample_student_lcm(tiny_teacher, cond, steps=4, generator=torch.Generator().manual_seed(3),
                               latents=_latents(2), images_per_condition=2)
    torch.testing.assert_close(first, again)
    other_noise = sample_student_lcm(tiny_teacher, cond, steps=4, generator=torch.Generator().manual_seed(4),
                                     latents=_latents(2), images_per_condition=2)
    assert not torch.allclose(first, other_noise)  # LCM re-injects fresh noise between steps


def _toy_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + t / 2000.0


@pytest.mark.parametrize("num_phases", [1, 2, 4, 8])
def test_pcm_sampler_is_a_ddim_jump_chain_over_the_phase_tops(tiny_teacher, conditions, monkeypatch, num_phases):
    cond, _ = conditions
    counter = _Counter(tiny_teacher, monkeypatch)
    seen: list[int] = []

    def toy(x, t, *args, **kwargs):
        counter.unet.append(x.shape[0])
        seen.append(int(t))
        return _toy_eps(x, int(t))

    monkeypatch.setattr(tiny_teacher, "predict_eps", toy)
    start = _latents(2) * 3
    out = sample_student_pcm(tiny_teacher, cond, num_phases, latents=start, images_per_condition=2)
    assert counter.unet == [2] * num_phases and counter.writenet == [1]
    tops = {1: [999], 2: [999, 499], 4: [999, 739, 499, 239], 8: [999, 859, 739, 619, 499, 359, 239, 119]}
    assert seen == tops[num_phases]
    x = start.double()
    alphas = ALPHAS.double()
    for k, t in enumerate(seen):  # by hand: x0 and eps at the top, DDIM jump to the next top (the edge), last to abar[0]
        eps = _toy_eps(x.float(), t).double()
        x0 = (x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
        a_next = alphas[seen[k + 1]] if k + 1 < len(seen) else alphas[0]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-5)
    again = sample_student_pcm(tiny_teacher, cond, num_phases, generator=torch.Generator().manual_seed(9),
                               latents=start, images_per_condition=2)
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # deterministic: no noise between steps


def test_tcd_sampler_steps_gamma_and_passes(tiny_teacher, conditions, monkeypatch):
    cond, _ = conditions
    scheduler = make_tcd_scheduler(50, ALPHAS)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]  # LCM's timesteps: it samples LCM students
    counter = _Counter(tiny_teacher, monkeypatch)
    runs = {}
    for gamma, seed in ((0.0, 1), (0.0, 2), (0.3, 1), (0.3, 2)):
        runs[gamma, seed] = sample_student_tcd(tiny_teacher, cond, 4, gamma, torch.Generator().manual_seed(seed),
                                               latents=_latents(2), images_per_condition=2)
    assert counter.unet == [2] * 16 and counter.writenet == [1] * 4
    torch.testing.assert_close(runs[0.0, 1], runs[0.0, 2], rtol=0, atol=0)  # gamma 0: deterministic
    assert not torch.allclose(runs[0.3, 1], runs[0.3, 2])  # gamma > 0 injects noise between steps
    with pytest.raises(ValueError, match="gamma"):
        sample_student_tcd(tiny_teacher, cond, 4, 1.5, latents=_latents(2), images_per_condition=2)


def test_teacher_trajectory_on_the_trailing_grid_is_the_solver_grid(tiny_teacher, conditions):
    cond, uncond = conditions
    trajectory: list = []
    final = sample_teacher_ddim(tiny_teacher, cond, uncond, steps=5, latents=_latents(1), trailing=True,
                                trajectory=trajectory)
    assert [t for t, _ in trajectory] == [999, 799, 599, 399, 199, 0]  # = lcm.ddim_solver_timesteps(5), reversed
    assert trajectory[-1][1] is final
    scheduler = make_ddim_scheduler(ALPHAS, trailing=True)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -20))  # the 50-point solver grid
    with pytest.raises(ValueError, match="pick one"):
        sample_teacher_ddim(tiny_teacher, cond, uncond, steps=2, latents=_latents(1), trailing=True, anytext2_grid=True)


def _info(objective: str, num_phases: int | None = None, grid: int = 50):
    from student_model_v2.distillation.adapter_info import AdapterInfo

    return AdapterInfo(version={"pcm": "v2_5", "lcm": "v2_4"}.get(objective, "v2_2"), objective=objective,
                       num_inference_steps=grid, lora_targets="attention", lora_rank=4, lora_alpha=4,
                       num_phases=num_phases)


def test_the_adapter_record_picks_the_sampler_and_refuses_what_it_cannot_serve():
    from student_model_v2.distillation.samplers import StudentSampling, plan_student_sampling

    pcm4, lcm = _info("pcm", 4), _info("lcm", grid=20)
    assert plan_student_sampling("auto", None, pcm4) == StudentSampling("pcm", 4, 50)
    assert plan_student_sampling("pcm", 4, pcm4) == StudentSampling("pcm", 4, 50)
    assert plan_student_sampling("auto", None, lcm) == StudentSampling("lcm", 4, 20)
    assert plan_student_sampling("tcd", 8, lcm) == StudentSampling("tcd", 8, 20)
    assert plan_student_sampling("auto", 2, _info("x0_regression")) == StudentSampling("lcm", 2, 50)
    assert plan_student_sampling("auto", None, None) == StudentSampling("lcm", 4, 50)  # folder without the record
    with pytest.raises(ValueError, match="4 phases.*exactly 4 steps.*not 2"):
        plan_student_sampling("auto", 2, pcm4)
    with pytest.raises(ValueError, match="phase edges.*--sampler pcm"):
        plan_student_sampling("lcm", 4, pcm4)
    with pytest.raises(ValueError, match="phase edges"):
        plan_student_sampling("tcd", 4, pcm4)
    with pytest.raises(ValueError, match="needs a phased-consistency"):
        plan_student_sampling("pcm", 4, lcm)
    with pytest.raises(ValueError, match="20-point solver grid.*1 to 20 steps, not 25"):
        plan_student_sampling("lcm", 25, lcm)
    with pytest.raises(ValueError, match="unknown student sampler"):
        plan_student_sampling("ddim", 4, lcm)
