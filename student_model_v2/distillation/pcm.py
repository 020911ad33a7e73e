"""Phased-consistency (PCM) maths: the LCM solver grid split into M phases, jumps to a phase's lower edge.

Reference: Phased Consistency Models (arXiv 2405.18407) and the facts of its SD1.5 LoRA script in
``docs/lcm_reference.md`` §9. Grid, DDIM solver, conversions, guidance and losses are LCM's
(:mod:`.lcm`); this module adds only what is phased.

* Phases: on the N-point solver grid t_i = (i+1)·(T // N) − 1, the phase-start indices are
  floor(k·N / M), k = 0..M−1 (M = 4, N = 50 → [0, 12, 25, 37]). Grid index i belongs to the phase whose
  start p(i) is the largest start ≤ i.
* Phase edge of i: the grid point just below the phase, t_{p(i)−1}, or "0" for the lowest phase, with
  ᾱ_edge = the solver's ᾱ_prev[p(i)] (ᾱ[0] for p(i) = 0, not 1: the lowest edge is ᾱ[0] ≈ 0.99915).
* Jump: x_edge = √ᾱ_edge·x̂0 + √(1 − ᾱ_edge)·ε̂ (a DDIM step from t to the edge with the model's x̂0, ε̂).
* The teacher's one-step solver move from t_i lands on t_{i−1} ≥ the edge: it never crosses it, and at a
  phase start it lands exactly on it.
* Sampling: one step per phase from each phase's top t_{s_{k+1}−1} (999, 739, 499, 239 for M = 4, N = 50)
  to its edge, deterministically (``phase_top_timesteps``).

Relation to LCM (exact): written in terms of x and x̂0, the jump is
``c_skip·x + c_out·x̂0`` with c_skip(t) = √(1 − ᾱ_edge)/√(1 − ᾱ_t) and
c_out(t) = √ᾱ_edge − √(1 − ᾱ_edge)·√ᾱ_t/√(1 − ᾱ_t) (``jump_scalings``). With M = 1 the edge is ᾱ[0] for
every i, so the PCM loss is the LCM loss of v2_4 with these scalings in place of LCM's σ_data /
timestep-scaling ones; both give the identity at the edge itself (c_skip = 1, c_out = 0), which is why
PCM's "target = teacher point at a phase start" needs no special case in that form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lcm import DDIMSolver, append_dims, ddim_solver_timesteps


def phase_start_indices(num_phases: int, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """Ascending grid indices where phases start: floor(k·N / M), k = 0..M−1 (int64)."""
    if not 1 <= num_phases <= num_ddim_timesteps:
        raise ValueError(f"num_phases must be in [1, num_ddim_timesteps={num_ddim_timesteps}], got {num_phases}")
    return torch.div(torch.arange(num_phases, dtype=torch.int64) * num_ddim_timesteps, num_phases,
                     rounding_mode="floor")


def phase_top_timesteps(num_phases: int, num_ddim_timesteps: int = 50) -> list[int]:
    """Descending sampling timesteps: each phase's highest grid point (M = 4, N = 50 → [999, 739, 499, 239]).

    Sampling one student jump from each top to the next top (the phase's edge) and from the last to ᾱ[0]
    serves exactly the jumps the student was trained on.
    """
    starts = phase_start_indices(num_phases, num_ddim_timesteps)
    tops = torch.cat([starts[1:], torch.tensor([num_ddim_timesteps])]) - 1
    return ddim_solver_timesteps(num_ddim_timesteps)[tops].flip(0).tolist()


def phase_edge_timesteps(num_phases: int, num_ddim_timesteps: int = 50) -> list[int]:
    """Descending lower edges of the phases, top phase first (M = 4, N = 50 → [739, 499, 239, 0]).

    The 0 stands for the clean end of the schedule, whose ᾱ is ᾱ[0] (as the DDIM solver's last step).
    """
    return phase_top_timesteps(num_phases, num_ddim_timesteps)[1:] + [0]


@dataclass(frozen=True)
class PhaseSchedule:
    """The phases of a solver grid; every method takes (B,) grid indices i and returns (B,) values."""

    solver: DDIMSolver
    num_phases: int

    def __post_init__(self) -> None:
        phase_start_indices(self.num_phases, self.solver.num_ddim_timesteps)  # validates num_phases

    @property
    def starts(self) -> torch.Tensor:
        return phase_start_indices(self.num_phases, self.solver.num_ddim_timesteps).to(self.solver.ddim_timesteps.device)

    def phase_start(self, index: torch.Tensor) -> torch.Tensor:
        """p(i): the largest phase-start index ≤ i."""
        starts = self.starts.to(index.device)
        phase = torch.searchsorted(starts, index.long(), right=True) - 1
        return starts[phase]

    def at_phase_start(self, index: torch.Tensor) -> torch.Tensor:
        """True where i is a phase start (its solver step lands exactly on the phase edge)."""
        return self.phase_start(index) == index.long()

    def edge_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Timestep of the phase edge: t_{p(i)−1}, or 0 for the lowest phase."""
        start = self.phase_start(index)
        grid = self.solver.ddim_timesteps.to(index.device)
        return torch.where(start > 0, grid[(start - 1).clamp(min=0)], torch.zeros_like(start))

    def edge_alphas_cumprod(self, index: torch.Tensor) -> torch.Tensor:
        """ᾱ at the phase edge: the solver's ᾱ_prev at the phase start (ᾱ[0] for the lowest phase)."""
        return self.solver.ddim_alpha_cumprods_prev.to(index.device)[self.phase_start(index)]

    def jump(self, pred_x0: torch.Tensor, pred_eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """DDIM jump to the phase edge: √ᾱ_edge·x̂0 + √(1 − ᾱ_edge)·ε̂ (no LCM boundary scalings)."""
        abar = append_dims(self.edge_alphas_cumprod(index).to(pred_x0.device), pred_x0.ndim)
        return abar.sqrt() * pred_x0 + (1.0 - abar).sqrt() * pred_eps


def jump_scalings(timesteps: torch.Tensor, edge_alphas_cumprod: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) with jump(x, t) = c_skip·x + c_out·x̂0 for an ε-parameterised model.

    From ε̂ = (x − √ᾱ_t·x̂0)/√(1 − ᾱ_t): c_skip = √(1 − ᾱ_e)/√(1 − ᾱ_t), c_out = √ᾱ_e − c_skip·√ᾱ_t.
    This is the exact bridge between the PCM jump and LCM's consistency function (module docstring).
    """
    abar_t = alphas_cumprod.to(timesteps.device)[timesteps.long()].double()
    abar_e = edge_alphas_cumprod.to(timesteps.device).double()
    c_skip = (1.0 - abar_e).sqrt() / (1.0 - abar_t).sqrt()
    c_out = abar_e.sqrt() - c_skip * abar_t.sqrt()
    return c_skip.float(), c_out.float()
