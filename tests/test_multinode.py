"""Multi-node training on accelerate, scaled down in size only: 2 "machines" x 1 process on localhost.

Each machine is its own ``accelerate launch`` with the shipped multi-node config and its own
``--machine_rank`` (as on a cluster); without GPUs ``ACCELERATE_USE_CPU=1`` makes the workers use gloo.
Also: the engines that cannot run the teacher on the unwrapped module (FSDP, ZeRO-3) are refused.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from student_model_v2.training.distributed import UnsupportedDistributedSetup, refuse_sharded_teacher
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "student_model_v2" / "accelerate_multinode.yaml"
DRIVER = REPO_ROOT / "tests" / "drivers" / "multinode_run.py"
STEPS = 3
TRAIN_FLAGS = ["--resolution", "32", "--lora_rank", "4", "--lora_alpha", "4", "--lora_dropout", "0.25",
               "--train_batch_size", "1", "--max_train_steps", str(STEPS), "--eval_batches", "0", "--save_steps", "0",
               "--use_mock_dataset", "--mock_size", str(2 * STEPS), "--train_ratio", "1.0", "--val_ratio", "0",
               "--test_ratio", "0", "--learning_rate", "1e-3", "--logging_steps", "1"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(machine_rank: int, port: int, out_dir, extra: list[str], script=DRIVER, script_args=()) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), *extra, str(script), *script_args]
    log = open(out_dir / f"machine{machine_rank}.log", "w")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _run_two_machines(out_dir, extra: list[str] = (), script=DRIVER, script_args=()) -> list[int]:
    port = _free_port()
    machines = [_launch(rank, port, out_dir, list(extra), script, script_args) for rank in (0, 1)]
    try:
        return [machine.wait(timeout=600) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()


def _logs(out_dir) -> str:
    return "\n".join((out_dir / f"machine{r}.log").read_text()[-3000:] for r in (0, 1))


def test_two_machines_train_identical_lora_on_disjoint_shards(tmp_path):
    codes = _run_two_machines(tmp_path, script_args=[str(tmp_path), *TRAIN_FLAGS])
    assert codes == [0, 0], _logs(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [STEPS, STEPS]
    seen = [{sample for batch in r["sample_ids"] for sample in batch} for r in ranks]
    assert all(len(r["sample_ids"]) == STEPS for r in ranks)
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 2 * STEPS, seen
    for name, value in ranks[0]["lora"].items():
        assert torch.equal(value, ranks[1]["lora"][name]), name
    assert any(bool(v.abs().sum() > 0) for n, v in ranks[0]["lora"].items() if "lora_B" in n), "training must move B"
    masks = [r["dropout_mask"] for r in ranks]
    assert masks[0].shape == masks[1].shape and 0 < int(masks[0].sum()) < masks[0].numel()
    assert not torch.equal(masks[0], masks[1]), "LoRA dropout masks must differ across ranks"
    assert (tmp_path / "run" / "checkpoint-final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("state, message", [
    (SimpleNamespace(distributed_type=DistributedType.FSDP), "FSDP is not supported: it shards the teacher's weights"),
    (SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3)),
     "DeepSpeed ZeRO stage 3 is not supported"),
    (SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=2)), None),
    (SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), None),
    (SimpleNamespace(distributed_type=DistributedType.NO), None),
])
def test_weight_sharding_engines_are_refused(state, message):
    # accelerate cannot build an FSDP plugin without an accelerator and DeepSpeed is not a dependency,
    # so their accelerate states are described rather than built
    if message is None:
        refuse_sharded_teacher(state)
    else:
        with pytest.raises(UnsupportedDistributedSetup, match=message):
            refuse_sharded_teacher(state)


def test_trainer_checks_the_engine_before_building_anything(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
    from student_model_v2.training import trainer as trainer_module

    seen = []

    def refuse(state):
        seen.append(state)
        raise UnsupportedDistributedSetup("refused for the test")

    monkeypatch.setattr(trainer_module, "refuse_sharded_teacher", refuse)
    with pytest.raises(UnsupportedDistributedSetup, match="refused for the test"):
        trainer_module.run(LCMObjective, [*TRAIN_FLAGS, "--output_dir", str(tmp_path / "run")], "t")
    assert len(seen) == 1 and isinstance(seen[0], AcceleratorState)
    assert not (tmp_path / "run").exists(), "nothing may be built or written before the check"
