"""``torchrun --nproc-per-node 2 -m mgg_fast train``: gloo on 127.0.0.1, each process meta-trains
on its half of every batch, only rank 0 reports and writes the checkpoint. Bounded in time."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mgg_fast import MGG
from mgg_fast.distributed import free_port

TIMEOUT_S = 300


def test_torchrun_train_on_two_processes_writes_once(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "mgg.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "mgg_fast", "train", "--data", str(images), "--arch", "resnet", "--batch-size", "4",
        "--epochs", "1", "--output", str(ckpt), "--cache-dir", str(tmp_path / "cache"),
        "--source-epochs", "1", "--source-images", "32", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired:  # run() kills the launcher; its agent ends the workers
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"saved the MGG to {ckpt}") == 1, done.stdout  # rank 0 only
    assert done.stdout.count("meta-training an MGG on 8 images") == 1, done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["mgg.pt"]
    assert isinstance(MGG.load(ckpt), MGG)
