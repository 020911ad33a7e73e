"""The training loop every distillation version shares; a version supplies only its objective.

One copy of the AnyText2 weights serves teacher (adapters disabled) and student (LoRA enabled). The
student's gradient pass goes through the accelerate-prepared (DDP) module, so gradients are averaged
across ranks; teacher and target passes run without grad on the unwrapped module.
"""

from __future__ import annotations

import abc
import argparse
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from ..anytext2.checkpoint import DTYPES, RANDOM_INIT_BANNER, build_random_teacher, load_teacher
from ..anytext2.model import AnyText2Model, Conditions, concat_conditions
from ..anytext2.unet import set_gradient_checkpointing
from ..distillation.adapter_info import AdapterInfo
from ..distillation.adapter_info import Objective as AdapterObjective
from ..distillation.conditioning import EncodedBatch, UncondCaptionCache, encode_batch
from ..distillation.lora import adapters_disabled, add_lora, detect_lora_targets, load_lora, lora_parameter_counts
from .args import build_parser
from .checkpointing import (
    STATE_FILE,
    check_finite,
    latest_checkpoint,
    load_training_state,
    recover_checkpoints,
    recover_folder,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from .data import build_dataloaders
from .distributed import refuse_sharded_teacher
from .nonfinite import NonFiniteGuard
from .previews import save_preview_grid
from .speed import (
    accelerate_trained_modules,
    build_adamw,
    check_model_speed_flags,
    configure_tf32,
    keep_implementation,
    tf32_state,
)
from .stopping import SIGTERM_EXIT_CODE, StopRequest, shutdown_workers

logger = logging.getLogger("student_model_v2.train")


class StudentForward(nn.Module):
    """The student's trainable computation as one module, so DDP sees it through ``forward``.

    One call computes the WriteNet residuals and the UNet eps with the LoRA adapters enabled.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    @property
    def anytext2(self) -> AnyText2Model:
        return self.peft_model.base_model.model

    def train(self, mode: bool = True) -> "StudentForward":
        """Only the LoRA dropouts follow the mode; the frozen AnyText2 stays in eval mode.

        A plain ``.train()`` would put the two OCR copies' BatchNorm into batch statistics and let it
        update its running statistics, so teacher conditioning would drift during training (the
        original toolkit's defect D7/D8).
        """
        self.training = mode
        self.anytext2.eval()
        for module in self.peft_model.modules():
            if isinstance(module, BaseTunerLayer):
                for dropout in module.lora_dropout.values():
                    dropout.train(mode)
        return self

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, conditions: Conditions, strength: float,
                attnx_scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = self.anytext2
        residuals = model.control_residuals(conditions, strength)
        return model.predict_eps(x_t, timesteps, conditions, residuals, attnx_scale), residuals


@dataclass
class PassCounter:
    """Model calls of training steps as (role, rows), for benchmarks and tests.

    UNet and WriteNet calls (roles teacher/student/target), VAE encoder calls (role "encode") and CLIP
    caption passes (roles cond/uncond; a cached uncond adds none).
    """

    unet_calls: list[tuple[str, int]] = field(default_factory=list)
    writenet_calls: list[tuple[str, int]] = field(default_factory=list)
    vae_calls: list[tuple[str, int]] = field(default_factory=list)
    text_encoder_calls: list[tuple[str, int]] = field(default_factory=list)

    def reset(self) -> None:
        self.unet_calls.clear()
        self.writenet_calls.clear()
        self.vae_calls.clear()
        self.text_encoder_calls.clear()

    def record_encoding(self, encoded: EncodedBatch) -> None:
        self.vae_calls.extend(("encode", rows) for rows in encoded.vae_calls)
        self.text_encoder_calls.extend(encoded.text_encoder_calls)


@dataclass(frozen=True)
class PassPlan:
    """How a version runs its frozen passes; the numbers are the same, only the cost differs.

    * ``merged_vae``: ``img`` and ``masked_img`` in one VAE call (else two);
    * ``cache_uncond_captions``: reuse the uncond CLIP contexts across batches (``UncondCaptionCache``);
    * ``batched_teacher``: cond and uncond rows in one WriteNet and one UNet call (else one per condition);
    * ``teacher_inference_mode``: teacher under ``torch.inference_mode`` (else ``no_grad``); its outputs
      are cloned out of inference mode before they meet the student's autograd graph.

    The defaults are the shared trainer's path (v2_4); the original v2 baseline turns every switch to
    its slow side so that v2_2's speed-ups are measured against it.
    """

    merged_vae: bool = True
    cache_uncond_captions: bool = True
    batched_teacher: bool = True
    teacher_inference_mode: bool = False


class Denoisers:
    """The three roles one set of weights plays in a step: CFG teacher, student (grad) and target.

    WriteNet residuals do not depend on the latent or the timestep (``fast_control``), so each role
    computes them at most once per batch: the teacher once per row set (cond+uncond batched, or cond and
    uncond separately under the baseline plan), the student once with grad, and the target reuses the
    student's residuals detached.
    """

    def __init__(self, student: nn.Module, model: AnyText2Model, accelerator: Accelerator, args: argparse.Namespace,
                 encoded: EncodedBatch, counter: PassCounter, plan: PassPlan = PassPlan()) -> None:
        self.student_module = student
        self.model = model
        self.accelerator = accelerator
        self.strength = args.control_strength
        self.attnx_scale = args.attnx_scale
        self.encoded = encoded
        self.counter = counter
        self.plan = plan
        self._teacher: dict[str, tuple[Conditions, list[torch.Tensor]]] = {}
        self._student_residuals: list[torch.Tensor] | None = None

    def teacher_eps(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher (adapters off) eps for cond and uncond rows: (eps_c, eps_u or None).

        ``plan.batched_teacher``: both rows in one UNet call, else one call per condition (v2 baseline).
        """
        guided = self.encoded.uncond is not None
        grad_off = torch.inference_mode() if self.plan.teacher_inference_mode else torch.no_grad()
        with grad_off, adapters_disabled(self.model), self.accelerator.autocast():
            if guided and self.plan.batched_teacher:
                both = self._teacher_pass("cond+uncond", torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]))
                eps_c, eps_u = both.chunk(2)
            else:
                eps_c = self._teacher_pass("cond", x_t, timesteps)
                eps_u = self._teacher_pass("uncond", x_t, timesteps) if guided else None
        return _out_of_inference(eps_c), None if eps_u is None else _out_of_inference(eps_u)

    def _teacher_pass(self, rows: str, x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        """One teacher UNet call on ``rows`` (cond, uncond or cond+uncond), WriteNet once per rows and batch."""
        if rows not in self._teacher:
            if rows == "cond+uncond":
                conditions = concat_conditions([self.encoded.cond, self.encoded.uncond])
            else:
                conditions = self.encoded.cond if rows == "cond" else self.encoded.uncond
            self._teacher[rows] = (conditions, self.model.control_residuals(conditions, self.strength))
            self.counter.writenet_calls.append(("teacher", conditions.batch_size))
        conditions, residuals = self._teacher[rows]
        eps = self.model.predict_eps(x_in, t_in, conditions, residuals, self.attnx_scale)
        self.counter.unet_calls.append(("teacher", x_in.shape[0]))
        return eps

    def student_eps(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Student eps with grad, through the prepared (DDP) module."""
        eps, residuals = self.student_module(x_t, timesteps, self.encoded.cond, self.strength, self.attnx_scale)
        self._student_residuals = [r.detach() for r in residuals]
        self.counter.writenet_calls.append(("student", x_t.shape[0]))
        self.counter.unet_calls.append(("student", x_t.shape[0]))
        return eps.float()

    @torch.no_grad()
    def target_eps(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Online-student eps without grad (the LCM-LoRA target network), reusing the student residuals.

        The residuals are the student's own (same LoRA weights, no latent or timestep input), so the
        target adds no WriteNet pass; ``student_eps`` must run first.
        """
        if self._student_residuals is None:
            raise RuntimeError("target_eps reuses the student's WriteNet residuals: call student_eps first")
        with self.accelerator.autocast():
            residuals = [r.to(_activation_dtype(self.model, x_t.device)) for r in self._student_residuals]
            eps = self.model.predict_eps(x_t, timesteps, self.encoded.cond, residuals, self.attnx_scale)
        self.counter.unet_calls.append(("target", x_t.shape[0]))
        return eps.float()


def _activation_dtype(model: AnyText2Model, device: torch.device) -> torch.dtype:
    """The dtype the WriteNet's residuals had when produced: the autocast dtype if on, else the weights'.

    The prepared student module returns its outputs converted to float32 (accelerate's
    ``convert_outputs_to_fp32``); fed back as float32 next to bf16 weights, CPU GroupNorm refuses the
    mixed dtypes. Casting back is exact (bf16/fp16 -> fp32 -> bf16/fp16).
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.dtype


def _out_of_inference(eps: torch.Tensor) -> torch.Tensor:
    """float32 eps usable next to autograd tensors (an inference-mode tensor is cloned into a normal one)."""
    eps = eps.float()
    return eps.clone() if eps.is_inference() else eps


@dataclass
class LossOutput:
    """A micro-batch's loss and its logged terms, all device tensors: the trainer reads them to the host
    only at logging steps, so a training step needs no device sync for them."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(abc.ABC):
    """What a training version optimises; everything else is the shared trainer's."""

    name: str = "objective"
    kind: AdapterObjective = "x0_regression"
    needs_uncond: bool = True
    passes: PassPlan = PassPlan()

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the version's own flags."""

    def __init__(self, args: argparse.Namespace, alphas_cumprod: torch.Tensor) -> None:
        self.args = args
        self.alphas_cumprod = alphas_cumprod

    def adapter_info(self) -> AdapterInfo:
        """What the saved adapter was trained for (written as ``distillation.json`` in every checkpoint)."""
        return AdapterInfo(version=self.name, objective=self.kind, num_inference_steps=self.args.num_inference_steps,
                           lora_targets=self.args.lora_targets, lora_rank=self.args.lora_rank,
                           lora_alpha=self.args.lora_alpha, num_phases=self.num_phases())

    def num_phases(self) -> int | None:
        """The phase count a phased-consistency objective trains (its sampler serves exactly that many steps)."""
        return None

    @abc.abstractmethod
    def compute_loss(self, denoisers: Denoisers, latents: torch.Tensor, batch: dict[str, Any],
                     generator: torch.Generator) -> LossOutput:
        """Loss of one micro-batch; call ``denoisers.student_eps`` exactly once (the DDP forward)."""


def make_parser(objective_cls: type[Objective], description: str) -> argparse.ArgumentParser:
    parser = build_parser(description)
    objective_cls.add_arguments(parser.add_argument_group(f"{objective_cls.name} objective"))
    return parser


def _lr_lambda(args: argparse.Namespace, total_steps: int):
    warmup = max(0, args.lr_warmup_steps)

    def scale(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if args.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return args.lr_min_ratio + (1.0 - args.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return scale


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Trainer:
    """Builds model, LoRA, data and optimizer from flags, then runs, checkpoints and evaluates."""

    def __init__(self, args: argparse.Namespace, objective_cls: type[Objective]) -> None:
        self.args = args
        ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with="tensorboard",
            project_dir=args.output_dir,
            kwargs_handlers=[ddp_kwargs],
            # batches are copied to the device one ahead of the step that uses them (accelerate's loader
            # moves a batch before it fetches the next); from pinned memory the copy is asynchronous
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
        acc = self.accelerator
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and acc.num_processes == 1:
            raise RuntimeError(
                f"launched as {launched} processes but accelerate sees one: every rank would train its own copy. "
                "Without GPUs set ACCELERATE_USE_CPU=1 (e.g. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                "--num_processes 2 ...`); `accelerate launch --cpu` starts a single process unless MPI is configured"
            )
        logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        configure_tf32(args.allow_tf32)
        check_model_speed_flags(args)
        if args.pin_memory is None:
            args.pin_memory = acc.device.type == "cuda"
        refuse_sharded_teacher(acc.state)
        self.output_dir = self._resolve_output_dir()
        set_seed(args.seed)
        self.generator = torch.Generator(device=acc.device).manual_seed(args.seed * 1000 + acc.process_index)

        self.model = self._build_teacher()
        # the teacher's own schedule buffer (its YAML's linear_start/linear_end, or the checkpoint's)
        self.objective = objective_cls(args, self.model.alphas_cumprod.to(acc.device, torch.float32))
        if args.gradient_checkpointing:
            set_gradient_checkpointing(self.model.unet)
            set_gradient_checkpointing(self.model.control_model)
        self.peft_model, self.resume_dir = self._build_student()
        if self.resume_dir is not None:
            self._adopt_adapter_settings()
        # LoRA init above is identical on every rank; from here the global RNGs (LoRA dropout masks) differ per rank
        set_seed(args.seed, device_specific=True)
        self.student = StudentForward(self.peft_model)
        self.acceleration = accelerate_trained_modules(self.peft_model, args)
        self.lora_parameters = lora_parameter_counts(self.student)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer, self.optimizer_implementation = build_adamw(params, args)
        logger.info("AdamW: %s; TF32 %s; pinned batches: %s; compiled: %s; channels-last: %s",
                    self.optimizer_implementation, tf32_state(), args.pin_memory, self.acceleration.compiled,
                    self.acceleration.channels_last)
        loaders = build_dataloaders(args, eval_samples=args.eval_batches * args.train_batch_size * acc.num_processes)
        self.dataset_stats = loaders.stats
        self.student, self.optimizer, self.train_loader = acc.prepare(self.student, self.optimizer, loaders.train)
        self.val_loader = acc.prepare(loaders.val) if loaders.val is not None else None
        self.test_loader = acc.prepare(loaders.test) if loaders.test is not None else None
        self.counter = PassCounter()
        self.uncond_cache = UncondCaptionCache()

        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / args.gradient_accumulation_steps))
        self.global_step, self.epoch, self.batches_done = 0, 0, 0
        self._ema_loss: torch.Tensor | None = None  # this rank's EMA of its losses, on the device
        self.nonfinite = NonFiniteGuard(args.max_consecutive_nonfinite, acc.device)
        self.update_skipped = False
        self.stop_agreed = False
        state = load_training_state(self.resume_dir) if self.resume_dir is not None and args.resume_optimizer else None
        self.schedule_steps, self.total_steps = self._step_plan(state)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer,
                                                              _lr_lambda(args, self.schedule_steps))
        if state is not None:
            self._restore_state(state)
        if args.resume_add_steps > 0:
            self.total_steps = self.global_step + args.resume_add_steps
        self._check_lr_stays_positive()
        self.max_epochs = max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        self.stop = StopRequest()
        self._epoch_loader: Any = None
        self._batches: Any = None

    # ----------------------------------------------------------------------------- setup
    def _resolve_output_dir(self) -> Path:
        """One run folder for all ranks: the main process picks the time suffix and broadcasts it."""
        out = Path(self.args.output_dir)
        if self.args.add_time_suffix and not self.args.resume_path:
            name = [datetime.now().strftime("train_%Y%m%d_%H%M%S")]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(name)
            out = out / name[0]
        if self.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            resolved = {k: v for k, v in vars(self.args).items()}
            resolved["resolved_output_dir"] = str(out)
            (out / "args.json").write_text(json.dumps(resolved, indent=2, default=str))
        self.accelerator.project_configuration.set_directories(str(out))
        self.accelerator.project_configuration.logging_dir = str(out)
        self.accelerator.init_trackers("logs", config=_scalar_config(self.args))
        return out

    def _build_teacher(self) -> AnyText2Model:
        args = self.args
        dtype = DTYPES[args.teacher_dtype]
        if args.teacher_ckpt:
            model = load_teacher(args.config, args.teacher_ckpt, dtype=dtype, device=self.accelerator.device,
                                 trust_pickle=args.trust_checkpoint)
        else:
            model = build_random_teacher(args.config, dtype=dtype, device=self.accelerator.device)
            if self.accelerator.is_main_process:
                (Path(self.output_dir) / "RANDOM_INIT_TEACHER.txt").write_text(RANDOM_INIT_BANNER + "\n")
        model.requires_grad_(False)
        return model.eval()

    def _build_student(self) -> tuple[nn.Module, Path | None]:
        args = self.args
        resume = self._resolve_resume()
        if resume is not None:
            logger.info("resuming LoRA from %s (its adapter_config wins over --lora_rank/--lora_alpha)", resume)
            return load_lora(self.model, str(resume), trainable=True), resume
        return add_lora(self.model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets), None

    def _adopt_adapter_settings(self) -> None:
        """A resumed adapter keeps its modules, rank and alpha: record those, not the flags'."""
        args, config = self.args, self.peft_model.peft_config[self.peft_model.active_adapter]
        found = (detect_lora_targets(self.peft_model), int(config.r), float(config.lora_alpha))
        if found != (args.lora_targets, args.lora_rank, float(args.lora_alpha)):
            logger.warning("the resumed adapter has targets %s, rank %d, alpha %g; --lora_targets/--lora_rank/"
                           "--lora_alpha (%s, %d, %g) do not apply to it", *found, args.lora_targets, args.lora_rank,
                           args.lora_alpha)
        args.lora_targets, args.lora_rank, args.lora_alpha = found

    def _resolve_resume(self) -> Path | None:
        """The checkpoint to resume from: the main process decides and broadcasts it (collective).

        Ranks resolving ``latest`` on their own could pick different folders (a save in flight, a
        filesystem that is not shared); a refusal is broadcast too, so every rank fails with it.
        """
        acc = self.accelerator
        if not self.args.resume_path:
            return None
        choice = list(self._find_checkpoint()) if acc.is_main_process else ["", ""]
        if acc.num_processes > 1:
            broadcast_object_list(choice)
        folder, error = choice
        if error:
            raise FileNotFoundError(error)
        if not folder:
            return None
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"rank {acc.process_index}: checkpoint {folder} chosen by the main process is not "
                                    "visible here; every machine must see the output_dir on a shared filesystem")
        return Path(folder)

    def _find_checkpoint(self) -> tuple[str, str]:
        """(folder or "", refusal or ""), after settling what an interrupted save left (main process only)."""
        args = self.args
        if args.resume_path != "latest":
            folder = Path(args.resume_path)
            recover_folder(folder)
            if not folder.is_dir():
                return "", f"--resume_path {folder}: no such checkpoint folder"
            return str(folder), ""
        recover_checkpoints(self.output_dir)
        found = latest_checkpoint(self.output_dir)
        if found is not None:
            return str(found), ""
        if args.resume_optimizer:
            return "", (f"--resume_path latest --resume_optimizer: no checkpoint folder with {STATE_FILE} in "
                        f"{self.output_dir}; check --output_dir, or drop --resume_optimizer to start a new run")
        logger.info("resume_path=latest: no checkpoint in %s, starting fresh", self.output_dir)
        return "", ""

    def _planned_steps(self) -> int:
        args = self.args
        if args.max_epochs > 0:
            total = args.max_epochs * self.steps_per_epoch
            return min(total, args.max_train_steps) if args.max_train_steps > 0 else total
        if args.max_train_steps <= 0:
            raise ValueError("set --max_train_steps > 0 or --max_epochs > 0")
        return args.max_train_steps

    def _step_plan(self, state: dict[str, Any] | None) -> tuple[int, int]:
        """(LR-schedule horizon, last optimizer step) of this run.

        A resumed run keeps the checkpoint's plan, so the cosine and the end stay those of the
        uninterrupted run even after an earlier ``--resume_add_steps``; flags that now plan otherwise
        are reported rather than half-applied.
        """
        planned = self._planned_steps()
        if state is None:
            return planned, planned
        schedule, total = int(state["schedule_steps"]), int(state["total_steps"])
        if planned != schedule:
            logger.warning("the flags plan %d optimizer steps but the checkpoint's run planned %d: keeping the "
                           "checkpoint's LR schedule and end (step %d); use --resume_add_steps to train longer",
                           planned, schedule, total)
        return schedule, total

    # ----------------------------------------------------------------------------- state
    def _check_lr_stays_positive(self) -> None:
        """Refuse a plan whose remaining steps would train at LR 0 instead of doing it silently.

        After warmup the schedule is non-increasing, so its smallest value over the remaining steps is
        at the first or the last of them; with ``--resume_add_steps`` past a cosine that decayed to a
        0 floor, that is 0.
        """
        args = self.args
        if self.global_step >= self.total_steps:
            return
        scale = _lr_lambda(args, self.schedule_steps)
        if args.learning_rate * min(scale(self.global_step), scale(self.total_steps - 1)) <= 0:
            raise ValueError(
                f"optimizer steps {self.global_step + 1}..{self.total_steps} would train at learning rate 0: the "
                f"{args.lr_scheduler} schedule (--learning_rate {args.learning_rate}) of this run ends at step "
                f"{self.schedule_steps} with --lr_min_ratio {args.lr_min_ratio}. Pass --lr_min_ratio > 0 (the floor "
                "the added steps train at) or --lr_scheduler constant with --resume_add_steps")

    def _training_state(self) -> dict[str, Any]:
        states = gather_object([rng_state(self.generator)])
        per_rank_stats = gather_object([self.dataset_stats.as_dict()])
        total_stats: Counter = Counter()
        for counts in per_rank_stats:
            total_stats.update(counts)
        scaler = self.accelerator.scaler
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "total_steps": self.total_steps,
            "schedule_steps": self.schedule_steps,
            "ema_loss": self.ema_loss(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": states,
            "num_processes": self.accelerator.num_processes,
            "train_batch_size": self.args.train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "dataset_stats": dict(total_stats),
            "dataset_stats_per_rank": per_rank_stats,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "nonfinite_skips": self.nonfinite.skipped,
        }

    def _check_same_layout(self, state: dict[str, Any]) -> None:
        """Refuse to resume exactly under another world size, batch size or accumulation.

        The data position is a count of per-rank micro-batches and the RNG streams and data-issue
        counts are per rank: under another layout they would silently mean other samples and noise.
        (Checkpoints written before these keys existed are checked for the world size only.)
        """
        now = {"num_processes": self.accelerator.num_processes, "train_batch_size": self.args.train_batch_size,
               "gradient_accumulation_steps": self.args.gradient_accumulation_steps}
        changed = [f"{key} {state[key]} -> {value}" for key, value in now.items()
                   if state.get(key) is not None and state[key] != value]
        if changed:
            raise ValueError(
                f"{self.resume_dir}: cannot continue this run exactly with a different layout ({', '.join(changed)}); "
                "resume with the checkpoint's processes, batch size and accumulation, or drop --resume_optimizer "
                "to start a new run from its adapter weights (see docs/training.md, world-size change)")

    def _restore_state(self, state: dict[str, Any]) -> None:
        acc = self.accelerator
        self._check_same_layout(state)
        self.optimizer.load_state_dict(state["optimizer"])
        keep_implementation(self.optimizer.optimizer, self.optimizer_implementation)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        if state["ema_loss"] is not None:
            self._ema_loss = torch.tensor(float(state["ema_loss"]), device=acc.device)
        restore_rng_state(state["rng"][acc.process_index], self.generator)
        self.nonfinite.skipped = int(state.get("nonfinite_skips", 0))
        per_rank_stats = state.get("dataset_stats_per_rank")
        if per_rank_stats is not None:
            self.dataset_stats.counts.update(per_rank_stats[acc.process_index])
        else:
            logger.warning("%s predates per-rank data-issue counts: the skipped-sample counts restart at 0", self.resume_dir)
        saved_scaler = state.get("grad_scaler")
        if acc.scaler is not None and saved_scaler is not None:
            acc.scaler.load_state_dict(saved_scaler)
        elif acc.scaler is not None:
            logger.warning("%s holds no fp16 grad-scaler state: the loss scale restarts at its initial value",
                           self.resume_dir)
        logger.info("resumed at step %d (epoch %d, %d batches into it)", self.global_step, self.epoch, self.batches_done)

    def save(self, name: str) -> Path:
        """Checkpoint folder ``name`` (collective: every rank calls it)."""
        state = self._training_state()
        folder = self.output_dir / name
        trainable = ((n, p) for n, p in self.student.named_parameters() if p.requires_grad)
        check_finite(trainable, state["optimizer"], folder)  # on every rank, so all ranks stop together
        if self.accelerator.is_main_process:
            save_checkpoint(folder, self.accelerator.unwrap_model(self.student).peft_model, state,
                            self.objective.adapter_info())
            logger.info("saved %s", folder)
        self.accelerator.wait_for_everyone()
        return folder

    # ----------------------------------------------------------------------------- steps
    def _micro_step(self, batch: dict[str, Any], generator: torch.Generator) -> LossOutput:
        model, plan = self.model, self.objective.passes
        encoded = encode_batch(model, batch, self.args.negative_prompt if self.objective.needs_uncond else None, generator,
                               merged_vae=plan.merged_vae,
                               uncond_cache=self.uncond_cache if plan.cache_uncond_captions else None)
        self.counter.record_encoding(encoded)
        denoisers = Denoisers(self.student, model, self.accelerator, self.args, encoded, self.counter, plan)
        return self.objective.compute_loss(denoisers, encoded.latents, batch, generator)

    def train_step(self, batch: dict[str, Any]) -> LossOutput:
        """One micro-batch: loss, backward, and (at accumulation boundaries) clip + optimizer step."""
        acc = self.accelerator
        with acc.accumulate(self.student):
            out = self._micro_step(batch, self.generator)
            self.nonfinite.observe(out.loss)
            acc.backward(out.loss)
            if acc.sync_gradients:
                self.update_skipped = self._apply_update()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def _apply_update(self) -> bool:
        """Clip and step at an accumulation boundary, unless the non-finite guard skips it (returns True).

        A skip leaves weights and optimizer state untouched on every rank (the gradients are zeroed by
        the caller); under fp16 the grad scaler backs off as it does for an overflow.

        This is the step's only host read: one all-reduce of [non-finite flag, stop request] and one
        ``tolist``, so every rank skips the same update and stops at the same step (``stop_agreed``).
        Under fp16 the grad scaler adds its own overflow read unless the optimizer is fused.
        """
        acc = self.accelerator
        norm = acc.clip_grad_norm_(self.student.parameters(), self.args.max_grad_norm) if self.args.max_grad_norm > 0 else None
        bad = self.nonfinite.local_flag(None if acc.scaler is not None else norm)
        flags = torch.stack([bad, bad.new_full((), 1.0 if self.stop.requested else 0.0)])
        flagged_ranks, stopping_ranks = acc.reduce(flags, reduction="sum").tolist()
        self.stop_agreed = stopping_ranks > 0
        if not self.nonfinite.settle(flagged_ranks, self.global_step + 1):
            self.optimizer.step()
            return False
        if acc.scaler is not None:
            acc.scaler.update(acc.scaler.get_scale() * acc.scaler.get_backoff_factor())
        logger.warning("non-finite loss or gradient at optimizer step %d: update skipped on every rank (%d skipped so "
                       "far, %d in a row)", self.global_step + 1, self.nonfinite.skipped, self.nonfinite.consecutive)
        return True

    def evaluate(self, split: str) -> float | None:
        """Objective loss on the split's fixed first ``eval_batches x batch x world`` samples (collective).

        The loader holds exactly that subset and is read to its end: leaving an accelerate-prepared
        loader early would keep it registered as the active one, and the accumulation boundaries of
        training would then follow the eval loader instead of the training loader.
        """
        loader = self.val_loader if split == "val" else self.test_loader
        if loader is None or self.args.eval_batches <= 0:
            return None
        generator = torch.Generator(device=self.accelerator.device).manual_seed(10_000 + self.accelerator.process_index)
        self.student.eval()
        losses = []
        with torch.no_grad():
            for batch in loader:
                losses.append(self._micro_step(batch, generator).loss.detach().float().reshape(1))
        self.student.train()
        local = torch.cat(losses) if losses else torch.zeros(0, device=self.accelerator.device)
        gathered = self.accelerator.gather_for_metrics(local)
        value = float(gathered.mean()) if gathered.numel() else float("nan")
        self.accelerator.log({f"{split}/loss": value}, step=self.global_step)
        logger.info("[eval] %s loss %.6f at step %d", split, value, self.global_step)
        return value

    def _log_preview(self, batch: dict[str, Any]) -> None:
        """Preview of what the student samples now, with its LoRA dropout off (as at inference)."""
        args = self.args
        folder = Path(args.log_image_dir) if args.log_image_dir else self.output_dir / "train_img"
        student = self.accelerator.unwrap_model(self.student)
        student.eval()
        try:
            save_preview_grid(student.anytext2, batch, args, folder / f"step_{self.global_step:07d}.png",
                              self.objective.adapter_info())
        finally:
            student.train()

    def ema_loss(self) -> float | None:
        """EMA of the loss over every rank (collective); None before the first update.

        Each rank keeps the EMA of its own losses on the device; all ranks apply or skip the same
        updates and the EMA is linear, so the mean of the ranks' EMAs is the EMA of the mean loss.
        """
        if self._ema_loss is None:
            return None
        return float(self.accelerator.reduce(self._ema_loss, reduction="mean"))

    def train(self) -> None:
        """Train to the planned step; on SIGTERM checkpoint and exit with ``SIGTERM_EXIT_CODE``.

        The data workers are shut down on every way out (they ignore SIGTERM, see ``stopping.py``).
        """
        self.stop.install()
        try:
            stop_reason = self._train_loop()
        finally:
            if hasattr(self._batches, "close"):
                self._batches.close()  # frees a non-persistent loader's iterator, which joins its workers
            shutdown_workers(self._epoch_loader, self.train_loader, self.val_loader, self.test_loader)
        if stop_reason == "signal":
            sys.exit(SIGTERM_EXIT_CODE)

    def _train_loop(self) -> str | None:
        """The epoch/step loop; returns why it stopped early (None when it reached the planned step)."""
        args, acc = self.args, self.accelerator
        if self.global_step >= self.total_steps:
            logger.warning("%s is already at step %d of %d: nothing to train and no checkpoint rewritten; pass "
                           "--resume_add_steps N to train longer", self.resume_dir, self.global_step, self.total_steps)
            acc.end_training()
            return None
        if acc.is_main_process:
            counts = self.lora_parameters
            logger.info("LoRA parameters (%s targets): %s (UNet %s + AttnX %s, WriteNet %s); optimizer steps: %d "
                        "(%d per epoch); teacher: %s", args.lora_targets, f"{counts['total']:,}", f"{counts['unet']:,}",
                        f"{counts['unet_attnx']:,}", f"{counts['writenet']:,}", self.total_steps, self.steps_per_epoch,
                        "random init rule" if self.model.is_random_init else args.teacher_ckpt)
        progress = tqdm(total=self.total_steps, initial=self.global_step, disable=not acc.is_local_main_process,
                        desc=f"train {self.objective.name}", dynamic_ncols=True)
        started, run_steps = time.perf_counter(), 0
        self.student.train()
        stop_reason = None
        while self.global_step < self.total_steps and stop_reason is None and self.epoch < self.max_epochs:
            loader = self.train_loader
            if self.batches_done:
                loader = acc.skip_first_batches(self.train_loader, self.batches_done)
            self._epoch_loader = loader
            loader.set_epoch(self.epoch)
            last_batch = None
            self._batches = iter(loader)
            for batch in self._batches:
                last_batch = batch
                self.dataset_stats.update(batch.get("data_issues"))
                out = self.train_step(batch)
                self.batches_done += 1
                if not acc.sync_gradients:
                    continue
                self.lr_scheduler.step()
                self.global_step += 1
                run_steps += 1
                progress.update(1)
                self._after_step(out, progress, started, run_steps, batch)
                if self.stop_agreed:
                    stop_reason = "signal"
                elif args.stop_after_steps and run_steps >= args.stop_after_steps:
                    stop_reason = "stop_after_steps"
                if stop_reason or self.global_step >= self.total_steps:
                    break
            else:
                self.epoch += 1
                self.batches_done = 0
                if args.save_epochs and self.epoch % args.save_epochs == 0:
                    self.save(f"checkpoint-epoch-{self.epoch}")
                    self.evaluate("val")
                continue
            if last_batch is not None and self.batches_done >= len(self.train_loader):
                self.epoch += 1
                self.batches_done = 0
        progress.close()
        if stop_reason is not None:
            self.save(f"checkpoint-{self.global_step}")
            acc.end_training()
            logger.warning("stopped early (%s) at step %d; resume with --resume_path latest --resume_optimizer",
                           stop_reason, self.global_step)
            return stop_reason
        self.save("checkpoint-final")
        self.evaluate("val")
        self.evaluate("test")
        acc.end_training()
        return None

    def _after_step(self, out: LossOutput, progress: tqdm, started: float, run_steps: int, batch: dict[str, Any]) -> None:
        """Bookkeeping after an optimizer step; loss and terms reach the host only at logging steps."""
        args, acc = self.args, self.accelerator
        if not self.update_skipped:
            local = out.loss.detach().float()
            self._ema_loss = local if self._ema_loss is None else 0.9 * self._ema_loss + 0.1 * local
        if self.global_step % max(1, args.logging_steps) == 0 or self.global_step == 1:
            loss = float(acc.reduce(out.loss.detach().float(), reduction="mean"))
            elapsed = time.perf_counter() - started
            rate = run_steps / max(elapsed, 1e-9)
            samples = rate * args.train_batch_size * args.gradient_accumulation_steps * acc.num_processes
            lr = self.lr_scheduler.get_last_lr()[0]
            mem = _peak_memory_gb(acc.device)
            local_skipped = torch.tensor(self.dataset_stats.skipped_total(), dtype=torch.int64, device=acc.device)
            skipped = int(acc.reduce(local_skipped, reduction="sum"))  # all ranks: each sees its own shard
            ema_loss = self.ema_loss()
            ema = float("nan") if ema_loss is None else ema_loss
            progress.set_postfix(loss=f"{loss:.4g}", ema=f"{ema:.4g}", lr=f"{lr:.2e}", it_s=f"{rate:.2f}",
                                 samples_s=f"{samples:.2f}", mem_gb=f"{mem:.2f}", skipped=skipped,
                                 nonfinite=self.nonfinite.skipped)
            scalars = {"train/loss": loss, "train/loss_ema": ema, "train/lr": lr, "train/it_s": rate,
                       "train/samples_s": samples, "train/peak_mem_gb": mem, "train/epoch": self.epoch,
                       "data/skipped_samples": skipped, "train/nonfinite_skips": self.nonfinite.skipped}
            scalars.update({f"train/{k}": float(v) for k, v in out.terms.items()})
            acc.log(scalars, step=self.global_step)
        if args.log_image_steps and self.global_step % args.log_image_steps == 0 and acc.is_main_process:
            self._log_preview(batch)
        if args.save_steps and self.global_step % args.save_steps == 0 and self.global_step < self.total_steps:
            self.save(f"checkpoint-{self.global_step}")
            self.evaluate("val")


def _scalar_config(args: argparse.Namespace) -> dict[str, Any]:
    """TensorBoard hparams accept scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def run(objective_cls: type[Objective], argv: Sequence[str] | None, description: str) -> Trainer:
    """Parse flags, build everything and train; returns the trainer (for tests and benchmarks)."""
    args = make_parser(objective_cls, description).parse_args(argv)
    trainer = Trainer(args, objective_cls)
    trainer.train()
    return trainer
