"""Phased-consistency maths (distillation/pcm.py) and the v2_5 objective on toy denoisers.

Phase edges on the 50-point grid for M = 1, 2, 4, 8; the teacher's solver step never crosses a phase
edge; the jump is a DDIM step to the edge and the identity at the edge; v2_5's prediction and target
against a hand computation, with the target equal to the teacher's point where that point is the edge.
"""

from __future__ import annotations

import pytest
import torch

from student_model_v2.distillation import lcm, pcm
from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.train_lcm_anytext_v2_5 import PCMObjective, build_argument_parser

ALPHAS = lcm.anytext2_alphas_cumprod()
SOLVER = lcm.DDIMSolver(ALPHAS, 50)

EXPECTED = {  # M: (phase-start indices, sampling timesteps = phase tops, lower edges)
    1: ([0], [999], [0]),
    2: ([0, 25], [999, 499], [499, 0]),
    4: ([0, 12, 25, 37], [999, 739, 499, 239], [739, 499, 239, 0]),
    8: ([0, 6, 12, 18, 25, 31, 37, 43], [999, 859, 739, 619, 499, 359, 239, 119],
        [859, 739, 619, 499, 359, 239, 119, 0]),
}


@pytest.mark.parametrize("num_phases", sorted(EXPECTED))
def test_phase_edges_on_the_50_point_grid(num_phases):
    starts, tops, edges = EXPECTED[num_phases]
    assert pcm.phase_start_indices(num_phases, 50).tolist() == starts
    assert pcm.phase_top_timesteps(num_phases, 50) == tops
    assert pcm.phase_edge_timesteps(num_phases, 50) == edges
    schedule = pcm.PhaseSchedule(SOLVER, num_phases)
    index = torch.arange(50)
    grid = SOLVER.ddim_timesteps
    edge_t = schedule.edge_timesteps(index)
    for i in range(50):  # by definition: the edge is the grid point just below the largest start <= i
        start = max(s for s in starts if s <= i)
        assert int(edge_t[i]) == (0 if start == 0 else int(grid[start - 1])), i
    assert sorted(set(edge_t.tolist()), reverse=True) == edges
    abar_edge = schedule.edge_alphas_cumprod(index)
    torch.testing.assert_close(abar_edge, ALPHAS[edge_t], rtol=0, atol=0)  # the lowest edge is abar[0], not 1
    assert float(ALPHAS[0]) < 1.0


def test_bad_phase_counts_are_refused():
    with pytest.raises(ValueError, match="num_phases"):
        pcm.phase_start_indices(0, 50)
    with pytest.raises(ValueError, match="num_phases"):
        pcm.PhaseSchedule(lcm.DDIMSolver(ALPHAS, 4), 8)


@pytest.mark.parametrize("num_phases", sorted(EXPECTED))
def test_teacher_step_never_crosses_the_phase_edge(num_phases):
    schedule = pcm.PhaseSchedule(SOLVER, num_phases)
    index = torch.arange(50)
    landing = SOLVER.target_timesteps(index, 1)
    edge = schedule.edge_timesteps(index)
    assert torch.all(landing >= edge)
    assert torch.equal(landing == edge, schedule.at_phase_start(index))  # lands on the edge exactly at phase starts
    assert schedule.at_phase_start(index).sum() == num_phases
    # the solver's alpha_prev at a phase start is the edge's alpha: the teacher's point there *is* on the edge
    at_start = schedule.at_phase_start(index)
    torch.testing.assert_close(SOLVER.ddim_alpha_cumprods_prev[at_start], schedule.edge_alphas_cumprod(index)[at_start])


def test_jump_is_a_ddim_step_to_the_edge_and_the_identity_at_the_edge():
    schedule = pcm.PhaseSchedule(SOLVER, 4)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    index = torch.tensor([30, 12, 5])  # phases with edges 499, 239 and 0
    jumped = schedule.jump(x0, eps, index)
    for row, edge_abar in enumerate([ALPHAS[499], ALPHAS[239], ALPHAS[0]]):
        torch.testing.assert_close(jumped[row], edge_abar.sqrt() * x0[row] + (1 - edge_abar).sqrt() * eps[row])

    # written as c_skip * x + c_out * x0, the jump is the identity at the edge itself (c_skip 1, c_out 0) ...
    edge_t = torch.tensor([499, 239, 0])
    c_skip, c_out = pcm.jump_scalings(edge_t, ALPHAS[edge_t], ALPHAS)
    torch.testing.assert_close(c_skip, torch.ones(3))
    torch.testing.assert_close(c_out, torch.zeros(3), rtol=0, atol=1e-6)
    # ... and equals the eps form anywhere else (x from x0 and eps at the start timestep)
    start = SOLVER.ddim_timesteps[index]
    x = lcm.add_noise(x0, eps, start, ALPHAS)
    c_skip, c_out = pcm.jump_scalings(start, schedule.edge_alphas_cumprod(index), ALPHAS)
    scaled = lcm.append_dims(c_skip, 4) * x + lcm.append_dims(c_out, 4) * lcm.predicted_origin(eps, start, x, "epsilon",
                                                                                              ALPHAS)
    torch.testing.assert_close(scaled, jumped, rtol=1e-5, atol=1e-5)


class _ToyDenoisers:
    """Deterministic eps functions of (x, t) standing in for teacher (cond, uncond), student and target."""

    def __init__(self, guided: bool = True) -> None:
        self.guided = guided
        self.calls: list[str] = []

    @staticmethod
    def _eps(x: torch.Tensor, t: torch.Tensor, gain: float) -> torch.Tensor:
        return gain * x + 0.001 * lcm.append_dims(t.float(), x.ndim)

    def teacher_eps(self, x, t):
        self.calls.append("teacher")
        return self._eps(x, t, 0.3), (self._eps(x, t, 0.2) if self.guided else None)

    def student_eps(self, x, t):
        self.calls.append("student")
        return self._eps(x, t, 0.25)

    def target_eps(self, x, t):
        self.calls.append("target")
        return self._eps(x, t, 0.25)


def _objective(*flags: str) -> PCMObjective:
    return PCMObjective(build_argument_parser().parse_args(["--resolution", "64", *flags]), ALPHAS)


@pytest.mark.parametrize("no_cfg", [False, True])
def test_prediction_and_target_match_a_hand_computation(no_cfg):
    objective = _objective("--num_phases", "4", *(["--no_cfg_teacher"] if no_cfg else []))
    assert objective.needs_uncond is not no_cfg
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    denoisers = _ToyDenoisers(guided=not no_cfg)
    pred, target, draw = objective.prediction_and_target(denoisers, latents, torch.Generator().manual_seed(2))
    assert denoisers.calls == ["teacher", "student", "target"]

    index, start, land = draw.pairs.index, draw.pairs.start, draw.pairs.target
    assert torch.equal(start, SOLVER.ddim_timesteps[index]) and torch.equal(land, (start - 20).clamp(min=0))
    edge_abar = {0: ALPHAS[0], 12: ALPHAS[239], 25: ALPHAS[499], 37: ALPHAS[739]}
    on_edge = 0
    for row in range(latents.shape[0]):
        i, x_s = int(index[row]), draw.x_start[row : row + 1]
        t_s, t_l = start[row : row + 1], land[row : row + 1]
        a_s, a_l = ALPHAS[t_s], ALPHAS[int(index[row]) * 20 - 1] if i > 0 else ALPHAS[0]
        e_c, e_u = 0.3 * x_s + 0.001 * t_s, 0.2 * x_s + 0.001 * t_s
        x0_c, x0_u = (x_s - (1 - a_s).sqrt() * e_c) / a_s.sqrt(), (x_s - (1 - a_s).sqrt() * e_u) / a_s.sqrt()
        w = draw.w[row]
        x0, e = (x0_c, e_c) if no_cfg else (x0_c + w * (x0_c - x0_u), e_c + w * (e_c - e_u))
        x_t = a_l.sqrt() * x0 + (1 - a_l).sqrt() * e  # the teacher's DDIM step to the next grid point below
        a_e = edge_abar[max(s for s in edge_abar if s <= i)]

        def jump(x, t, a_t):
            eps = 0.25 * x + 0.001 * t
            return a_e.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_e).sqrt() * eps

        torch.testing.assert_close(pred[row : row + 1], jump(x_s, t_s, a_s), rtol=1e-4, atol=1e-4)
        if i in edge_abar:  # the teacher's point is the edge: the target is that point, not a jump below it
            on_edge += 1
            torch.testing.assert_close(target[row : row + 1], x_t, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(target[row : row + 1], jump(x_t, t_l, a_l), rtol=1e-4, atol=1e-4)
    assert on_edge > 0, "the draw must include phase starts for this test to check the identity"


def test_adapter_info_records_pcm_and_num_phases():
    info = _objective("--num_phases", "8").adapter_info()
    assert (info.version, info.objective, info.num_phases, info.num_inference_steps) == ("v2_5", "pcm", 8, 50)
    assert isinstance(info, AdapterInfo)
    with pytest.raises(SystemExit):
        build_argument_parser().parse_args(["--num_phases", "3"])
    with pytest.raises(ValueError, match="num_phases"):
        _objective("--num_phases", "8", "--num_inference_steps", "4")
    with pytest.raises(ValueError, match="w_min"):
        _objective("--w_min", "6", "--w_max", "5")
