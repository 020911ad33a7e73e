"""Student sampling uses the solver grid its adapter was trained on (``distillation.json``), not a fixed 50."""

from __future__ import annotations

import shutil

import pytest

from student_model_v2.distillation.adapter_info import DEFAULT_LCM_GRID, AdapterInfo, training_grid
from student_model_v2.inference.pipeline import AnyText2Pipeline, SamplingOptions
from tests.conftest import TINY_YAML
from tests.test_pipeline import _gen_request


def _adapter(tmp_path, student_lora_dir, grid: int | None):
    folder = tmp_path / f"adapter_{grid}"
    shutil.copytree(student_lora_dir, folder)
    if grid is not None:
        AdapterInfo(version="v2_4", objective="lcm", num_inference_steps=grid, lora_targets="official", lora_rank=4,
                    lora_alpha=4.0).save(folder)
    return folder


def test_recorded_grid_and_the_default_for_folders_without_it(tmp_path, student_lora_dir):
    assert training_grid(AdapterInfo.load(_adapter(tmp_path, student_lora_dir, 10))) == 10
    assert training_grid(AdapterInfo.load(_adapter(tmp_path, student_lora_dir, None))) == DEFAULT_LCM_GRID == 50
    assert training_grid(None) == 50


@pytest.mark.parametrize("grid, timesteps", [(10, [999, 799, 499, 299]), (None, [999, 759, 499, 259])])
def test_pipeline_samples_on_the_adapters_grid(tmp_path, student_lora_dir, monkeypatch, grid, timesteps):
    pipe = AnyText2Pipeline.from_pretrained(TINY_YAML, lora_path=_adapter(tmp_path, student_lora_dir, grid),
                                            merge_lora=True, device="cpu")
    seen, eps = [], pipe.model.predict_eps
    monkeypatch.setattr(pipe.model, "predict_eps", lambda x, t, *a, **k: seen.append(int(t)) or eps(x, t, *a, **k))
    pipe(_gen_request(), SamplingOptions(steps=4, seed=0))
    assert pipe.lcm_grid == (grid or 50) and seen == timesteps
