"""torchrun scale-out: 2 processes (gloo on loopback) take the same steps as 1, and checkpoints cross modes."""

import socket
import subprocess
import sys

import torch

from fewshot.checkpoint import load_checkpoint
from fewshot.cli import main

ARGS = ["--set", "val_every=10", "--set", "n_val_tasks=10", "--set", "meta_batch=6", "--no-progress"]


def free_port() -> int:
    """A port nobody listens on now (a fixed one collides with any other job on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "fewshot", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
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
