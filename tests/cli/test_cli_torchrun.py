"""``torchrun --nproc-per-node 2 -m mgg_fast train|adapt``: gloo on 127.0.0.1, each process works
on its part of every batch, only rank 0 reports and writes; the numbers are those of one process
on the whole batches. Bounded in time."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mgg_fast import MGG
from mgg_fast.cli import main
from mgg_fast.testing import free_port

TIMEOUT_S = 300
FAST = ["--device", "cpu", "--no-progress", "--batch-size", "4"]


def write_images(folder, n, rng, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def torchrun(*argv) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m mgg_fast ARGV`` on gloo, killed past ``TIMEOUT_S``."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "mgg_fast", *map(str, argv),
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired:  # run() kills the launcher; its agent ends the workers
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s")


def why(done: subprocess.CompletedProcess) -> str:
    """The workers' stderr for a failed assertion: its start (the first error, often a worker's
    traceback) and its end (the launcher's summary)."""
    err = done.stderr
    return err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"


def one_process(capsys, *argv) -> tuple[int, str, str]:
    """The same command in this process (one thread, as each torchrun worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_torchrun_train_on_two_processes_writes_once(tmp_path):
    images = tmp_path / "images"
    write_images(images, 8, np.random.default_rng(0), size=28)
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "mgg.pt"
    done = torchrun(
        "train", "--data", images, "--arch", "resnet", "--batch-size", "4", "--epochs", "1",
        "--output", ckpt, "--cache-dir", tmp_path / "cache", "--source-epochs", "1",
        "--source-images", "32", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, why(done)
    assert done.stdout.count(f"saved the MGG to {ckpt}") == 1, done.stdout  # rank 0 only
    assert done.stdout.count("meta-training an MGG on 8 images") == 1, done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["mgg.pt"]
    assert isinstance(MGG.load(ckpt), MGG)


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """An ImageNet-C tree of 2 streams x 11 images (batches 4, 4, 3: the last one splits 2 + 1),
    a 2-block ViT checkpoint (LayerNorm: each rank's part is normalised as in the whole batch)
    and an MGG."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for corruption in ("fog", "snow"):
        for cls, n in (("ant", 6), ("bee", 5)):
            write_images(root / "data" / corruption / "5" / cls, n, rng)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, num_classes=2, depth=2)
    torch.save(vit.state_dict(), root / "vit.pth")
    MGG().save(root / "mgg.pt")
    return root


def own_model_args(root, out):
    return [
        "adapt", "--model", "vit_tiny_patch16_224", "--model-args", "img_size=16,num_classes=2,depth=2",
        "--checkpoint", root / "vit.pth", "--data", root / "data", "--method", "noadapt,tent,adam,mgg",
        "--mgg", root / "mgg.pt", "--lr", "0.05", "--source-data", root / "data" / "fog" / "5",
        "--source-images", "8", "--workers", "0", "--out", out, *FAST,
    ]  # fmt: skip


def test_torchrun_adapt_own_model_matches_one_process_and_writes_once(own_model, tmp_path, capsys):
    dp_out, single_out = tmp_path / "dp", tmp_path / "single"
    done = torchrun(*own_model_args(own_model, dp_out))
    assert done.returncode == 0, why(done)
    code, stdout, err = one_process(capsys, *own_model_args(own_model, single_out))
    assert code == 0, err
    table = stdout[stdout.index("\nstream ") : stdout.index("\nResults: ")]
    assert done.stdout.count(table) == 1, (table, done.stdout)  # the same report, printed once
    assert done.stdout.count("Results: ") == 1 and done.stdout.count("adapting vit_tiny") == 1, done.stdout
    assert done.stdout.count("source statistics from 8 images") == 1
    files = sorted(str(p.relative_to(dp_out)) for p in dp_out.rglob("*"))
    assert files == sorted(str(p.relative_to(single_out)) for p in single_out.rglob("*"))
    assert not [f for f in files if f.endswith(".tmp")]
    dp = json.loads((dp_out / "results.json").read_text())["methods"]
    single = json.loads((single_out / "results.json").read_text())["methods"]
    assert dp.keys() == single.keys() == {"noadapt", "tent", "adam", "mgg"}
    for method, r in single.items():
        assert dp[method]["per_corruption"] == r["per_corruption"], method
        assert dp[method]["mean_confidence"] == pytest.approx(r["mean_confidence"], abs=1e-5), method
    assert single["tent"]["mean_confidence"] != single["noadapt"]["mean_confidence"]  # it adapted
    pair = json.loads((dp_out / "runs" / "tent" / "fog.json").read_text())
    assert pair["updates"] == 3 and pair["images"] == 11 and [n for _, n in pair["batch_counts"]] == [4, 4, 3]
    for method in single:  # the same predictions, file by file
        dp_rows = (dp_out / "predictions" / method / "snow.csv").read_text().splitlines()
        single_rows = (single_out / "predictions" / method / "snow.csv").read_text().splitlines()
        assert [r.split(",")[:3] for r in dp_rows] == [r.split(",")[:3] for r in single_rows]


def own_train_args(root, output, images):
    return [
        "train", "--model", "vit_tiny_patch16_224", "--model-args", "img_size=16,num_classes=2,depth=2",
        "--checkpoint", root / "vit.pth", "--data", root / "data", "--images", str(images), "--epochs", "2",
        "--loss", "entropy", "--workers", "0", "--output", output, *FAST,
    ]  # fmt: skip


def test_torchrun_train_own_model_matches_one_process_and_saves_once(own_model, tmp_path, capsys):
    """Each process meta-trains on half of every batch of 4; the MGG's gradients are averaged, so
    the saved MGG is one process's on the whole batches (float32 rounding apart)."""
    dp, single = tmp_path / "dp" / "mgg.pt", tmp_path / "single" / "mgg.pt"
    for path in (dp, single):
        path.parent.mkdir()
    done = torchrun(*own_train_args(own_model, dp, 8))
    assert done.returncode == 0, why(done)
    assert done.stdout.count(f"saved the MGG to {dp}") == 1, done.stdout  # rank 0 only
    assert sorted(p.name for p in dp.parent.iterdir()) == ["mgg.pt"]
    code, _, err = one_process(capsys, *own_train_args(own_model, single, 8))
    assert code == 0, err
    trained, reference = MGG.load(dp).state_dict(), MGG.load(single).state_dict()
    assert any(not torch.equal(v, MGG().state_dict()[k]) for k, v in reference.items())  # it trained
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_torchrun_train_own_model_uneven_batches_is_one_line(own_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = torchrun(*own_train_args(own_model, out / "mgg.pt", 7))  # batches of 4 and 3
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if " -m mgg_fast train: error:" in line]
    assert errors and "divide evenly" in errors[0], why(done)
    assert not list(out.iterdir())


def test_torchrun_adapt_own_model_bad_input_is_one_line(own_model, tmp_path):
    out = tmp_path / "out"
    argv = own_model_args(own_model, out)
    argv[argv.index("--checkpoint") + 1] = own_model / "mgg.pt"  # an MGG is not the ViT's weights
    done = torchrun(*argv)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if " -m mgg_fast adapt: error:" in line]
    assert errors and "does not fit vit_tiny_patch16_224" in errors[0], why(done)
    assert "mgg_fast/" not in done.stderr  # no worker traceback (the launcher prints its own)
    assert re.search(r"exitcode\s*: 2 ", done.stderr), why(done)  # the usage-error status
    assert not out.exists()


def bundled_folder_args(root, cache):
    return [
        "adapt", "--mgg", root / "mgg.pt", "--data", root / "digits", "--archs", "vit",
        "--lr", "0.01", "0.001", "0.01", "--cache-dir", cache, "--source-epochs", "1",
        "--source-images", "32", *FAST,
    ]  # fmt: skip


ACCURACY = re.compile(r"^ +(\S.*?) +lr \S+ +accuracy +([\d.]+)% +mean confidence ([\d.]+)", re.M)


def test_torchrun_adapt_bundled_models_on_a_folder_matches_one_process(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for digit in range(3):
        write_images(tmp_path / "digits" / str(digit), 3 + (digit < 2), rng, size=28)  # 11: 4, 4, 3
    MGG().save(tmp_path / "mgg.pt")
    done = torchrun(*bundled_folder_args(tmp_path, tmp_path / "cache"))
    assert done.returncode == 0, why(done)
    code, stdout, err = one_process(capsys, *bundled_folder_args(tmp_path, tmp_path / "cache"))
    assert code == 0, err
    assert done.stdout.count("vit on 11 images") == 1, done.stdout
    dp, single = ACCURACY.findall(done.stdout), ACCURACY.findall(stdout)
    assert [m for m, *_ in single] == ["NoAdapt", "Tent (SGD)", "Adam", "SAR", "EATA", "MGG"], stdout
    assert dp == single


def bundled_benchmark_args(root, out):
    return [
        "adapt", "--mgg", root / "mgg.pt", "--data", "bundled", "--archs", "vit", "--corruptions",
        "gaussian_noise", "--n-test", "11", "--cache-dir", root / "cache", "--source-epochs", "1",
        "--source-images", "32", "--out", out, *FAST, "--batch-size", "16",
    ]  # fmt: skip


@pytest.mark.slow  # the lr tuning runs on 4 x 128 validation images: minutes on 2 cores
def test_torchrun_adapt_bundled_benchmark_matches_one_process(tmp_path, capsys):
    MGG().save(tmp_path / "mgg.pt")
    done = torchrun(*bundled_benchmark_args(tmp_path, tmp_path / "dp"))
    assert done.returncode == 0, why(done)
    code, _, err = one_process(capsys, *bundled_benchmark_args(tmp_path, tmp_path / "single"))
    assert code == 0, err
    assert done.stdout.count("Results: ") == 1 and done.stdout.count("evaluated in") == 1, done.stdout
    names = ["accuracy_vs_updates.png", "results.json", "results.md"]
    assert sorted(p.name for p in (tmp_path / "dp").iterdir()) == names
    dp, single = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("dp", "single"))
    for method, r in single["archs"]["vit"]["summary"]["methods"].items():
        got = dp["archs"]["vit"]["summary"]["methods"][method]
        assert (got["lr"], got["per_corruption"]) == (r["lr"], r["per_corruption"]), method
