"""Command-line flags shared by every training version (the original toolkit's names where it had them).

Each version script adds only the flags of its objective. ``launch_from_yaml.py`` checks YAML keys
against the parser built here, so an unknown key fails with a suggestion instead of a crash deep in
argparse.
"""

from __future__ import annotations

import argparse

from ..anytext2.config import MODELS_YAML_DIR, REPO_ROOT
from ..distillation.lora_targets import DEFAULT_LORA_TARGETS, LORA_TARGET_SETS
from .speed import TRAINING_COMPILE_MODES

DEFAULT_NEGATIVE_PROMPT = (
    "low-res, bad anatomy, extra digit, fewer digits, cropped, worst quality, low quality, watermark, "
    "unreadable text, messy words, distorted text, disorganized writing, advertising picture"
)
DEFAULT_DATASET = str(REPO_ROOT / "demodataset" / "annotations" / "demo_data.json")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default=str(MODELS_YAML_DIR / "anytext2_tiny.yaml"), help="model YAML (original schema)")
    model.add_argument("--teacher_ckpt", default="", help="AnyText2 checkpoint; empty = random init rule (tiny/benchmarks only)")
    model.add_argument("--trust_checkpoint", action="store_true", help="allow pickled objects other than tensors in --teacher_ckpt")
    model.add_argument("--teacher_dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                       help="dtype of the frozen base weights (LoRA weights stay fp32)")
    model.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet/WriteNet blocks in backward")

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default=str(REPO_ROOT / "runs" / "student"))
    out.add_argument("--add_time_suffix", action="store_true", help="append /train_YYYYmmdd_HHMMSS (one name for all ranks)")
    out.add_argument("--logging_steps", type=int, default=10)
    out.add_argument("--save_steps", type=int, default=2000, help="checkpoint every N optimizer steps (0 = off)")
    out.add_argument("--save_epochs", type=int, default=0, help="checkpoint every N epochs (0 = off)")
    out.add_argument("--log_image_steps", type=int, default=0, help="preview grid every N steps (0 = off)")
    out.add_argument("--log_image_samples", type=int, default=4)
    out.add_argument("--log_image_infer_steps", type=int, default=4, help="LCM steps of the student preview")
    out.add_argument("--log_image_dir", default="", help="default <output_dir>/train_img")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_json", nargs="+", default=[DEFAULT_DATASET],
                      help="AnyText2 JSON/JSONL files, comma lists or .list/.txt files of paths")
    data.add_argument("--use_mock_dataset", action="store_true", help="synthetic samples, no files needed")
    data.add_argument("--mock_size", type=int, default=64)
    data.add_argument("--lmdb_path", default="", help="LMDB render cache from build_lmdb_cache.py")
    data.add_argument("--resolution", type=int, default=512)
    data.add_argument("--max_lines", type=int, default=5)
    data.add_argument("--max_chars", type=int, default=20)
    data.add_argument("--font_path", default=str(REPO_ROOT / "font" / "NotoSansCJKsc-Regular-subset.otf"))
    data.add_argument("--font_dir", default="",
                      help="folder of fonts: each line is drawn in one that covers it, chosen per line (upstream's "
                      "rand_font); empty = every line in --font_path")
    data.add_argument("--mask_img_prob", type=float, default=0.5, help="probability of an edit-mode sample")
    data.add_argument("--font_hint_prob", type=float, default=0.8)
    data.add_argument("--no_font_hint_randaug", action="store_true", help="disable font-hint random augmentation")
    data.add_argument("--wm_thresh", type=float, default=1.0, help="drop samples with wm_score > thresh (upstream's rule)")
    data.add_argument("--cache_dir", default="", help="where streaming JSON indexes are stored")
    data.add_argument("--train_ratio", type=float, default=0.9)
    data.add_argument("--val_ratio", type=float, default=0.05)
    data.add_argument("--test_ratio", type=float, default=0.05)
    data.add_argument("--split_seed", type=int, default=42)
    data.add_argument("--num_workers", type=int, default=0)
    data.add_argument("--prefetch_factor", type=int, default=2)
    data.add_argument("--persistent_workers", action="store_true")
    data.add_argument("--pin_memory", action=argparse.BooleanOptionalAction, default=None,
                      help="page-locked batches, copied to the GPU asynchronously (non_blocking); default: on when "
                      "training on CUDA, off on the CPU (where there is no copy)")
    data.add_argument("--worker_num_threads", type=int, default=1,
                      help="torch/OpenCV threads per data worker (OpenCV's count is set in the main process before "
                      "the dataset is built, since a forked worker cannot change it)")
    data.add_argument("--dataloader_start_method", choices=["fork", "spawn", "forkserver"], default="fork",
                      help="how DataLoader workers start: fork is fastest; spawn/forkserver start clean interpreters "
                      "(each re-imports the package and unpickles the dataset)")
    data.add_argument("--dataloader_timeout", type=float, default=600,
                      help="a data worker that spends longer than this on one batch prints its stack and exits, "
                      "so a hung worker fails the run instead of stalling it; 0 = no limit")
    data.add_argument("--lmdb_mismatch", choices=["error", "warn"], default="error",
                      help="an --lmdb_path cache that lacks most of this dataset's records: refuse, or warn and "
                      "render the misses online (counted as cache.miss)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--train_batch_size", type=int, default=1, help="per process")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1)
    opt.add_argument("--learning_rate", type=float, default=1e-4)
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=1e-2)
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--lr_scheduler", choices=["constant", "warmup_cosine"], default="constant")
    opt.add_argument("--lr_warmup_steps", type=int, default=0)
    opt.add_argument("--lr_min_ratio", type=float, default=0.0, help="cosine floor as a fraction of the LR")
    opt.add_argument("--max_train_steps", type=int, default=1000, help="optimizer updates (cap in epoch mode; 0 = none)")
    opt.add_argument("--max_epochs", type=int, default=0, help="> 0: epoch-driven training")
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    opt.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                     help="TF32 tensor-core matmuls and cuDNN convolutions for float32 operations on CUDA (float32 "
                     "range, 10-bit mantissa in the multiplies); no effect on the CPU or on bf16/fp16 autocast ops")
    opt.add_argument("--no_tf32", dest="allow_tf32", action="store_false", help="same as --no-allow_tf32")
    opt.add_argument("--no_fused_adamw", action="store_true",
                     help="use torch's default AdamW loop instead of the fused kernel (fused is used wherever torch "
                     "supports the LoRA parameters: CUDA and CPU, float parameters)")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet and WriteNet the teacher and student share (opt-in: not bit-exact, "
                     "outputs move by float round-off; each new batch shape and adapter state compiles once)")
    opt.add_argument("--compile_mode", choices=TRAINING_COMPILE_MODES, default="default",
                     help="torch.compile mode with --compile (CUDA graphs, reduce-overhead, are not offered: the "
                     "teacher and student calls alternate adapter states on the same modules)")
    opt.add_argument("--compile_backend", default="inductor",
                     help="torch.compile backend with --compile; aot_eager traces the same graphs without "
                     "generating kernels (a quick check that a model compiles)")
    opt.add_argument("--channels_last", action="store_true",
                     help="channels-last memory format for the UNet and WriteNet (opt-in: other convolution kernels, "
                     "outputs move by float round-off)")
    opt.add_argument("--seed", type=int, default=42)
    opt.add_argument("--max_consecutive_nonfinite", type=int, default=5,
                     help="stop with an error after this many optimizer steps in a row whose loss (on any rank) or "
                     "gradient was NaN/Inf; each such step is skipped on every rank and counted (0 = never stop)")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=64)
    lora.add_argument("--lora_alpha", type=float, default=64)
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="dropout masks differ per rank (seeded by rank)")
    lora.add_argument("--lora_targets", choices=LORA_TARGET_SETS, default=DEFAULT_LORA_TARGETS,
                      help="official: the diffusers LCM-LoRA module set (attention, feed-forward, transformer "
                      "projections, ResBlock convs, time projections, down/up-sampling convs) on UNet and WriteNet; "
                      "attention: the original toolkit's q/k/v/out only. Both add the WriteNet's output convs")

    distil = parser.add_argument_group("distillation (shared)")
    distil.add_argument("--num_inference_steps", type=int, default=50,
                        help="N of the training timestep grid (DDIM solver grid), not an inference step count")
    distil.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT,
                        help="image caption of AnyText2's uncond (its text caption is empty)")
    distil.add_argument("--control_strength", type=float, default=1.0)
    distil.add_argument("--attnx_scale", type=float, default=1.0)

    resume = parser.add_argument_group("resume and evaluation")
    resume.add_argument("--resume_path", default="",
                        help="a checkpoint folder of this trainer, or 'latest': the folder of output_dir (step, epoch "
                        "or final) with the highest global_step")
    resume.add_argument("--resume_optimizer", action="store_true",
                        help="also restore optimizer, LR schedule, RNG and data position from training_state.pt")
    resume.add_argument("--resume_add_steps", type=int, default=0,
                        help="> 0: train this many more steps after resuming (the LR schedule keeps its horizon; "
                        "refused when the added steps would train at LR 0, e.g. after a cosine with --lr_min_ratio 0)")
    resume.add_argument("--eval_batches", type=int, default=1, help="val batches per evaluation (0 = off)")
    resume.add_argument("--stop_after_steps", type=int, default=0,
                        help="> 0: checkpoint and stop after this many updates of this run, keeping the schedule of "
                        "max_train_steps (for time-limited cluster jobs; resume later)")
    return parser
