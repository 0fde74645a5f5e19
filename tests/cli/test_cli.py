"""The command line: help, one-line errors with a non-zero exit, tiny train/adapt/bench runs."""

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("imagecorruptions")

from mgg_fast import MGG
from mgg_fast.cli import main


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """Whatever a test does, the user's cache (~/.cache/mgg_fast) stays untouched."""
    monkeypatch.setenv("MGG_FAST_CACHE", str(tmp_path / "default-cache"))


SMALL_SOURCE = ["--source-epochs", "1", "--source-images", "32", "--device", "cpu", "--no-progress"]


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``mgg-fast argv``."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def write_pngs(folder, labels):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        target = folder if label is None else folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(target / f"img{i}.png")


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "mgg_fast", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for command in ("demo", "train", "adapt", "stats", "realnet", "bench"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["demo", "train", "adapt", "stats", "realnet", "bench"])
def test_subcommand_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "--device" in out and "--seed" in out


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["demo", "--n-test", "-3"], ["--n-test", "-3"]),
        (["demo", "--batch-size", "0"], ["--batch-size"]),
        (["demo", "--corruptions", "fogg"], ["unknown corruption 'fogg'"]),
        (["demo", "--archs", "vgg"], ["unknown architecture 'vgg'"]),
        (["demo", "--device", "tpu"], ["device"]),
        (["demo", "--mgg-memory", "fp8"], ["--mgg-memory", "invalid choice"]),
        (["train", "--data", "/nonexistent/folder"], ["does not exist"]),
        (["train", "--epochs", "-1"], ["--epochs"]),
        (["adapt", "--mgg", "/nonexistent/mgg.pt"], ["no MGG checkpoint"]),
        (["adapt"], ["--mgg"]),
        (["bench", "--sizes", "100,-5"], ["--sizes"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, argv, fragments):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    code, _, err = run_cli(capsys, "bench", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")


def test_empty_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(code, err, "no images")


def test_train_then_adapt_on_a_folder(capsys, tmp_path):
    cache = tmp_path / "cache"
    flat = tmp_path / "flat"
    write_pngs(flat, [None] * 8)
    ckpt = tmp_path / "mgg.pt"
    code, out, err = run_cli(
        capsys, "train", "--data", str(flat), "--arch", "resnet", "--batch-size", "4", "--epochs", "1",
        "--output", str(ckpt), "--cache-dir", str(cache), *SMALL_SOURCE,
    )  # fmt: skip
    assert code == 0, err
    assert f"saved the MGG to {ckpt}" in out
    assert re.search(r"meta-loss \(mean over the epoch's batches\): \d+\.\d{4}, one epoch", out), out
    assert isinstance(MGG.load(ckpt), MGG)
    (source,) = (cache / "models").glob("resnet-*.pt")  # the --source-* flags reached the recipe
    assert torch.load(source, weights_only=True)["config"]["n_train"] == 32

    labeled = tmp_path / "labeled"
    write_pngs(labeled, [3, 3, 7, 7, 1, 1])
    code, out, err = run_cli(
        capsys, "adapt", "--mgg", str(ckpt), "--data", str(labeled), "--archs", "resnet", "--batch-size", "3",
        "--mgg-memory", "bfloat16", "--cache-dir", str(cache), *SMALL_SOURCE,
    )  # fmt: skip
    assert code == 0, err
    assert "6 images" in out and "labeled" in out
    for name in ("NoAdapt", "Tent (SGD)", "Adam", "MGG"):
        assert any(line.strip().startswith(name) and "accuracy" in line for line in out.splitlines()), out


def test_bench_cpu(capsys):
    code, out, err = run_cli(
        capsys, "bench", "--sizes", "1536", "--steps", "2", "--device", "cpu", "--no-progress"
    )
    assert code == 0, err
    assert "MGG reference" in out and "torch Adam(foreach)" in out and "1,536" in out
    (fused,) = [line for line in out.splitlines() if line.startswith("MGG fused:")]
    assert "fused CPU step" in fused and "CUDA GPU" in fused  # which fused step, and why, in one line
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1,536  MGG fused")]
    assert len(rows) == 2 and all(float(r[-2]) > 0 for r in rows)  # fp32 and bf16 memory, timed


def test_progress_bars_only_on_a_terminal(capsys, monkeypatch):
    """Without --no-progress: no bar when stderr is a log file or a pipe (here: captured), a bar
    when it is a terminal."""
    import mgg_fast.cli.common

    argv = ("bench", "--sizes", "768,1536", "--steps", "1", "--device", "cpu")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "sizes" not in err, err
    monkeypatch.setattr(mgg_fast.cli.common, "stderr_is_terminal", lambda: True)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "sizes" in err, err


def test_train_with_one_batch_per_epoch_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    """8 images at --batch-size 8: one batch per epoch gives the MGG no meta-gradient (it would be
    saved untrained): a one-line error naming the batch size that works, before the source model."""
    import mgg_fast.cli.bundled

    monkeypatch.setattr(mgg_fast.cli.bundled, "source_model", _must_not_run)
    write_pngs(tmp_path / "imgs", [None] * 8)
    code, _, err = run_cli(
        capsys, "train", "--data", str(tmp_path / "imgs"), "--batch-size", "8", "--output",
        str(tmp_path / "mgg.pt"), *SMALL_SOURCE,
    )  # fmt: skip
    assert_one_line_error(code, err, "8 image(s) at --batch-size 8 make 1 meta-training batch", "4 or less")
    assert not (tmp_path / "mgg.pt").exists()


# ---- issue 14, item 12: outputs checked up front, huge sizes, raw pickles --------------------------


def _must_not_run(*args, **kwargs):
    raise AssertionError("the run started although its output place is unusable")


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_demo_out_is_checked_before_the_run(capsys, tmp_path, monkeypatch, kind):
    import mgg_fast.evaluation.bundled.benchmark

    monkeypatch.setattr(mgg_fast.evaluation.bundled.benchmark, "run_benchmark", _must_not_run)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if kind == "file" else tmp_path / "afile" / "reports"
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "--out", str(tmp_path / "afile"), "is a file, not a folder")
    assert "File exists" not in err


@pytest.mark.parametrize("kind", ["folder", "under-a-file"])
def test_train_output_is_checked_before_the_run(capsys, tmp_path, monkeypatch, kind):
    import mgg_fast.cli.bundled
    import mgg_fast.tta.meta_training

    monkeypatch.setattr(mgg_fast.cli.bundled, "source_model", _must_not_run)
    monkeypatch.setattr(mgg_fast.tta.meta_training, "train_mgg", _must_not_run)
    write_pngs(tmp_path / "imgs", [None] * 4)
    (tmp_path / "afile").write_text("x")
    output, fragment = {
        "folder": (tmp_path / "imgs", "is a folder, not a file"),
        "under-a-file": (tmp_path / "afile" / "mgg.pt", "is a file, not a folder"),
    }[kind]
    code, _, err = run_cli(
        capsys, "train", "--data", str(tmp_path / "imgs"), "--output", str(output), *SMALL_SOURCE
    )
    assert_one_line_error(code, err, "--output", fragment)


def test_bench_size_beyond_memory_is_a_one_line_error(capsys, monkeypatch):
    import mgg_fast.cli.bench

    monkeypatch.setattr(mgg_fast.cli.bench, "available_memory", lambda device: 8 << 30)
    code, _, err = run_cli(capsys, "bench", "--sizes", "200000000", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "--sizes", "200,000,000", "GiB")


def test_raw_pickle_as_mgg_gives_the_error_alone(capsys, tmp_path):
    import pickle

    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "adapt", "--mgg", str(tmp_path / "raw.pkl"), "--device", "cpu")
    assert_one_line_error(code, err, "raw.pkl", "not a readable MGG checkpoint")
    assert [str(w.message) for w in caught] == []


def test_demo_lrs_replace_the_named_grids_alone(capsys, tmp_path, monkeypatch):
    """--lrs METHOD=... replaces that method's grid (mgg: also its memoryless row, one meta-trained
    MGG per lr) and no other; a non-positive lr or an unknown method is a one-line error before
    the run."""
    import mgg_fast.cli.demo
    import mgg_fast.evaluation.bundled.benchmark
    from mgg_fast.evaluation.bundled.config import DEFAULT_GRID

    seen = []

    def fake_run(cfg, **kwargs):
        seen.append(cfg)
        return {}

    monkeypatch.setattr(mgg_fast.evaluation.bundled.benchmark, "run_benchmark", fake_run)
    monkeypatch.setattr(mgg_fast.cli.demo, "report", lambda results, out: None)
    args = ("demo", "--out", str(tmp_path / "r"), "--device", "cpu", "--no-progress")
    code, _, _ = run_cli(capsys, *args, "--lrs", "mgg=2e-4,1e-3", "--lrs", "tent=0.01")
    assert code == 0
    (cfg,) = seen
    assert cfg.grid("mgg") == cfg.grid("mgg-memoryless") == (2e-4, 1e-3) and cfg.grid("tent") == (0.01,)
    assert cfg.grid("adam") == cfg.grid("signum") == DEFAULT_GRID["adam"]
    monkeypatch.setattr(mgg_fast.evaluation.bundled.benchmark, "run_benchmark", _must_not_run)
    code, _, err = run_cli(capsys, *args, "--lrs", "mgg=1e-3,0")
    assert_one_line_error(code, err, "--lrs", "expected a positive number, got 0")
    code, _, err = run_cli(capsys, *args, "--lrs", "noadapt=1e-3")
    assert_one_line_error(code, err, "--lrs", "METHOD one of tent,", "'noadapt=1e-3'")
