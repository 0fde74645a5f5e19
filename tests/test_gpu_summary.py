"""bench/summarize_fused.py turns a benchmark JSON into PASS/FAIL/MISSING rows against DESIGN.md."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "summarize_fused.py"
spec = importlib.util.spec_from_file_location("summarize_fused", SCRIPT)
summarize_fused = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_fused)


def _bench(name: str, median_s: float, **info: float) -> dict:
    return {"name": name, "stats": {"median": median_s}, "extra_info": info}


def _status(text: str, what: str) -> str:
    row = next(line for line in text.splitlines() if line.startswith(f"| {what}"))
    return row.rstrip(" |").rsplit("| ", 1)[-1]


def test_targets_pass_fail_and_missing(tmp_path):
    data = {
        "datetime": "2026-11-27",
        "machine_info": {"python_version": "3.12"},
        "benchmarks": [
            _bench(
                "test_step[fused-38k]",
                1e-4,
                coords=38400,
                kernel_gpu_us=12.0,
                wall_us=25.0,
                capturable_step_wall_us=40.0,
            ),
            _bench("test_host_floor", 1e-5, coords=38400, empty_optimizer_step_wall_us=9.5),
            _bench(
                "test_step[fused-8M]",
                2e-3,
                coords=8_000_000,
                kernel_gpu_us=1800.0,
                optimizer_bytes=100,
                transient_bytes=4,
                state_bytes=100,
            ),
            _bench("test_copy_bandwidth[8M]", 2e-3, coords=8_000_000, gpu_us=1620.0),
            _bench("test_fused_step_bf16_memory[8M]", 1e-3, coords=8_000_000, kernel_gpu_us=1000.0),
            _bench(
                "test_fused_step_heads[heads-2x8-38k]",
                2e-5,
                coords=38400,
                kernel_gpu_us=20.0,
                config=[32, 4],
                gb_per_s_at_1180B=2265.6,
            ),
            _bench("test_step[adam_fused-38k]", 2e-4, coords=38400, wall_us=200.0),
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    single = {"benchmarks": [_bench("test_single_launch_step[38k]", 1e-5, coords=38400, graph_gpu_us=9.5)]}
    (tmp_path / "single.json").write_text(json.dumps(single))
    text = summarize_fused.summarize(path, tmp_path / "single.json")  # runs merged
    assert _status(text, "fused step GPU time, 38,400") == "PASS"  # 12 <= 15
    assert _status(text, "opt.step() wall clock,") == "PASS"  # 25 <= 30
    assert _status(text, "opt.step() wall clock (capturable)") == "FAIL"  # 40 > 30
    assert "empty_optimizer_step_wall_us 9.5" in text
    assert _status(text, "fused step GPU time, 8 M") == "FAIL"  # 1800 > 1750
    assert _status(text, "bf16 memory_W (opt-in)") == "PASS"  # 1000 <= 1100
    heads = next(line for line in text.splitlines() if line.startswith("| test_fused_step_heads"))
    assert "'config': [32, 4]" in heads and "'gb_per_s_at_1180B': 2265.6" in heads
    assert _status(text, "fraction of copy bandwidth") == "FAIL"  # 0.9 < 0.92
    assert _status(text, "(kept + transient memory)") == "PASS"  # 1.04 <= 1.05
    assert _status(text, "CUDA-graph replay") == "MISSING"
    assert _status(text, "single launch (opt-in): CUDA-graph replay") == "PASS"  # 9.5 <= 10
    assert _status(text, "single launch (opt-in): opt.step() wall") == "MISSING"
    assert _status(text, "torch Adam(fused) wall") == "MISSING"  # needs the graph case too
