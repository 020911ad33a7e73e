"""Run under ``accelerate launch`` on each "machine": a few tiny v2_4 steps through the real trainer.

Saves, per global rank, the sample ids of every training micro-batch, the final LoRA weights and the
first LoRA-dropout mask, so the test can check disjoint shards, identical weights and per-rank dropout.
Arguments: the output folder, then training flags.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective  # noqa: E402
from student_model_v2.training import trainer as trainer_module  # noqa: E402


def main() -> None:
    out_dir, flags = Path(sys.argv[1]), sys.argv[2:]
    sample_ids: list[list[str]] = []
    masks: list[torch.Tensor] = []
    original = trainer_module.Trainer._micro_step

    def recording(self, batch, generator):
        if self.student.training:
            sample_ids.append(list(batch["sample_id"]))
        return original(self, batch, generator)

    trainer_module.Trainer._micro_step = recording

    def record_mask(_module, _inputs, output):
        if not masks:
            masks.append((output == 0).flatten().cpu())

    original_init = trainer_module.Trainer.__init__

    def init_and_hook(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        dropout = next(m for n, m in self.student.named_modules() if n.endswith("lora_dropout.default"))
        dropout.register_forward_hook(record_mask)

    trainer_module.Trainer.__init__ = init_and_hook
    trainer = trainer_module.run(LCMObjective, ["--output_dir", str(out_dir / "run"), *flags], "multinode test")
    rank = trainer.accelerator.process_index
    lora = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    torch.save({"sample_ids": sample_ids, "lora": lora, "dropout_mask": masks[0],
                "world_size": trainer.accelerator.num_processes, "global_step": trainer.global_step},
               out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
