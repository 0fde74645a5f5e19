"""Summarise ``pytest bench/test_bench_fused.py --benchmark-json=X`` against the DESIGN.md targets.

Usage: ``python bench/summarize_fused.py bench.json [more.json ...] > summary.md`` (the cases of
several runs of one session, e.g. the time-boxed single-launch run, are merged). Prints a table of
every case (per-step numbers from ``extra_info``) and one line per target with PASS/FAIL/MISSING.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    "kernel_gpu_us",
    "kernel_gpu_us_no_pdl",
    "update_gpu_us",
    "prologue_gpu_us",
    "gpu_us",
    "gpu_us_no_pdl",
    "update_only_gpu_us",
    "capturable_step_gpu_us",
    "wall_us",
    "capturable_step_wall_us",
    "relaunch_wall_us",
    "relaunch_public_wall_us",
    "graph_gpu_us",
    "graph_wall_us",
)
HOST_FLOOR = (
    "empty_optimizer_step_wall_us",
    "read_grads_wall_us",
    "address_check_wall_us",
    "repeat_step_python_wall_us",
)


def _cases(data: dict) -> dict[str, dict]:
    return {
        b["name"]: {**b["extra_info"], "median_us": b["stats"]["median"] * 1e6} for b in data["benchmarks"]
    }


def _fmt(value) -> str:
    return f"{value:,.1f}" if isinstance(value, (int, float)) else "-"


def _target(
    what: str, value: float | None, goal: str, limit: float
) -> tuple[str, float | None, str, bool | None]:
    """One target row: ``goal`` is ``"<= limit"`` or ``">= limit"``; ``None`` when not measured."""
    if value is None:
        return what, None, goal, None
    return what, value, goal, value <= limit if goal.startswith("<=") else value >= limit


def _targets(cases: dict[str, dict]) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, target text, met) for each DESIGN.md target that this run can check."""

    def get(name: str, key: str) -> float | None:
        return cases.get(name, {}).get(key)

    fused_38k = "test_step[fused-38k]"
    kernel_38k = get(fused_38k, "kernel_gpu_us")
    kernel_8m = get("test_step[fused-8M]", "kernel_gpu_us")
    copy_8m = get("test_copy_bandwidth[8M]", "gpu_us")
    opt_bytes, transient, state = (
        get("test_step[fused-8M]", k) for k in ("optimizer_bytes", "transient_bytes", "state_bytes")
    )
    adam_wall = get("test_step[adam_fused-38k]", "wall_us")  # DESIGN's 0.20 ms is this wall clock
    single_38k = "test_single_launch_step[38k]"
    graph_wall = get("test_fused_step_cuda_graph[38k]", "wall_us")
    return [
        _target("fused step GPU time, 38,400 coords (us)", kernel_38k, "<= 15", 15),
        _target(
            "CUDA-graph replay per step, 38,400 coords (us)",
            get("test_fused_step_cuda_graph[38k]", "gpu_us"),
            "<= 10",
            10,
        ),
        _target(
            "opt.step() wall clock, 38,400 coords (us)", get("test_step[fused-38k]", "wall_us"), "<= 30", 30
        ),
        _target(
            "opt.step() wall clock (capturable), 38,400 coords (us)",
            get("test_step[fused-38k]", "capturable_step_wall_us"),
            "<= 30",
            30,
        ),
        _target(
            "single launch (opt-in): CUDA-graph replay, 38,400 coords (us)",
            get(single_38k, "graph_gpu_us"),
            "<= 10",
            10,
        ),
        _target(
            "single launch (opt-in): opt.step() wall clock (us)", get(single_38k, "wall_us"), "<= 30", 30
        ),
        _target("fused step GPU time, 8 M coords (us)", kernel_8m, "<= 1750", 1750),
        _target(
            "bf16 memory_W (opt-in): fused step GPU time, 8 M coords (us)",
            get("test_fused_step_bf16_memory[8M]", "kernel_gpu_us"),
            "<= 1100",
            1100,
        ),
        _target(
            "fraction of copy bandwidth at 8 M",
            copy_8m / kernel_8m if copy_8m and kernel_8m else None,
            ">= 0.92",
            0.92,
        ),
        _target(
            "(kept + transient memory) / state size at 8 M",
            (opt_bytes + transient) / state if None not in (opt_bytes, transient, state) else None,
            "<= 1.05",
            1.05,
        ),
        _target(
            "torch Adam(fused) wall / MGG step wall in a CUDA graph, 38,400 coords",
            adam_wall / graph_wall if adam_wall and graph_wall else None,
            ">= 10",
            10,
        ),
    ]


def summarize(*paths: str | Path) -> str:
    runs = [json.loads(Path(path).read_text()) for path in paths]
    data = runs[0]
    cases = {name: case for run in runs for name, case in _cases(run).items()}
    machine = data.get("machine_info", {})
    device = next((c.get("device") for c in cases.values() if c.get("device")), "?")
    lines = [
        f"# Fused MGG step benchmark ({data.get('datetime', '?')})",
        "",
        f"device: {device}; torch {next((c.get('torch') for c in cases.values()), '?')}; "
        f"python {machine.get('python_version', '?')}",
        "",
        "| case | coords | median us (step+sync) | " + " | ".join(COLUMNS) + " | GB/s at 604 B | extra |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for name, c in cases.items():
        kept = ("optimizer_bytes", "transient_bytes", "state_bytes", "best", "config")
        extra = {
            k: c[k] for k in c if k in kept or (k.startswith("gb_per_s_at_") and k != "gb_per_s_at_604B")
        }
        lines.append(
            f"| {name} | {c.get('coords', '-'):,} | {_fmt(c['median_us'])} | "
            + " | ".join(_fmt(c.get(k)) for k in COLUMNS)
            + f" | {_fmt(c.get('gb_per_s_at_604B'))} | {extra or ''} |"
        )
    lines += ["", "## Targets (DESIGN.md)", "", "| target | measured | goal | status |", "|---|---|---|---|"]
    for what, value, goal, met in _targets(cases):
        status = "MISSING" if met is None else ("PASS" if met else "FAIL")
        shown = f"{value:,.3f}" if value is not None else "-"
        lines.append(f"| {what} | {shown} | {goal} | {status} |")
    floor = cases.get("test_host_floor", {})
    if any(k in floor for k in HOST_FLOOR):
        lines += ["", "Host floor (wall us): " + ", ".join(f"{k} {_fmt(floor.get(k))}" for k in HOST_FLOOR)]
    sweeps = {n: c["sweep_gpu_us"] for n, c in cases.items() if "sweep_gpu_us" in c}
    for name, results in sweeps.items():
        ranked = sorted(results.items(), key=lambda kv: kv[1])
        lines += ["", f"{name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in ranked)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(summarize(*sys.argv[1:]))
