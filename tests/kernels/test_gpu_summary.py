"""bench/summarize_fused.py turns a benchmark JSON into PASS/FAIL/MISSING rows against DESIGN.md."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "summarize_fused.py"
spec = importlib.util.spec_from_file_location("summarize_fused", SCRIPT)
summarize_fused = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_fused)

TARGETS = {  # row start -> (case, extra_info key of the measured number)
    "fused step GPU time, 38,400": ("test_step[fused-38k]", "gpu_us"),
    "CUDA-graph replay, GPU time": ("test_fused_step_cuda_graph[38k]", "gpu_us"),
    "CUDA-graph replay, wall clock": ("test_fused_step_cuda_graph[38k]", "wall_us"),
    "fused step GPU time, 8 M": ("test_step[fused-8M]", "gpu_us"),
    "bf16 memory_W (opt-in)": ("test_step[fused_bf16_memory-8M]", "gpu_us"),
}


def _bench(name: str, **info) -> dict:
    return {"name": name, "stats": {"median": 1e-4}, "extra_info": {"coords": 38_400, **info}}


def _summary(tmp_path: Path, *benchmarks: dict) -> str:
    machine = {"python_version": "3.12", "cpu": {"brand_raw": "Test CPU"}}
    data = {"datetime": "2026-12-01", "machine_info": machine, "benchmarks": list(benchmarks)}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return summarize_fused.summarize(path)


def _status(text: str, what: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {what}")]
    assert len(rows) == 1, f"expected one row for {what!r}: {rows}"
    return rows[0].rstrip(" |").rsplit("| ", 1)[-1]


def test_every_target_missing_without_its_case(tmp_path):
    text = _summary(tmp_path, _bench("test_copy_bandwidth[38k]", gpu_us=7.8))
    for what in (*TARGETS, "plain opt.step() wall clock", "copy time / fused", "(kept + transient"):
        assert _status(text, what) == "MISSING"


@pytest.mark.parametrize(
    ("what", "passing", "failing"),
    [
        ("fused step GPU time, 38,400", 15.0, 15.1),
        ("CUDA-graph replay, GPU time", 9.5, 11.3),
        ("CUDA-graph replay, wall clock", 30.0, 31.0),
        ("fused step GPU time, 8 M", 1700.0, 1800.0),
        ("bf16 memory_W (opt-in)", 1000.0, 1200.0),
    ],
)
def test_time_targets_pass_fail_and_nan_is_missing(tmp_path, what, passing, failing):
    case, key = TARGETS[what]
    assert _status(_summary(tmp_path, _bench(case, **{key: passing})), what) == "PASS"
    assert _status(_summary(tmp_path, _bench(case, **{key: failing})), what) == "FAIL"
    nan = _summary(tmp_path, _bench(case, **{key: float("nan")}))  # a timing the host caught up with
    assert _status(nan, what) == "MISSING"


def test_ratio_targets(tmp_path):
    adam = _bench("test_step[adam_fused-38k]", wall_us=260.0)
    faster = _summary(tmp_path, adam, _bench("test_step[fused-38k]", wall_us=250.0))
    assert _status(faster, "plain opt.step() wall clock") == "PASS"
    equal = _summary(tmp_path, adam, _bench("test_step[fused-38k]", wall_us=260.0))
    assert _status(equal, "plain opt.step() wall clock") == "FAIL"  # "below", not equal
    assert _status(_summary(tmp_path, adam), "plain opt.step() wall clock") == "MISSING"

    copy = _bench("test_copy_bandwidth[8M]", gpu_us=1600.0)
    fused = {"optimizer_bytes": 100, "transient_bytes": 4, "state_bytes": 100}
    text = _summary(tmp_path, copy, _bench("test_step[fused-8M]", gpu_us=1700.0, **fused))
    assert _status(text, "copy time / fused") == "PASS"  # 0.941
    assert _status(text, "(kept + transient") == "PASS"  # 1.04
    fused["transient_bytes"] = 6
    text = _summary(tmp_path, copy, _bench("test_step[fused-8M]", gpu_us=1760.0, **fused))
    assert _status(text, "copy time / fused") == "FAIL"  # 0.909
    assert _status(text, "(kept + transient") == "FAIL"  # 1.06


def test_case_table_and_sweeps(tmp_path):
    text = _summary(
        tmp_path,
        _bench(
            "test_step[fused-38k]",
            gpu_us=11.5,
            wall_us=120.0,
            host_sync=True,
            gb_per_s_at_604B=2017.1,
            device="NVIDIA H200",
            torch="2.14.1",
            triton="3.8.0",
        ),
        _bench("test_fused_config_sweep[38k-8]", kernel_gpu_us=7.3, sweep_gpu_us={"16x1": 8.5, "32x1": 7.3}),
    )
    assert "(2026-12-01)" in text  # machine, versions and date of the run
    assert "device: NVIDIA H200; cpu: Test CPU; torch 2.14.1; triton 3.8.0; python 3.12" in text
    row = next(line for line in text.splitlines() if line.startswith("| test_step[fused-38k]"))
    assert "| 11.5 | - | 120.0 | 2,017.1 |" in row and "'host_sync': True" in row
    assert "test_fused_config_sweep[38k-8]: 32x1 7.3 us, 16x1 8.5 us" in text
