"""Which accelerate engines the trainer can run on, checked before anything is built.

The teacher and target passes run on the *unwrapped* module (adapters disabled, no grad) while only the
student pass goes through the prepared one. Under data parallelism (DDP, one or many machines, or
DeepSpeed ZeRO-1/2, which shard optimizer state and gradients but not the weights) every rank holds
the full weights, so that works. FSDP and DeepSpeed ZeRO-3 shard the weights themselves: the
unwrapped module then holds flat shards or empty placeholders, and a teacher pass on it cannot run.
Those setups are refused here with a message instead of failing deep inside a forward pass.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import DistributedType


class UnsupportedDistributedSetup(RuntimeError):
    """An accelerate configuration the trainer cannot run; the message says what to use instead."""


def refuse_sharded_teacher(state: Any) -> None:
    """Raise :class:`UnsupportedDistributedSetup` for FSDP and DeepSpeed ZeRO stage 3.

    ``state`` is the ``AcceleratorState`` (``accelerator.state``): its ``distributed_type`` and, under
    DeepSpeed, ``deepspeed_plugin.zero_stage``.
    """
    advice = ("use plain data parallelism (`accelerate launch --multi_gpu`, any number of machines: "
              "docs/multinode.md); the LoRA student and its optimizer state are small enough to replicate")
    if state.distributed_type == DistributedType.FSDP:
        raise UnsupportedDistributedSetup(
            "FSDP is not supported: it shards the teacher's weights, and the teacher and target passes run on the "
            f"unwrapped module, which then holds only flat shards; {advice}")
    if state.distributed_type == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        if stage == 3:
            raise UnsupportedDistributedSetup(
                "DeepSpeed ZeRO stage 3 is not supported: it partitions the teacher's weights, and the teacher and "
                f"target passes run on the unwrapped module, which then holds empty placeholders; {advice}")
