"""The one report stack of every suite: tables (terminal and Markdown), the accuracy-against-
updates plot, the machine a run was measured on, and the files written atomically."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from mgg_fast.core.files import atomic_write
from mgg_fast.evaluation.protocol import ACC_AT
from mgg_fast.evaluation.stats import settings_of
from mgg_fast.tta.registry import label

Panel = dict[str, tuple[list[float], list[float] | None]]  # label -> (mean curve, CI half-widths or None)


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (CPU model, threads, versions, date)."""
    dev = torch.device(device)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "numerics": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")},
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "triton": _version_of("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _version_of(distribution: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(distribution)
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---- tables --------------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def pm(stat: dict[str, Any], signed: bool = False) -> str:
    """``mean ± half-width`` in percentage points (``mean`` alone for one seed)."""
    mean = f"{100 * stat['mean']:+.1f}" if signed else pct(stat["mean"])
    return mean if stat["ci95"] is None else f"{mean} ± {100 * stat['ci95']:.1f}"


def _lrs(values: list[float | None]) -> str:
    distinct = sorted({v for v in values if v is not None})
    return "–" if not distinct else ",".join(f"{v:g}" for v in distinct)


def _updates(entry: dict[str, Any], n_seeds: int) -> str:
    u = entry["updates_to_tent"]
    return "–" if u["mean"] is None else f"{u['mean']:.1f} ({u['reached']}/{n_seeds})"


SHORT = {"episodic": "epis.", "continual": "cont.", "mixed": "mixed"}  # the lr column's header


def _settings(summary: dict[str, Any]) -> list[str]:
    return settings_of(next(iter(summary["methods"].values())))


def summary_header(summary: dict[str, Any]) -> list[str]:
    """The columns of :func:`summary_rows`: one per setting the run has."""
    settings = _settings(summary)
    return [
        "method",
        "lr " + " / ".join(SHORT.get(s, s) for s in settings),
        *settings,
        *(f"acc@{k}" for k in ACC_AT),
        "updates to Tent",
        "ms/batch",
        "step ms",
    ]


def paired_header(summary: dict[str, Any]) -> list[str]:
    """The columns of :func:`paired_rows`."""
    return ["paired difference (points)", *_settings(summary), "seeds"]


def summary_rows(arch_result: dict[str, Any]) -> list[list[str]]:
    """One row per method: lrs chosen per setting, each setting's mean ± 95% CI, acc@1/5/10,
    updates to reach Tent's final accuracy (mean over the seeds that reach it), ms per batch,
    step ms."""
    summary = arch_result["summary"]
    settings = _settings(summary)
    n = len(arch_result["seeds"])
    rows = []
    for method, r in summary["methods"].items():
        adapting = method != "noadapt"
        rows.append(
            [
                label(method),
                " / ".join(_lrs(r["lr"][s]) for s in settings) if adapting else "–",
                *(pm(r[s]) for s in settings),
                *(pct(r["acc_at"][str(k)]) for k in ACC_AT),
                _updates(r, n),
                f"{r['ms_per_batch']:.1f}",
                f"{r['step_ms_per_batch']:.2f}" if adapting else "–",
            ]
        )
    return rows


def paired_rows(arch_result: dict[str, Any]) -> list[list[str]]:
    """One row per compared pair: the paired per-seed difference, mean ± 95% CI."""
    settings = _settings(arch_result["summary"])
    rows = []
    for d in arch_result["summary"]["paired"].values():
        name = d.get("title") or f"{label(d['method'])} − {label(d['base'])}"
        rows.append([name, *(pm(d[s], True) if s in d else "–" for s in settings), str(d["episodic"]["n"])])
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def corruption_rows(arch_result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-corruption episodic accuracy, mean over seeds (rows) of each method (columns), then the means."""
    methods = arch_result["summary"]["methods"]
    names = list(next(iter(methods.values()))["per_corruption"]["episodic"])
    header = ["corruption", *(label(m) for m in methods)]
    rows = [[n, *(pct(r["per_corruption"]["episodic"][n]) for r in methods.values())] for n in names]
    for s in _settings(arch_result["summary"]):
        rows.append([f"mean ({s})", *(pct(r[s]["mean"]) for r in methods.values())])
    return header, rows


# ---- files ---------------------------------------------------------------------------------------


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON, newline-terminated."""
    return (json.dumps(obj, indent=1) + "\n").encode()


def plot_curves(panels: dict[str, Panel], path: Path, title: str) -> bool:
    """A PNG of batch accuracy (%) against the number of updates before the batch: one panel per
    entry of ``panels`` (its key is the panel's title), one line per method, a band where its CI
    half-widths are given. A panel without a point (no batch of the full size) says so. Returns
    False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-.")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    banded = False
    for ax, (panel_title, panel) in zip(axes[0], panels.items(), strict=True):
        longest = 1
        for i, (name, (mean, half)) in enumerate(panel.items()):
            if not mean:
                continue
            marker, line = styles[i % len(styles)]
            x = list(range(len(mean)))
            y = [100 * v for v in mean]
            (drawn,) = ax.plot(
                x, y, marker=marker, linestyle=line, label=name, alpha=0.9,
                markersize=8 - 1.5 * (i % 4), fillstyle="none",
            )  # fmt: skip
            if half is not None:
                banded = True
                lo = [100 * (m - h) for m, h in zip(mean, half, strict=True)]
                hi = [100 * (m + h) for m, h in zip(mean, half, strict=True)]
                ax.fill_between(x, lo, hi, alpha=0.15, color=drawn.get_color())
            longest = max(longest, len(mean))
        if not any(mean for mean, _ in panel.values()):
            ax.text(
                0.5,
                0.5,
                "no batch of the full size:\nno curve",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_ylim(0, 100)  # an empty axis would run 0..1 beside a label in %
        ax.set_xlim(-0.5, longest - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one point: tick 0 alone
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("updates before the batch")
        ax.set_ylabel("batch accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = (len(labels) + 3) // 4
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(title + ("; bands: 95% CI over seeds" if banded else ""), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    plt.close(fig)
    return True


def write_reports(
    results: dict[str, Any],
    out_dir: str | os.PathLike,
    markdown: str,
    panels: dict[str, Panel] | None = None,
    plot_title: str = "",
) -> dict[str, Path]:
    """``results.json`` (every number), ``results.md`` and, where there is a curve to draw,
    ``accuracy_vs_updates.png``, each written atomically; returns the paths written."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write(paths["json"], lambda fh: fh.write(json_bytes(results)))
    atomic_write(paths["markdown"], lambda fh: fh.write(markdown.encode()))
    plot = out / "accuracy_vs_updates.png"
    if panels is not None and plot_curves(panels, plot, plot_title):
        paths["plot"] = plot
    return paths
