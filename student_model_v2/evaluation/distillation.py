"""Distillation evidence that tells methods apart (see ``eval_distillation.py`` for the command line).

Every model is measured on the same held-out samples, seeds and initial noise, against the teacher's own
N-step CFG DDIM trajectory on the distillation solver grid (trailing spacing: 999, 979, …, 19 for N = 50,
ending at ᾱ[0]):

* **trajectory-consistency error (TCE)**: at every grid point x_{t_i} of the teacher's trajectory, apply a
  one-step function of the model and take the latent MSE to the teacher's trajectory where that function is
  meant to land: "one step to x0" (x̂0; an LCM student's own boundary-scaled f) lands on the trajectory's end,
  "jump to M-phase edges" (the DDIM jump with the model's x̂0, ε̂ to the phase's lower edge) on the trajectory
  at that edge. Every model is measured under every function compared (a v2_5 student's row has its x0 column
  too, a v2_2 student's row its phase-edge columns), so columns compare like with like. This is the quantity
  consistency distillation optimises, and it is defined for any teacher, random or real.
* **end-sample distance**: each model's own sampler at 1, 2, 4, 8 steps (a PCM student serves exactly its
  phase count; other step counts are "—") against the teacher's N-step end sample, as plain latent MSE and
  as MSE after the best per-sample scale a (a = <x, ref>/<x, x>, so that amplitude alone cannot win), plus
  the per-sample correlation in the JSON.
* **controls**: the untrained student (the teacher without CFG, adapters off) with the LCM sampler and with
  the same one-step functions, and the teacher's DDIM with CFG at the same step counts (trailing spacing,
  so every run starts at t = 999).

Students sample with their run's ``control_strength`` and ``attnx_scale``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..anytext2.model import AnyText2Model, Conditions
from ..data.dataset import AnyTextDataset, collate_fn, make_splits
from ..distillation import lcm
from ..distillation.adapter_info import AdapterInfo
from ..distillation.conditioning import encode_batch
from ..distillation.pcm import PhaseSchedule
from ..distillation.samplers import sample_student_lcm, sample_student_pcm, sample_teacher_ddim

STEP_COUNTS = (1, 2, 4, 8)
# run flags that must agree between the runs compared in one table (same teacher, data, split and sampling)
SHARED_RUN_FLAGS = ("config", "teacher_ckpt", "dataset_json", "resolution", "max_lines", "max_chars", "font_path",
                    "train_ratio", "val_ratio", "test_ratio", "split_seed", "num_inference_steps", "negative_prompt",
                    "control_strength", "attnx_scale")


@dataclass(frozen=True)
class OneStepFunction:
    """What a model's single evaluation at (x_t, t_i) is meant to produce, and where on the trajectory.

    ``kind``: ``x0`` (x̂0, lands on the end; an LCM student's boundary-scaled f when ``sigma_data`` is set)
    or ``pcm`` (DDIM jump to the phase edge of ``num_phases`` phases, lands on that edge).
    """

    kind: str
    num_phases: int | None = None
    sigma_data: float | None = None
    timestep_scaling: float = lcm.TIMESTEP_SCALING

    @property
    def key(self) -> str:
        return f"pcm{self.num_phases}" if self.kind == "pcm" else "x0"

    @property
    def label(self) -> str:
        return f"jump to {self.num_phases}-phase edges" if self.kind == "pcm" else "one step to x0"


@dataclass
class Row:
    """One line of the table: a model, its sampler, its TCE under every one-step function and its samples."""

    label: str
    role: str  # "teacher" | "untrained" | "student"
    sampler: str  # "teacher_ddim_cfg" | "lcm" | "pcm"
    adapter: str | None = None
    version: str | None = None
    objective: str | None = None
    num_phases: int | None = None
    tce: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def serves(self, steps: int) -> bool:
        return self.sampler != "pcm" or steps == self.num_phases

    def summary(self) -> dict:
        return {"label": self.label, "role": self.role, "adapter": self.adapter, "version": self.version,
                "objective": self.objective, "sampler": self.sampler, "num_phases": self.num_phases,
                "trajectory_consistency_mse": {k: _mean(v) for k, v in self.tce.items()},
                "end_sample": {str(k): {m: _mean(v) for m, v in metrics.items()} for k, metrics in
                               sorted(self.samples.items())}}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Case:
    """One held-out batch under one seed: conditions, the teacher's trajectory (timestep → latents)."""

    cond: Conditions
    uncond: Conditions | None
    noise: torch.Tensor
    trajectory: dict[int, torch.Tensor]

    @property
    def reference(self) -> torch.Tensor:
        return self.trajectory[0]


def sample_distances(sample: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Latent MSE, MSE after the best per-sample scale and mean per-sample correlation to the reference."""
    x, ref = sample.flatten(1).double(), reference.flatten(1).double()
    scale = (x * ref).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True).clamp_min(1e-12)
    xc, rc = x - x.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
    corr = (xc * rc).sum(1) / (xc.norm(dim=1) * rc.norm(dim=1)).clamp_min(1e-12)
    return {"mse": float(((x - ref) ** 2).mean()), "scaled_mse": float(((scale * x - ref) ** 2).mean()),
            "correlation": float(corr.mean())}


def trajectory_consistency_errors(case: Case, functions: Sequence[OneStepFunction],
                                  eps_fn: Callable[[torch.Tensor, int], torch.Tensor], solver: lcm.DDIMSolver,
                                  alphas_cumprod: torch.Tensor) -> dict[str, float]:
    """Per function: mean latent MSE between its output at every grid point of the teacher's trajectory and
    the trajectory where it should land (one model evaluation per grid point serves every function)."""
    errors: dict[str, list[float]] = {f.key: [] for f in functions}
    for index, t in enumerate(solver.ddim_timesteps.tolist()):
        x = case.trajectory[t]
        timesteps = torch.full((x.shape[0],), t, dtype=torch.int64)
        eps = eps_fn(x, t)
        x0 = lcm.predicted_origin(eps, timesteps, x, "epsilon", alphas_cumprod)
        for function in functions:
            if function.kind == "pcm":
                phases = PhaseSchedule(solver, function.num_phases)
                indices = torch.full_like(timesteps, index)
                out = phases.jump(x0, eps, indices)
                landing = case.trajectory[int(phases.edge_timesteps(indices)[0])]
            elif function.sigma_data is not None:
                out = lcm.consistency_output(x, x0, timesteps, function.sigma_data, function.timestep_scaling)
                landing = case.reference
            else:
                out, landing = x0, case.reference
            errors[function.key].append(float(((out - landing) ** 2).mean()))
    return {key: sum(values) / len(values) for key, values in errors.items()}


class DistillationEvaluation:
    """The teacher's trajectories for every case once, then one row per model against them."""

    def __init__(self, model: AnyText2Model, cases: list[Case], run: argparse.Namespace, guidance_scale: float,
                 step_counts: Sequence[int], phase_counts: Sequence[int]) -> None:
        self.model = model
        self.cases = cases
        self.run = run
        self.guidance_scale = guidance_scale
        self.step_counts = list(step_counts)
        self.phase_counts = list(phase_counts)
        self.alphas = model.alphas_cumprod.detach().float().cpu()
        self.solver = lcm.DDIMSolver(self.alphas, run.num_inference_steps)
        self.rows: list[Row] = []

    @classmethod
    def prepare(cls, model: AnyText2Model, batches: Sequence[dict], seeds: Sequence[int], run: argparse.Namespace,
                guidance_scale: float, step_counts: Sequence[int],
                phase_counts: Sequence[int] = ()) -> DistillationEvaluation:
        """Encode every held-out batch (base weights) and run the teacher's N-step CFG DDIM trajectory."""
        if 1000 % run.num_inference_steps:
            raise SystemExit(f"the solver grid N = {run.num_inference_steps} does not divide 1000: the teacher's "
                             "trailing DDIM grid would not pass through the training grid points")
        cases = []
        for batch in batches:
            for seed in seeds:
                generator = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    encoded = encode_batch(model, batch, run.negative_prompt, generator)
                noise = torch.randn(encoded.latents.shape, generator=torch.Generator().manual_seed(seed + 1))
                trajectory: list[tuple[int, torch.Tensor]] = []
                sample_teacher_ddim(model, encoded.cond, encoded.uncond, run.num_inference_steps, guidance_scale,
                                    strength=run.control_strength, attnx_scale=run.attnx_scale, latents=noise,
                                    trailing=True, trajectory=trajectory)
                cases.append(Case(encoded.cond, encoded.uncond, noise, dict(trajectory)))
        return cls(model, cases, run, guidance_scale, step_counts, phase_counts)

    def functions(self, lcm_scalings: tuple[float, float] | None = None) -> list[OneStepFunction]:
        """One step to x0 (an LCM student's own boundary-scaled f) and a jump per compared phase count."""
        first = OneStepFunction("x0") if lcm_scalings is None else OneStepFunction("x0", None, *lcm_scalings)
        return [first] + [OneStepFunction("pcm", m) for m in self.phase_counts]

    def _eps(self, case: Case, strength: float, attnx_scale: float,
             guidance_scale: float = 1.0) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The current weights' eps at (x, t) on the case's conditions, with CFG when ``guidance_scale`` != 1."""
        residuals = self.model.control_residuals(case.cond, strength)
        guided = case.uncond is not None and guidance_scale != 1.0
        uncond_residuals = self.model.control_residuals(case.uncond, strength) if guided else None

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            eps_c = self.model.predict_eps(x, t, case.cond, residuals, attnx_scale).float()
            if not guided:
                return eps_c
            eps_u = self.model.predict_eps(x, t, case.uncond, uncond_residuals, attnx_scale).float()
            return eps_u + guidance_scale * (eps_c - eps_u)

        return eps

    def _add_tce(self, row: Row, functions: Sequence[OneStepFunction], strength: float, attnx_scale: float,
                 guidance_scale: float = 1.0) -> None:
        for case in self.cases:
            errors = trajectory_consistency_errors(case, functions, self._eps(case, strength, attnx_scale,
                                                                              guidance_scale), self.solver, self.alphas)
            for key, value in errors.items():
                row.tce.setdefault(key, []).append(value)

    @torch.no_grad()
    def add_teacher(self) -> None:
        """The teacher with CFG: its one-step CFG functions (x̂0 is what x0 regression copies) on its own
        trajectory, and its DDIM + CFG samples at the step counts."""
        run = self.run
        row = Row(f"teacher DDIM, CFG {self.guidance_scale:g}", "teacher", "teacher_ddim_cfg")
        self._add_tce(row, self.functions(), run.control_strength, run.attnx_scale, self.guidance_scale)
        for steps in self.step_counts:
            for case in self.cases:
                sample = sample_teacher_ddim(self.model, case.cond, case.uncond, steps, self.guidance_scale,
                                             strength=run.control_strength, attnx_scale=run.attnx_scale,
                                             latents=case.noise, trailing=True)
                _record(row, steps, sample_distances(sample, case.reference))
        self.rows.append(row)

    @torch.no_grad()
    def add_student(self, row: Row, strength: float, attnx_scale: float,
                    lcm_scalings: tuple[float, float] | None = None) -> Row:
        """A student row (the model's current adapters; none = untrained): TCE and its sampler's samples."""
        self._add_tce(row, self.functions(lcm_scalings), strength, attnx_scale)
        self._add_samples(row, strength, attnx_scale)
        self.rows.append(row)
        return row

    def _add_samples(self, row: Row, strength: float, attnx_scale: float) -> None:
        for steps in self.step_counts:
            if not row.serves(steps):
                continue
            for number, case in enumerate(self.cases):
                if row.sampler == "pcm":
                    sample = sample_student_pcm(self.model, case.cond, row.num_phases,
                                                original_inference_steps=self.run.num_inference_steps,
                                                strength=strength, attnx_scale=attnx_scale, latents=case.noise)
                else:
                    sample = sample_student_lcm(self.model, case.cond, steps,
                                                generator=torch.Generator().manual_seed(1000 + number),
                                                original_inference_steps=self.run.num_inference_steps,
                                                strength=strength, attnx_scale=attnx_scale, latents=case.noise)
                _record(row, steps, sample_distances(sample, case.reference))

    @torch.no_grad()
    def add_untrained(self) -> None:
        """The untrained student (adapters off, no CFG): LCM sampling, plus PCM sampling per compared phase count
        (its TCE is the same, so the PCM rows repeat it)."""
        run = self.run
        base = self.add_student(Row("untrained student", "untrained", "lcm"), run.control_strength, run.attnx_scale)
        for m in self.phase_counts:
            row = Row(f"untrained student, PCM sampler {m} steps", "untrained", "pcm", num_phases=m,
                      tce={k: list(v) for k, v in base.tce.items()})
            self._add_samples(row, run.control_strength, run.attnx_scale)
            self.rows.append(row)

    def report(self) -> dict:
        return {"teacher_steps": self.run.num_inference_steps, "guidance_scale": self.guidance_scale,
                "cases": len(self.cases), "step_counts": self.step_counts,
                "functions": {f.key: f.label for f in self.functions()},
                "control_strength": self.run.control_strength, "attnx_scale": self.run.attnx_scale,
                "rows": [row.summary() for row in self.rows]}


def _record(row: Row, steps: int, distances: dict[str, float]) -> None:
    bucket = row.samples.setdefault(steps, {})
    for key, value in distances.items():
        bucket.setdefault(key, []).append(value)


def student_row(info: AdapterInfo | None, adapter: Path) -> Row:
    """The row of a trained adapter: its sampler follows its ``distillation.json``."""
    if info is None:
        raise SystemExit(f"{adapter} has no distillation.json (it records the objective): evaluate a checkpoint "
                         "written by this toolkit's trainer")
    sampler = "pcm" if info.objective == "pcm" else "lcm"
    return Row(f"{info.version} {info.objective} ({adapter.parent.name})", "student", sampler, str(adapter),
               info.version, info.objective, info.num_phases)


def markdown_table(report: dict) -> str:
    """The rows as a markdown table: TCE per one-step function, then per step count MSE and scale-fitted MSE."""
    steps, functions = report["step_counts"], report["functions"]
    head = (["model", "sampler"] + [f"TCE {label}" for label in functions.values()]
            + [f"{k}-step MSE / scaled" for k in steps])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        sampler = row["sampler"] if row["sampler"] != "pcm" else f"pcm ({row['num_phases']} steps)"
        cells = [row["label"], sampler] + [_fmt(row["trajectory_consistency_mse"].get(key)) for key in functions]
        for k in steps:
            metrics = row["end_sample"].get(str(k))
            cells.append("—" if metrics is None else f"{_fmt(metrics['mse'])} / {_fmt(metrics['scaled_mse'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}"


def held_out_batches(run: argparse.Namespace, batch_size: int, data_seed: int,
                     max_samples: int = 0) -> list[dict]:
    """The run's own val + test samples (same files, resolution and split), edit mode and font-hint
    augmentation off so every evaluation sees the same conditioning; ``max_samples`` > 0 keeps the first ones."""
    dataset = AnyTextDataset(run.dataset_json, resolution=run.resolution, max_lines=run.max_lines,
                             max_chars=run.max_chars, font_path=run.font_path,
                             font_dir=getattr(run, "font_dir", "") or None, seed=data_seed,  # absent before --font_dir
                             mask_img_prob=0.0, font_hint_randaug=False)
    splits = make_splits(dataset, (run.train_ratio, run.val_ratio, run.test_ratio), run.split_seed)
    held = [splits["val"][i] for i in range(len(splits["val"]))] + [splits["test"][i] for i in range(len(splits["test"]))]
    if max_samples > 0:
        held = held[:max_samples]
    if not held:
        raise SystemExit("no held-out samples: the run's val/test ratios leave none")
    return [collate_fn(held[i : i + batch_size]) for i in range(0, len(held), batch_size)]


def training_args(adapter: Path) -> argparse.Namespace:
    """The flags the adapter was trained with (``args.json`` the trainer writes into its run folder)."""
    path = adapter.parent / "args.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: evaluate a checkpoint folder inside a trainer run folder")
    run = argparse.Namespace(**json.loads(path.read_text()))
    if run.use_mock_dataset:
        raise SystemExit(f"{adapter}: trained on the mock dataset, which has no held-out files to evaluate on")
    return run


def check_comparable(runs: Sequence[tuple[Path, argparse.Namespace]]) -> None:
    """Runs compared in one table must share teacher, data, split, solver grid and sampling settings."""
    (first_path, first), *others = runs
    for path, run in others:
        differing = [flag for flag in SHARED_RUN_FLAGS if getattr(run, flag, None) != getattr(first, flag, None)]
        if differing:
            raise SystemExit(f"{path} and {first_path} cannot share one table: their runs differ in "
                             + ", ".join(f"--{flag}" for flag in differing))
