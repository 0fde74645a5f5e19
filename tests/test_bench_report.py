"""What ``python -m pytest bench/ --benchmark-only`` prints (bench/conftest.py): one narrow table
per question with one unit and the ratio to torch Adam, and why cases were skipped."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
bench_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_conftest)
WIDEST = 110  # the repository's line length


def _case(name, median, label=None, **info):
    extra = {"label": label, **info} if label else info
    return {"name": name, "median": median, "iqr": median / 10, "rounds": 5, "extra_info": extra}


def test_a_group_is_one_table_in_one_unit_with_the_ratio_to_torch_adam():
    table = bench_conftest.group_table(
        "step-38k",
        [
            _case("test_step[reference-38k]", 0.0227, "MGG reference"),
            _case("test_step[adam_fused-38k]", 0.00033, "torch Adam(fused=True)"),
            _case("test_step[fused-38k]", 0.000012, "MGG fused", gpu_us=11.5),
        ],
    )
    title, header, _, *rows = table.splitlines()
    assert title.startswith("step-38k: one plain opt.step()")
    assert header.split() == [
        "case",
        "median",
        "us",
        "IQR",
        "us",
        "rounds",
        "GPU",
        "us",
        "x",
        "torch",
        "Adam",
    ]
    assert [row.split("  ")[0].strip() for row in rows] == [
        "MGG fused",
        "torch Adam(fused=True)",
        "MGG reference",
    ]
    assert rows[1].split()[-1] == "1.00" and rows[2].split()[-1] == "68.79"
    assert rows[2].split()[2] == "22,700.0"  # 22.7 ms, in the table's one unit
    assert rows[1].split()[-2] == "-"  # no device time measured
    assert max(len(line) for line in table.splitlines()) <= WIDEST


def test_a_group_without_torch_adam_is_compared_to_its_fastest():
    table = bench_conftest.group_table(
        "meta-window-cpu",
        [_case("test_meta_window[2]", 2.4, "K = 2"), _case("test_meta_window[1]", 1.2, "K = 1")],
    )
    assert "median s" in table and "x fastest" in table and table.splitlines()[-1].split()[-1] == "2.00"


def test_skipped_cases_say_why_in_one_line_per_reason():
    def skipped(case, reason):
        return SimpleNamespace(
            nodeid=f"bench/test_bench_fused.py::{case}", longrepr=("f.py", 1, f"Skipped: {reason}")
        )

    lines = bench_conftest.skip_lines(
        [skipped(f"test_step[fused-{n}]", "needs a CUDA GPU") for n in ("38k", "1M", "8M")]
        + [skipped("test_step[reference-1M]", "CPU runs only 38k")]
    )
    assert lines == [
        "3 skipped: needs a CUDA GPU (test_step[fused-38k], ...)",
        "1 skipped: CPU runs only 38k (test_step[reference-1M])",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's output: the fused cases skip there")
def test_the_benchmark_run_prints_readable_tables_and_skip_reasons():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_fused.py", "--benchmark-only",
         "-k", "test_step and 38k", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "step-38k: one plain opt.step()" in out and "x torch Adam" in out
    assert "torch Adam(fused=True)" in out and "MGG reference" in out
    assert "Min " not in out and "OPS" not in out  # pytest-benchmark's wide tables are gone
    (fused,) = [
        line for line in out.splitlines() if "skipped: the fused Triton step needs a CUDA GPU" in line
    ]
    assert "test_step[fused-38k]" in fused
    assert "2 passed, 2 skipped" in out  # the summary line
    table = out[out.index("step-38k:") : out.index("skipped:")]
    assert max(len(line) for line in table.splitlines()) <= WIDEST
