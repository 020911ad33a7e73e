"""Run under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo): a NaN loss on rank 1 only.

Three optimizer steps at accumulation 2. Rank 1 turns its 3rd micro-batch loss (the first, unsynchronised
micro-batch of step 2) into NaN. Every rank also reports one skipped sample per micro-batch of its own
(rank r: r + 1), so the checkpoint and the logged all-rank sum can be checked. Each rank saves its LoRA
weights after every optimizer step, whether the step was skipped, its guard count and the scalars it
logged.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective  # noqa: E402
from student_model_v2.training.data import DatasetStats  # noqa: E402
from student_model_v2.training.trainer import Trainer, make_parser  # noqa: E402

NAN_RANK, NAN_MICRO_BATCH = 1, 3


def main() -> None:
    out_dir = Path(sys.argv[1])
    args = make_parser(LCMObjective, "non-finite test").parse_args([
        "--resolution", "64", "--max_train_steps", "3", "--output_dir", str(out_dir), "--lora_rank", "4",
        "--lora_alpha", "4", "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--save_steps", "0",
        "--eval_batches", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
    ])
    trainer = Trainer(args, LCMObjective)
    rank = trainer.accelerator.process_index
    micro_batches, steps, logged = [0], [], []

    original_micro_step = Trainer._micro_step

    def micro_step(self, batch, generator):
        out = original_micro_step(self, batch, generator)
        if self.student.training:
            micro_batches[0] += 1
            if rank == NAN_RANK and micro_batches[0] == NAN_MICRO_BATCH:
                out.loss = out.loss * float("nan")
        return out

    original_after_step = Trainer._after_step

    def after_step(self, out, *rest):
        original_after_step(self, out, *rest)
        lora = {n: p.detach().clone() for n, p in self.student.named_parameters() if p.requires_grad}
        steps.append({"step": self.global_step, "skipped": self.update_skipped, "lora": lora})

    original_update = DatasetStats.update

    def update(self, issues):
        original_update(self, issues)
        self.counts.update({"sample.injected": rank + 1})

    original_log = trainer.accelerator.log
    trainer.accelerator.log = lambda values, step=None, **kw: (logged.append((step, dict(values))),
                                                               original_log(values, step=step, **kw))
    Trainer._micro_step, Trainer._after_step, DatasetStats.update = micro_step, after_step, update
    trainer.train()
    torch.save({"steps": steps, "skips": trainer.nonfinite.skipped, "logged": logged,
                "micro_batches": micro_batches[0]}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
