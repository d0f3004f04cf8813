"""torchrun scale-out: 2 processes (gloo on loopback) take the same steps as 1, and checkpoints cross modes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from fewshot.checkpoint import load_checkpoint
from fewshot.cli import main

ARGS = ["--set", "val_every=10", "--set", "n_val_tasks=10", "--set", "meta_batch=6", "--no-progress"]


def torchrun_command(*argv) -> list[str]:
    """``torchrun --standalone --nproc_per_node=2 -m fewshot ARGV``: standalone binds its rendezvous
    store to a port the system picks (localhost:0), so no other job's port can collide with it and
    no port is picked first and bound later."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fewshot", *argv]


def torchrun(*argv):
    proc = subprocess.run(torchrun_command(*argv), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["method"]


def assert_close(a, b):
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_two_processes_equal_one_and_checkpoints_resume_across_modes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "sine-maml", "--out", str(one), "--iterations", "20", *ARGS]) == 0
    torchrun("train", "sine-maml", "--out", str(two), "--iterations", "20", *ARGS)
    assert_close(weights(one), weights(two))  # the same 20 meta-gradient steps
    # a 2-process checkpoint resumes in 1 process, and the other way round
    assert main(["train", "sine-maml", "--out", str(two), "--iterations", "30", "--resume", *ARGS]) == 0
    torchrun("train", "sine-maml", "--out", str(one), "--iterations", "30", "--resume", *ARGS)
    assert_close(weights(one), weights(two))
    assert load_checkpoint(one / "checkpoint.pt")["iteration"] == 30


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (Linux /proc)."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in map(int, children):
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def test_ctrl_c_reaching_one_process_stops_every_process_at_the_same_iteration_with_a_checkpoint(tmp_path):
    """Ctrl-C seen by rank 1 alone (rank 0 not signalled): both stop after the same iteration, rank 0
    writes that iteration's checkpoint first, and the run resumes from it."""
    run = tmp_path / "run"
    cmd = torchrun_command("train", "sine-maml", "--out", str(run), "--iterations", "1000000", *ARGS)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():  # training runs: the first checkpoint is written at 10
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped = re.findall(r"interrupted at iteration (\d+)", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]  # both ranks, the same iteration
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == int(stopped[0])
    torchrun("train", "sine-maml", "--out", str(run), "--iterations", str(int(stopped[0]) + 5), "--resume", *ARGS)
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == int(stopped[0]) + 5



@pytest.mark.parametrize(
    "name, fields",
    [
        # Meta-LSTM clips its meta-gradient's norm: the sum of the processes' shares is clipped, not each share
        ("omniglot-5w1s-metalstm", dict(grad_clip=0.01, inner_steps=2)),
        # MAML on the paper's conv learner with batch norm (looped path), second order, two inner steps
        ("omniglot-5w1s-maml", dict(inner_steps=2)),
    ],
)
def test_shares_summed_over_processes_give_the_meta_batchs_meta_gradient(monkeypatch, name, fields):
    """Under torchrun each process takes a share of the meta-batch; the all-reduced sum of the shares
    is the one-process meta-gradient (the all-reduce simulated in one process: rank 1's tensor added
    to rank 0's)."""
    import copy
    import dataclasses

    from fewshot import experiment
    from fewshot import train as training
    from fewshot.config import preset
    from fewshot.tasks.base import TaskBatch

    config = dataclasses.replace(preset(name), meta_batch=4, channels=4, **fields)
    method = experiment.build_method(config)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5)
    batch = TaskBatch(torch.rand(4, 5, 1, 28, 28, generator=g), labels.repeat(4, 1),
                      torch.rand(4, 75, 1, 28, 28, generator=g), labels.repeat_interleave(15).repeat(4, 1))  # fmt: skip
    whole = copy.deepcopy(method)
    whole.training_loss(batch).backward()
    shares = [copy.deepcopy(method) for _ in range(2)]
    losses = [training._share_of_meta_batch(m, batch, rank, 2) for rank, m in enumerate(shares)]
    for loss in losses:
        loss.backward()
    sent = {}
    monkeypatch.setattr(training.dist, "all_reduce", lambda flat: sent.setdefault("rank 1", flat.clone()))
    training._sum_over_processes(shares[1], losses[1], False, 2)
    monkeypatch.setattr(training.dist, "all_reduce", lambda flat: flat.add_(sent["rank 1"]))
    loss, stop = training._sum_over_processes(shares[0], losses[0], False, 2)
    assert not stop and torch.allclose(loss, whole.training_loss(batch).detach())
    for (name, p), q in zip(whole.named_parameters(), shares[0].parameters()):
        assert (p.grad is None) == (q.grad is None), name  # no gradient in one process: none after the all-reduce
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-9), name
