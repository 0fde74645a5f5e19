"""How ``python -m pytest bench/ --benchmark-only`` reports.

pytest-benchmark's own tables (ten columns, up to 225 characters wide, the unit changing from
table to table) are replaced by one compact table per benchmark group, each group one question:
``step-38k`` is one optimizer step over 38,400 coordinates, the MGG's fused and reference steps
beside torch Adam on the same tensors. A table has the case, its median and IQR in one unit for
the whole table, the rounds, the device time where the case measured one (``gpu_us``), and the
ratio of its median to the group's torch Adam case (else to its fastest case). After the tables,
one line per reason why cases were skipped (the fused MGG step without a CUDA GPU, sizes a CPU
leaves out). ``--benchmark-columns=...`` brings pytest-benchmark's tables back;
``--benchmark-json=FILE`` writes every number either way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

QUESTIONS = {  # group name prefix: what the group's table answers
    "step-": "one plain opt.step(): the MGG's fused and reference steps vs torch Adam, same tensors",
    "cpu-step-": "one opt.step() on the CPU: the MGG's fused CPU and reference steps vs torch Adam "
    "(1M/8M: the fused CPU step vs a copy of its traffic)",
    "graph-": "the fused step captured in a CUDA graph, one replay",
    "copy-": "a device copy of the step's least traffic: the bandwidth yardstick",
    "sweep-": "the fused kernel alone at its best BLOCK x warps of the sweep",
    "heads-": "the fused step of multi-head MGGs",
    "host-step-": "the host (Python) cost of one fused step, kernel launches stubbed",
    "adapt-": "one test-time adaptation batch (this part of it), per optimizer",
    "meta-window-": "one meta-training window of K adaptation steps and one meta-update",
    "fsdp-state": "optimizer state per rank under FSDP2 (time: the whole spawned run)",
}
UNITS = ((1e-3, "us", 1e6), (1.0, "ms", 1e3), (math.inf, "s", 1.0))  # (below, name, per second)
SHOWN_SKIPPED = 1  # skipped case names listed per reason


def pytest_configure(config: Any) -> None:
    """Quiet pytest-benchmark's own tables (ours replace them) unless its columns are asked for."""
    if config.getoption("benchmark_columns", None) is None:
        config.option.benchmark_quiet = True


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    """A table per benchmark group, then the reasons for the skipped cases."""
    session = getattr(config, "_benchmarksession", None)
    for group, benches in (session.groups if session is not None else None) or []:
        terminalreporter.write_line("")
        terminalreporter.write_line(group_table(group, benches))
    skipped = skip_lines(terminalreporter.stats.get("skipped", []))
    if skipped:
        terminalreporter.write_line("")
        for line in skipped:
            terminalreporter.write_line(line)


def label(bench: dict[str, Any]) -> str:
    """A case's name in the tables: its ``extra_info["label"]``, else its test name."""
    return bench["extra_info"].get("label") or bench["name"].removeprefix("test_")


def group_table(group: str | None, benches: list[dict[str, Any]]) -> str:
    """One group's table (``benches``: pytest-benchmark's flat result dicts), fastest first."""
    from mgg_fast.evaluation.report import text_table

    question = next((q for prefix, q in QUESTIONS.items() if (group or "").startswith(prefix)), "")
    benches = sorted(benches, key=lambda b: b["median"])
    _, unit, per_second = next(u for u in UNITS if benches[0]["median"] < u[0])
    adam = next((b for b in benches if label(b).startswith("torch Adam")), None)
    base = adam or benches[0]
    gpu = any("gpu_us" in b["extra_info"] for b in benches)
    header = ["case", f"median {unit}", f"IQR {unit}", "rounds", *(["GPU us"] * gpu)]
    header.append("x torch Adam" if adam else "x fastest")
    rows = []
    for b in benches:
        device_time = b["extra_info"].get("gpu_us")
        rows.append(
            [
                label(b),
                f"{b['median'] * per_second:,.1f}",
                f"{b['iqr'] * per_second:,.1f}",
                str(b["rounds"]),
                *([_number(device_time)] * gpu),
                f"{b['median'] / base['median']:,.2f}",
            ]
        )
    title = f"{group or 'ungrouped'}: {question}" if question else group or "ungrouped"
    return title + "\n" + text_table(header, rows)


def _number(value: Any) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value:,.1f}" if ok else "-"


def skip_lines(reports: list[Any]) -> list[str]:
    """One line per distinct skip reason: how many cases, why, and the first few of them."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for report in reports:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        by_reason[reason.removeprefix("Skipped: ")].append(report.nodeid.rpartition("::")[2])
    lines = []
    for reason, cases in by_reason.items():
        shown = ", ".join(cases[:SHOWN_SKIPPED]) + (", ..." if len(cases) > SHOWN_SKIPPED else "")
        lines.append(f"{len(cases)} skipped: {reason} ({shown})")
    return lines
