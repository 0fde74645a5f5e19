"""Summarise ``pytest bench/test_bench_fused.py --benchmark-json=X`` against the DESIGN.md targets.

Usage: ``python bench/summarize_fused.py bench.json > summary.md``. Prints the run's machine,
versions and date, a table of every case (per-step numbers from ``extra_info``), one line per
target with PASS, FAIL or MISSING (a case or number the run did not produce, or a NaN: a
queued-ahead timing the host caught up with), and the BLOCK x num_warps sweeps ranked.
"""

from __future__ import annotations

import json
import math
import operator
import sys
from pathlib import Path

COLUMNS = ("gpu_us", "kernel_gpu_us", "wall_us")
EXTRA = ("host_sync", "optimizer_bytes", "transient_bytes", "state_bytes", "config", "launch_config", "best")
OWN_GB = "gb_per_s_at_604B"  # its own column; other traffic figures go to "extra"
COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}
Target = tuple[str, float | None, str, bool | None]  # what, measured, goal, met (None: missing)


def _cases(data: dict) -> dict[str, dict]:
    return {
        b["name"]: {**b["extra_info"], "median_us": b["stats"]["median"] * 1e6} for b in data["benchmarks"]
    }


def _fmt(value) -> str:
    return f"{value:,.1f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _target(what: str, value: float | None, goal: str) -> Target:
    """One target row; ``goal`` is ``"<= x"``, ``">= x"`` or ``"< x"``."""
    if value is None or math.isnan(value):
        return what, None, goal, None
    sign, limit = goal.split()
    return what, value, goal, COMPARE[sign](value, float(limit))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(cases: dict[str, dict]) -> list[Target]:
    """(what, measured, goal, met) for each DESIGN.md target that this benchmark can check."""

    def get(name: str, key: str) -> float | None:
        return cases.get(name, {}).get(key)

    fused_8m = get("test_step[fused-8M]", "gpu_us")
    graph = "test_fused_step_cuda_graph[38k]"
    kept, transient, state = (
        get("test_step[fused-8M]", k) for k in ("optimizer_bytes", "transient_bytes", "state_bytes")
    )
    return [
        _target("fused step GPU time, 38,400 coords (us)", get("test_step[fused-38k]", "gpu_us"), "<= 15"),
        _target("CUDA-graph replay, GPU time per step, 38,400 coords (us)", get(graph, "gpu_us"), "<= 10"),
        _target("CUDA-graph replay, wall clock per step, 38,400 coords (us)", get(graph, "wall_us"), "<= 30"),
        _target(
            "plain opt.step() wall clock / torch Adam(fused=True) wall clock, 38,400 coords",
            _ratio(get("test_step[fused-38k]", "wall_us"), get("test_step[adam_fused-38k]", "wall_us")),
            "< 1",
        ),
        _target("fused step GPU time, 8 M coords (us)", fused_8m, "<= 1750"),
        _target(
            "copy time / fused step GPU time at 8 M (fraction of copy bandwidth)",
            _ratio(get("test_copy_bandwidth[8M]", "gpu_us"), fused_8m),
            ">= 0.92",
        ),
        _target(
            "(kept + transient memory) / state size at 8 M",
            _ratio(kept + transient, state) if None not in (kept, transient) else None,
            "<= 1.05",
        ),
        _target(
            "bf16 memory_W (opt-in): fused step GPU time, 8 M coords (us)",
            get("test_step[fused_bf16_memory-8M]", "gpu_us"),
            "<= 1100",
        ),
    ]


def summarize(path: str | Path) -> str:
    data = json.loads(Path(path).read_text())
    cases = _cases(data)
    machine = data.get("machine_info", {})
    first = next(iter(cases.values()), {})
    lines = [
        f"# Fused MGG step benchmark ({data.get('datetime', '?')})",
        "",
        f"device: {first.get('device', '?')}; cpu: {machine.get('cpu', {}).get('brand_raw', '?')}; "
        f"torch {first.get('torch', '?')}; triton {first.get('triton', '?')}; "
        f"python {machine.get('python_version', '?')}",
        "",
        "| case | coords | median us (step+sync) | " + " | ".join(COLUMNS) + " | GB/s at 604 B | extra |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for name, c in cases.items():
        extra = {k: c[k] for k in c if k in EXTRA or (k.startswith("gb_per_s_at_") and k != OWN_GB)}
        lines.append(
            f"| {name} | {c.get('coords', '-'):,} | {_fmt(c['median_us'])} | "
            + " | ".join(_fmt(c.get(k)) for k in COLUMNS)
            + f" | {_fmt(c.get(OWN_GB))} | {extra or ''} |"
        )
    lines += ["", "## Targets (DESIGN.md)", "", "| target | measured | goal | status |", "|---|---|---|---|"]
    for what, value, goal, met in targets(cases):
        status = "MISSING" if met is None else ("PASS" if met else "FAIL")
        shown = f"{value:,.3f}" if value is not None else "-"
        lines.append(f"| {what} | {shown} | {goal} | {status} |")
    for name, c in cases.items():
        if "sweep_gpu_us" in c:
            ranked = sorted(c["sweep_gpu_us"].items(), key=lambda kv: kv[1])
            lines += ["", f"{name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in ranked)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} bench_fused.json")
    sys.stdout.write(summarize(sys.argv[1]))
