"""The bundled benchmark's statistics over seeds: every method with its CIs, the paired
differences of the MGG rows (to Tent, Adam, its memoryless self and the best hand-made optimizer
of its loss), the headline means over the corruptions with room, and the merging of runs made
one seed at a time."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from mgg_fast.evaluation.stats import against_best, aggregate_methods, mean_ci, paired
from mgg_fast.tta.registry import HAND_MADE, label

ROOM = 0.05  # a corruption counts in the headline when the oracle beats NoAdapt by 5 points


def aggregate(seed_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the seeds of one architecture: :func:`aggregate_methods` with the paired differences of
    every MGG row to Tent, Adam, its memoryless self and the best hand-made optimizer of its loss;
    the headline means over the corruptions with room; the source model's clean accuracy."""
    methods = list(seed_runs[0]["methods"])
    pairs = []
    for m, name, suffix, _ in _mgg_rows(methods):
        bases = [f"tent{suffix}", f"adam{suffix}", f"{name}-memoryless{suffix}"]
        pairs += [(m, b) for b in bases if b in methods]
    out = aggregate_methods(seed_runs, pairs)
    out["paired"].update(_against_best_hand_made(seed_runs, methods))
    out["clean_accuracy"] = mean_ci([r["source"]["clean_accuracy"] for r in seed_runs])
    out["headline"] = _headline(seed_runs, methods)
    return out


def _mgg_rows(methods: list[str]) -> Iterator[tuple[str, str, str, list[str]]]:
    """Each MGG row that is not an ablation: its key, name, loss suffix (``""`` or ``"+loss"``) and
    the hand-made rows of the same loss."""
    for m in methods:
        name, _, loss = m.partition("+")
        suffix = f"+{loss}" if loss else ""
        hand = [f"{h}{suffix}" for h in HAND_MADE if f"{h}{suffix}" in methods]
        if name.startswith("mgg") and "memoryless" not in name and hand:
            yield m, name, suffix, hand


def _against_best_hand_made(seed_runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Every MGG row's paired difference to the best hand-made optimizer of its loss."""
    return {f"{m}-best": against_best(seed_runs, m, hand) for m, _, _, hand in _mgg_rows(methods)}


def _headline(seed_runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any] | None:
    """The corruptions with room (the oracle beats NoAdapt by :data:`ROOM`, episodic, mean over
    seeds), every method's episodic and continual means over them with CIs, and on those means the
    paired differences of each MGG row to the best hand-made optimizer of its loss and to its
    memoryless self; ``None`` without the oracle and NoAdapt rows."""
    if "supervised" not in methods or "noadapt" not in methods:
        return None
    per = [r["methods"] for r in seed_runs]

    def at(p: dict[str, Any], m: str, s: str, n: str) -> float:
        return p[m][s]["per_corruption"][n]

    names = list(per[0]["noadapt"]["episodic"]["per_corruption"])
    room = {
        n: float(np.mean([at(p, "supervised", "episodic", n) - at(p, "noadapt", "episodic", n) for p in per]))
        for n in names
    }
    kept = [n for n in names if room[n] >= ROOM]
    settings = ("episodic", "continual")
    # per seed, each method's mean over the kept corruptions: seed runs for the shared statistics
    runs = [
        {"methods": {m: {s: {"mean": float(np.mean([at(p, m, s, n) for n in kept])) if kept else math.nan}
                         for s in settings} for m in methods}}
        for p in per
    ]  # fmt: skip
    rows: dict[str, Any] = {}
    for m, name, suffix, hand in _mgg_rows(methods):
        rows[f"{m}-best"] = against_best(runs, m, hand)
        memoryless = f"{name}-memoryless{suffix}"
        if memoryless in methods:
            rows[f"{m}-{memoryless}"] = {"method": m, "title": f"{label(m)} − {label(memoryless)}"}
            rows[f"{m}-{memoryless}"].update({s: paired(runs, m, memoryless, s) for s in settings})
    means = {m: {s: mean_ci([r["methods"][m][s]["mean"] for r in runs]) for s in settings} for m in methods}
    return {"room": room, "kept": kept, "methods": means, "paired": rows}


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same configuration on disjoint seeds (e.g. one process per seed,
    to keep each run short): the per-seed runs side by side, the statistics over all of them.

    Raises ``ValueError`` if the configurations differ other than in their seeds, or seeds repeat."""
    if not parts:
        raise ValueError("merge_results needs at least one result")
    ignore = ("seed", "n_seeds", "seeds", "threads")

    def settings(part: dict[str, Any]) -> dict[str, Any]:  # as JSON holds them (tuples → lists)
        return json.loads(json.dumps({k: v for k, v in part["config"].items() if k not in ignore}))

    base = settings(parts[0])
    for p in parts[1:]:
        other = settings(p)
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise ValueError(f"cannot merge runs whose configurations differ in {', '.join(diff)}")
    seeds = [s for p in parts for s in p["config"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cannot merge runs with repeated seeds {seeds}")
    archs = {}
    for arch in parts[0]["archs"]:
        runs = sorted((r for p in parts for r in p["archs"][arch]["seeds"]), key=lambda r: r["seed"])
        archs[arch] = {"seeds": runs, "summary": aggregate(runs)}
    return {
        **parts[0],
        "config": {**parts[0]["config"], "seeds": sorted(seeds), "n_seeds": len(seeds)},
        "machine": parts[0]["machine"],
        "machines": [p["machine"] for p in parts],
        "archs": archs,
        "wall_seconds": sum(p["wall_seconds"] for p in parts),
        "merged_from": len(parts),
    }
