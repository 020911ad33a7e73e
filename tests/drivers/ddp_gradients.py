"""Run under ``accelerate launch --cpu --num_processes 2``: one v2_4 step through the real trainer.

Before the step, each rank computes its local LoRA gradient on its own first batch without DDP
synchronisation (same RNG state as the step will use). After the step each rank saves its LoRA
weights, the initial weights and its local gradient, so the test can check that the ranks agree and
that the update equals AdamW applied to the average of the local gradients.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective  # noqa: E402
from student_model_v2.training.trainer import Trainer, make_parser  # noqa: E402


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}


def main() -> None:
    out_dir = Path(sys.argv[1])
    args = make_parser(LCMObjective, "ddp test").parse_args([
        "--resolution", "64", "--max_train_steps", "1", "--output_dir", str(out_dir), "--lora_rank", "4",
        "--lora_alpha", "4", "--train_batch_size", "2", "--save_steps", "0", "--eval_batches", "0",
        "--max_grad_norm", "0", "--learning_rate", "1e-3", "--adam_weight_decay", "0.0",
    ])
    trainer = Trainer(args, LCMObjective)
    initial = lora_state(trainer)
    generator_state = trainer.generator.get_state()
    trainer.train_loader.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    with trainer.accelerator.no_sync(trainer.student):
        trainer._micro_step(batch, trainer.generator).loss.backward()
    local = {n: p.grad.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.generator.set_state(generator_state)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"initial": initial, "final": lora_state(trainer), "local_grad": local,
                "sample_ids": batch["sample_id"]}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
