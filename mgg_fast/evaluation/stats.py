"""Statistics over seeds: means with t-intervals, and paired per-seed differences.

One seed is an anecdote: every suite reports the mean over its seeds with the half-width of the
two-sided 95% t-interval, and compares two methods by the per-seed *paired* difference (the same
seed draws the same data, model and MGG initialisation for both), with its own interval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mgg_fast.evaluation.protocol import ACC_AT, SETTINGS


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


def aggregate_methods(seed_runs: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Over seeds: every method's means with CIs, its ``acc@k`` band, the per-corruption means,
    updates-to-Tent, and for each ``(method, base)`` of ``pairs`` the paired per-seed difference
    ``method − base`` (key ``"method-base"``) of both settings."""
    methods = list(seed_runs[0]["methods"])
    out: dict[str, Any] = {"methods": {}, "paired": {}}
    for method in methods:
        runs = [r["methods"][method] for r in seed_runs]
        entry: dict[str, Any] = {s: mean_ci([r[s]["mean"] for r in runs]) for s in SETTINGS}
        length = min(len(r["episodic"]["curve"]) for r in runs)
        entry["curve"] = [mean_ci([r["episodic"]["curve"][k] for r in runs]) for k in range(length)]
        entry["acc_at"] = {str(k): (entry["curve"][k]["mean"] if k < length else None) for k in ACC_AT}
        names = list(runs[0]["episodic"]["per_corruption"])
        entry["per_corruption"] = {
            s: {n: float(np.mean([r[s]["per_corruption"][n] for r in runs])) for n in names} for s in SETTINGS
        }
        reached = [r["updates_to_tent"] for r in runs if r["updates_to_tent"] is not None]
        entry["updates_to_tent"] = {
            "mean": float(np.mean(reached)) if reached else None,
            "reached": len(reached),
        }
        entry["ms_per_batch"] = float(np.mean([r["ms_per_batch"] for r in runs]))
        entry["step_ms_per_batch"] = float(np.mean([r["step_ms_per_batch"] for r in runs]))
        entry["lr"] = {s: [r["lr"][s] for r in runs] for s in SETTINGS}
        out["methods"][method] = entry
    for method, base in pairs:
        out["paired"][f"{method}-{base}"] = {
            s: mean_ci([r["methods"][method][s]["mean"] - r["methods"][base][s]["mean"] for r in seed_runs])
            for s in SETTINGS
        }
    return out
