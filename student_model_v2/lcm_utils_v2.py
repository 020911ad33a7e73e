"""LCM and PCM maths (solver grid, boundary scalings, guidance, losses, phases), under the name the original
toolkit used.

The implementation lives in :mod:`student_model_v2.distillation.lcm` and :mod:`student_model_v2.distillation.pcm`,
where training and inference both import it from; this module keeps ``import student_model_v2.lcm_utils_v2``
working.
"""

from student_model_v2.distillation.lcm import (
    HUBER_C,
    NUM_TRAIN_TIMESTEPS,
    SIGMA_DATA,
    TIMESTEP_SCALING,
    ConsistencyDraw,
    DDIMSolver,
    LossType,
    PredictionType,
    TimestepPairs,
    add_noise,
    anytext2_alphas_cumprod,
    append_dims,
    cfg_scale_from_lcm_w,
    consistency_loss,
    consistency_output,
    ddim_solver_timesteps,
    draw_consistency_sample,
    guided_solver_step,
    l2_loss,
    lcm_guidance,
    lcm_inference_timesteps,
    lcm_w_from_cfg_scale,
    legacy_toolkit_huber_loss,
    model_output_from_origin,
    predicted_noise,
    predicted_origin,
    pseudo_huber_loss,
    sample_guidance_scale,
    sample_timestep_pairs,
    scalings_for_boundary_conditions,
)
from student_model_v2.distillation.pcm import (
    PhaseSchedule,
    jump_scalings,
    phase_edge_timesteps,
    phase_start_indices,
    phase_top_timesteps,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "SIGMA_DATA", "TIMESTEP_SCALING", "HUBER_C", "PredictionType",
    "LossType", "anytext2_alphas_cumprod", "ddim_solver_timesteps", "lcm_inference_timesteps",
    "append_dims", "add_noise", "predicted_origin", "predicted_noise", "model_output_from_origin",
    "DDIMSolver", "TimestepPairs", "sample_timestep_pairs", "scalings_for_boundary_conditions",
    "consistency_output", "sample_guidance_scale", "lcm_guidance", "cfg_scale_from_lcm_w",
    "lcm_w_from_cfg_scale", "l2_loss", "pseudo_huber_loss", "legacy_toolkit_huber_loss",
    "consistency_loss", "ConsistencyDraw", "draw_consistency_sample", "guided_solver_step", "PhaseSchedule",
    "jump_scalings", "phase_edge_timesteps", "phase_start_indices", "phase_top_timesteps",
]
