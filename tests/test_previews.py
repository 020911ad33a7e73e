"""Training previews sample with the sampler the run's objective serves (PCM in its phase count for v2_5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from student_model_v2.data.dataset import MockAnyTextDataset, collate_fn
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.training.previews import save_preview_grid


@pytest.mark.parametrize("objective, phases, expected_unet_calls", [("lcm", None, 3), ("pcm", 2, 2)])
def test_preview_uses_the_objectives_sampler(tiny_teacher, monkeypatch, tmp_path, objective, phases,
                                             expected_unet_calls):
    dataset = MockAnyTextDataset(2, resolution=64, seed=0)
    batch = collate_fn([dataset[0], dataset[1]])
    args = SimpleNamespace(log_image_samples=1, seed=0, log_image_infer_steps=3, control_strength=1.0,
                           attnx_scale=1.0)
    info = AdapterInfo(version="v2_5" if phases else "v2_4", objective=objective, num_inference_steps=50,
                       lora_targets="official", lora_rank=4, lora_alpha=4.0, num_phases=phases)
    calls, eps = [], tiny_teacher.predict_eps
    monkeypatch.setattr(tiny_teacher, "predict_eps", lambda *a, **k: calls.append(1) or eps(*a, **k))
    path = save_preview_grid(tiny_teacher, batch, args, tmp_path / "grid.png", info)
    assert len(calls) == expected_unet_calls
    assert Image.open(path).size == (4 * 64, 64)
