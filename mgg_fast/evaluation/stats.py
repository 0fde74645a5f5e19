"""Statistics over seeds: means with t-intervals, and paired per-seed differences.

One seed is an anecdote: every suite reports the mean over its seeds with the half-width of the
two-sided 95% t-interval, and compares two methods by the per-seed *paired* difference (the same
seed draws the same data, model and MGG initialisation for both), with its own interval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mgg_fast.evaluation.protocol import ACC_AT
from mgg_fast.tta.registry import label

ALL_SETTINGS = ("episodic", "continual", "mixed")


def mean_ci(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and half-width of the two-sided t-interval (``None`` below 2 values) of ``values``."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    half = None
    if n >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": half, "n": n, "values": [float(v) for v in x]}


def settings_of(run: dict[str, Any]) -> list[str]:
    """The settings a method's result holds (episodic and continual; mixed where it ran)."""
    return [s for s in ALL_SETTINGS if s in run]


def paired(seed_runs: list[dict[str, Any]], method: str, base: str, setting: str) -> dict[str, Any]:
    """The per-seed difference ``method − base`` of one setting's mean, with its mean and CI."""
    runs = [r["methods"] for r in seed_runs]
    return mean_ci([r[method][setting]["mean"] - r[base][setting]["mean"] for r in runs])


def aggregate_methods(seed_runs: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Over seeds: every method's means with CIs, its ``acc@k`` band, the per-corruption means,
    updates-to-Tent, and for each ``(method, base)`` of ``pairs`` the paired per-seed difference
    ``method − base`` (key ``"method-base"``) of every setting."""
    methods = list(seed_runs[0]["methods"])
    out: dict[str, Any] = {"methods": {}, "paired": {}}
    for method in methods:
        runs = [r["methods"][method] for r in seed_runs]
        settings = settings_of(runs[0])
        entry: dict[str, Any] = {s: mean_ci([r[s]["mean"] for r in runs]) for s in settings}
        length = min(len(r["episodic"]["curve"]) for r in runs)
        entry["curve"] = [mean_ci([r["episodic"]["curve"][k] for r in runs]) for k in range(length)]
        entry["acc_at"] = {str(k): (entry["curve"][k]["mean"] if k < length else None) for k in ACC_AT}
        entry["per_corruption"] = {
            s: {
                n: float(np.mean([r[s]["per_corruption"][n] for r in runs]))
                for n in runs[0][s]["per_corruption"]
            }
            for s in settings
        }
        reached = [r["updates_to_tent"] for r in runs if r["updates_to_tent"] is not None]
        entry["updates_to_tent"] = {
            "mean": float(np.mean(reached)) if reached else None,
            "reached": len(reached),
        }
        entry["ms_per_batch"] = float(np.mean([r["ms_per_batch"] for r in runs]))
        entry["step_ms_per_batch"] = float(np.mean([r["step_ms_per_batch"] for r in runs]))
        entry["lr"] = {s: [r["lr"][s] for r in runs] for s in settings}
        out["methods"][method] = entry
    for method, base in pairs:
        settings = settings_of(seed_runs[0]["methods"][method])
        out["paired"][f"{method}-{base}"] = {
            "method": method,
            "base": base,
            **{s: paired(seed_runs, method, base, s) for s in settings},
        }
    return out


def best_title(method: str, best: dict[str, str]) -> str:
    """``MGG − best hand-made (Adam)``, naming the baseline per setting where it differs."""
    names = {s: label(b.partition("+")[0]) for s, b in best.items()}
    shown = set(names.values())
    which = shown.pop() if len(shown) == 1 else "; ".join(f"{s}: {b}" for s, b in names.items())
    return f"{label(method)} − best hand-made ({which})"


def against_best(seed_runs: list[dict[str, Any]], method: str, candidates: list[str]) -> dict[str, Any]:
    """Per setting, the paired difference of ``method`` to the one of ``candidates`` (the
    hand-made optimizers of its loss) with the best mean over the seeds; that choice is made on
    the reported streams, so it favours the baseline."""
    entry: dict[str, Any] = {"method": method, "base": "best", "best": {}}
    for s in settings_of(seed_runs[0]["methods"][method]):
        best = max(candidates, key=lambda h, s=s: np.mean([r["methods"][h][s]["mean"] for r in seed_runs]))
        entry["best"][s] = best
        entry[s] = paired(seed_runs, method, best, s)
    entry["title"] = best_title(method, entry["best"])
    return entry
