"""Training versions on the shared trainer: v2, v2_2 and v2_3, and v2_4's model passes.

v2_2 must compute v2's loss with fewer frozen passes; its uncond cache must never serve a stale
embedding; every version must learn on a fixed batch and run end to end from its YAML template;
v2_4's target must reuse the student's WriteNet residuals without changing the loss.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator

from student_model_v2 import launch_from_yaml
from student_model_v2.anytext2.checkpoint import build_random_teacher
from student_model_v2.data.dataset import MockAnyTextDataset, collate_fn
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.distillation.conditioning import UncondCaptionCache
from student_model_v2.distillation.lcm import anytext2_alphas_cumprod
from student_model_v2.distillation.lora import add_lora, load_lora
from student_model_v2.training.trainer import Denoisers, PassCounter, StudentForward, Trainer
from tests.conftest import REPO_ROOT, TINY_YAML

DEMO_JSON = REPO_ROOT / "demodataset" / "annotations" / "demo_data.json"
TEMPLATES = REPO_ROOT / "student_model_v2"


def _script(version: str):
    return importlib.import_module(f"student_model_v2.train_lcm_anytext_{version}")


@pytest.fixture(scope="module")
def rig():
    """Tiny random teacher with rank-4 LoRA (B nudged off zero so student != teacher) and one mock batch."""
    torch.manual_seed(0)
    model = build_random_teacher(TINY_YAML)
    peft_model = add_lora(model, rank=4, alpha=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    dataset = MockAnyTextDataset(2, resolution=64, seed=0)
    batch = collate_fn([dataset[i] for i in range(2)])
    return SimpleNamespace(model=model, peft_model=peft_model, student=StudentForward(peft_model), initial=initial,
                           batch=batch, accelerator=Accelerator(mixed_precision="no"))


def _trainer_view(rig, version: str, *flags: str) -> SimpleNamespace:
    """What ``Trainer._micro_step`` reads from a trainer, for one version (no data loaders or optimizer)."""
    module = _script(version)
    args = module.build_argument_parser().parse_args(["--resolution", "64", *flags])
    return SimpleNamespace(model=rig.model, objective=module.OBJECTIVE(args, anytext2_alphas_cumprod()), args=args,
                           uncond_cache=UncondCaptionCache(), counter=PassCounter(), student=rig.student,
                           accelerator=rig.accelerator)


def _loss(view: SimpleNamespace, batch: dict, seed: int) -> torch.Tensor:
    return Trainer._micro_step(view, batch, torch.Generator().manual_seed(seed)).loss


def _reset_lora(rig) -> None:
    with torch.no_grad():
        for name, param in rig.peft_model.named_parameters():
            if name in rig.initial:
                param.copy_(rig.initial[name])
                param.grad = None


def test_v2_2_matches_v2_loss_with_fewer_passes(rig, monkeypatch):
    _reset_lora(rig)
    modes = []
    original = rig.model.predict_eps

    def recording(*args, **kwargs):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(rig.model, "predict_eps", recording)
    base, fast = _trainer_view(rig, "v2"), _trainer_view(rig, "v2_2")
    loss_base = _loss(base, rig.batch, seed=5)
    base_modes, modes[:] = list(modes), []
    loss_fast = _loss(fast, rig.batch, seed=5)
    fast_modes = list(modes)
    torch.testing.assert_close(loss_fast, loss_base, rtol=1e-5, atol=1e-7)
    assert float(loss_base.detach()) > 0

    assert base.counter.vae_calls == [("encode", 2), ("encode", 2)]
    assert fast.counter.vae_calls == [("encode", 4)]
    assert base.counter.unet_calls == [("teacher", 2), ("teacher", 2), ("student", 2)]
    assert fast.counter.unet_calls == [("teacher", 4), ("student", 2)]
    assert base.counter.writenet_calls == [("teacher", 2), ("teacher", 2), ("student", 2)]
    assert fast.counter.writenet_calls == [("teacher", 4), ("student", 2)]
    assert base_modes == [(False, False), (False, False), (False, True)], "v2: teacher under no_grad, student with grad"
    assert fast_modes == [(True, False), (False, True)], "v2_2: one inference-mode teacher call, student with grad"

    for view in (base, fast):
        view.counter.reset()
    again_base, again_fast = _loss(base, rig.batch, seed=5), _loss(fast, rig.batch, seed=5)
    assert base.counter.text_encoder_calls == [("cond", 2), ("uncond", 2)]
    assert fast.counter.text_encoder_calls == [("cond", 2)], "v2_2 must reuse the cached uncond captions"
    torch.testing.assert_close(again_fast, again_base, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(again_fast, loss_fast, rtol=0, atol=0)


def test_uncond_cache_is_fresh_whenever_its_inputs_change(rig):
    model = rig.model
    cache = UncondCaptionCache()
    (img, txt), computed = cache.get(model, "low quality", 2, (64, 64))
    assert computed
    (img_again, _), computed = cache.get(model, "low quality", 2, (64, 64))
    assert not computed and img_again is img
    expected = model.uncond_caption_contexts("low quality", 2)
    assert torch.equal(img, expected[0]) and torch.equal(txt, expected[1])

    (other, _), computed = cache.get(model, "blurry, watermark", 2, (64, 64))
    assert computed and not torch.equal(other, img)
    (bigger, _), computed = cache.get(model, "low quality", 3, (64, 64))
    assert computed and bigger.shape[0] == 3
    _, computed = cache.get(model, "low quality", 2, (128, 128))
    assert computed

    param = next(model.cond_stage_model.parameters())
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.add_(0.5)
        (changed, _), computed = cache.get(model, "low quality", 2, (64, 64))
        assert computed and not torch.equal(changed, img), "new text-encoder weights must not get a stale embedding"
    finally:
        with torch.no_grad():
            param.copy_(saved)
    (restored, _), computed = cache.get(model, "low quality", 2, (64, 64))
    assert computed and torch.equal(restored, img)
    with pytest.raises(ValueError, match="placeholder|holds"):
        cache.get(model, "a * sign", 2, (64, 64))


def test_v2_4_passes_and_target_residual_reuse(rig, monkeypatch):
    _reset_lora(rig)
    view = _trainer_view(rig, "v2_4")
    loss = _loss(view, rig.batch, seed=3)
    assert view.counter.vae_calls == [("encode", 4)]
    assert view.counter.unet_calls == [("teacher", 4), ("student", 2), ("target", 2)]
    assert view.counter.writenet_calls == [("teacher", 4), ("student", 2)], "the target must add no WriteNet pass"
    view.counter.reset()
    _loss(view, rig.batch, seed=3)
    assert view.counter.text_encoder_calls == [("cond", 2)], "v2_4 must reuse the cached uncond captions"

    def fresh_residuals_target(self, x_t, timesteps):
        with torch.no_grad():
            residuals = self.model.control_residuals(self.encoded.cond, self.strength)
            return self.model.predict_eps(x_t, timesteps, self.encoded.cond, residuals, self.attnx_scale).float()

    with monkeypatch.context() as patch:
        patch.setattr(Denoisers, "target_eps", fresh_residuals_target)
        reference = _loss(view, rig.batch, seed=3)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-8)

    teacher_target = _trainer_view(rig, "v2_4", "--target_from_teacher")
    _loss(teacher_target, rig.batch, seed=3)
    assert teacher_target.counter.unet_calls == [("teacher", 4), ("student", 2), ("teacher", 4)]
    assert teacher_target.counter.writenet_calls == [("teacher", 4), ("student", 2)]

    denoisers = Denoisers(rig.student, rig.model, rig.accelerator, view.args, None, PassCounter())
    with pytest.raises(RuntimeError, match="student_eps first"):
        denoisers.target_eps(torch.zeros(2, 4, 8, 8), torch.tensor([19, 19]))


@pytest.mark.parametrize("version", ["v2", "v2_2", "v2_3"])
def test_loss_decreases_on_a_fixed_batch(rig, version):
    _reset_lora(rig)
    view = _trainer_view(rig, version)
    params = [p for p in rig.peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(5):
        output = Trainer._micro_step(view, rig.batch, torch.Generator().manual_seed(11))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        losses.append(float(output.loss.detach()))
        if version == "v2_3":
            assert {"x0", "ffl", "grad"} <= set(output.terms)
    _reset_lora(rig)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses


def test_timestep_grid_follows_num_inference_steps():
    module = _script("v2")
    args = module.build_argument_parser().parse_args(["--num_inference_steps", "4"])
    objective = module.OBJECTIVE(args, anytext2_alphas_cumprod())
    drawn = objective.sample_timesteps(256, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(drawn.tolist()) == {249, 499, 749, 999}, "the solver grid, never t = 0"
    with pytest.raises(ValueError, match="num_inference_steps"):
        module.OBJECTIVE(module.build_argument_parser().parse_args(["--num_inference_steps", "0"]),
                         anytext2_alphas_cumprod())


def test_original_loss_weight_names_are_aliases():
    for version in ("v2_3", "v2_4"):
        args = _script(version).build_argument_parser().parse_args(
            ["--loss_ffl_weight", "0.2", "--loss_grad_weight", "0.3", "--ffl_patch_factor", "2", "--ffl_log_matrix"])
        assert (args.ffl_weight, args.grad_weight, args.ffl_patch_factor, args.ffl_log_matrix) == (0.2, 0.3, 2, True)


@pytest.mark.parametrize(("template", "changes", "module_name"), [
    ("train_config_template.yaml", {"use_optimized": False}, "student_model_v2.train_lcm_anytext_v2"),
    ("train_config_template.yaml", {}, "student_model_v2.train_lcm_anytext_v2_2"),
    ("train_config_template_v3.yaml", {}, "student_model_v2.train_lcm_anytext_v2_3"),
])
def test_template_trains_and_writes_a_loadable_adapter(tmp_path, template, changes, module_name):
    data = yaml.safe_load((TEMPLATES / template).read_text())
    assert not data["train"].get("resume_path"), "a template must not resume from a hard-coded checkpoint (D26)"
    data.update(changes)
    data["model"].update(config=str(TINY_YAML), teacher_ckpt="", output_dir=str(tmp_path / "out"))
    data["data"].update(dataset_json=[str(DEMO_JSON)], cache_dir=str(tmp_path / "index"), resolution=64,
                        num_workers=0, persistent_workers=False, pin_memory=False)
    data["train"].update(max_train_steps=2, lora_rank=4, lora_alpha=4, train_batch_size=2,
                         gradient_accumulation_steps=1, mixed_precision="no", lr_warmup_steps=1, save_steps=0,
                         log_image_steps=0, eval_batches=0, allow_tf32=False)
    config = tmp_path / template
    config.write_text(yaml.safe_dump(data))
    assert launch_from_yaml.plan_launch(config, []).module_name == module_name
    assert launch_from_yaml.main(["--config", str(config)]) == 0
    [final] = list((tmp_path / "out").glob("train_*/checkpoint-final"))
    peft_model = load_lora(build_random_teacher(TINY_YAML), final)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b), "two optimizer steps must move LoRA B"
    assert AdapterInfo.load(final).version == module_name.rsplit("anytext_", 1)[1]


def test_v5_template_launches_v2_5_with_its_settings(tmp_path):
    """The v5 template picks the v2_5 script and every key is one of its flags (v2_5 training itself runs in
    tests/test_distillation.py, which trains it end to end through the same trainer)."""
    plan = launch_from_yaml.plan_launch(TEMPLATES / "train_config_template_v5.yaml", [])
    assert plan.module_name == "student_model_v2.train_lcm_anytext_v2_5"
    args = plan.module.build_argument_parser().parse_args(plan.argv)
    assert (args.num_phases, args.num_inference_steps, args.w_min, args.w_max) == (4, 50, 4.0, 5.0)
    assert (args.loss_type, args.no_cfg_teacher) == ("huber", False)
    assert args.config == str(REPO_ROOT / "models_yaml" / "anytext2_sd15.yaml")


def test_v2_5_passes_equal_v2_4(rig):
    _reset_lora(rig)
    lcm_view, pcm_view = _trainer_view(rig, "v2_4"), _trainer_view(rig, "v2_5")
    _loss(lcm_view, rig.batch, seed=3)
    loss = _loss(pcm_view, rig.batch, seed=3)
    assert float(loss.detach()) > 0
    for calls in ("vae_calls", "unet_calls", "writenet_calls", "text_encoder_calls"):
        assert getattr(pcm_view.counter, calls) == getattr(lcm_view.counter, calls), calls
    assert pcm_view.counter.unet_calls == [("teacher", 4), ("student", 2), ("target", 2)]
    cfg_free = _trainer_view(rig, "v2_5", "--no_cfg_teacher")
    _loss(cfg_free, rig.batch, seed=3)
    assert cfg_free.counter.unet_calls == [("teacher", 2), ("student", 2), ("target", 2)], "no uncond rows"
    assert cfg_free.counter.text_encoder_calls == [("cond", 2)]


def test_v2_5_with_one_phase_is_v2_4_with_the_jump_scalings(rig, monkeypatch):
    """M = 1: every edge is abar[0]. The PCM jump is c_skip*x + c_out*x0 with pcm.jump_scalings, so v2_5's loss
    equals v2_4's loss on the same draws once v2_4's LCM boundary scalings are replaced by those (exactly, up
    to float round-off); with LCM's own scalings the two losses differ."""
    from student_model_v2.distillation import lcm, pcm

    _reset_lora(rig)
    flags = ("--w_min", "5", "--w_max", "15", "--loss_type", "l2")
    pcm_loss = _loss(_trainer_view(rig, "v2_5", "--num_phases", "1", *flags), rig.batch, seed=7)
    lcm_view = _trainer_view(rig, "v2_4", *flags)
    lcm_loss = _loss(lcm_view, rig.batch, seed=7)
    alphas = anytext2_alphas_cumprod()

    def jump_boundary(self, sample, pred_x0, timesteps):
        c_skip, c_out = pcm.jump_scalings(timesteps, alphas[[0] * timesteps.shape[0]], alphas)
        return lcm.append_dims(c_skip, sample.ndim) * sample + lcm.append_dims(c_out, sample.ndim) * pred_x0

    monkeypatch.setattr(type(lcm_view.objective), "_boundary", jump_boundary)
    bridged = _loss(lcm_view, rig.batch, seed=7)
    torch.testing.assert_close(bridged, pcm_loss, rtol=1e-4, atol=1e-7)
    assert abs(float(lcm_loss.detach()) - float(pcm_loss.detach())) > 1e-3 * float(pcm_loss.detach()), "LCM's own scalings differ"
