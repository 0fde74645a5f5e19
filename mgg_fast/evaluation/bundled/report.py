"""The bundled benchmark's reports: its settings and definitions around the shared tables of
:mod:`mgg_fast.evaluation.report` (terminal text, Markdown, the plot of accuracy against updates)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mgg_fast.evaluation.report as report
from mgg_fast.evaluation.bundled.summary import ROOM
from mgg_fast.evaluation.report import (
    corruption_rows,
    md_table,
    paired_header,
    paired_rows,
    pct,
    pm,
    summary_header,
    summary_rows,
    text_table,
)
from mgg_fast.tta.registry import label


def _arch_title(arch: str, r: dict[str, Any]) -> str:
    src = r["seeds"][0]["source"]
    seeds = ", ".join(str(s["seed"]) for s in r["seeds"])
    return (
        f"{arch}: {src['parameters']:,} parameters ({src['adapted_parameters']:,} adapted), clean test "
        f"accuracy {pm(r['summary']['clean_accuracy'])}%, seeds {seeds}"
    )


def _memory_note(cfg: dict[str, Any]) -> str:
    memory = cfg.get("mgg_memory", "float32")
    return "" if memory == "float32" else f"; MGG memory_W stored as {memory}"


def _n_test(cfg: dict[str, Any]) -> str:
    return "all" if cfg["n_test"] is None else str(cfg["n_test"])


def headline_tables(summary: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """The headline's tables (``[]`` without one): every method's means over the corruptions with
    room, and the MGG rows' paired differences on them."""
    head = summary.get("headline")
    if not head or not head["kept"]:
        return []
    settings = ("episodic", "continual")
    kept = f"{len(head['kept'])} of {len(head['room'])} corruptions with room"
    means = [[label(m), *(pm(r[s]) for s in settings)] for m, r in head["methods"].items()]
    pairs = [[d["title"], *(pm(d[s], True) for s in settings)] for d in head["paired"].values()]
    return [
        ([f"headline: {kept}", *settings], means),
        (["headline paired difference (points)", *settings], pairs),
    ]


def format_text(results: dict[str, Any]) -> str:
    """The terminal report: per architecture, the summary, the paired differences, the headline
    (corruptions with room), per corruption."""
    cfg = results["config"]
    parts = [
        f"Corrupted MNIST, severity {cfg['severity']}, {len(cfg['corruptions'])} corruptions × "
        f"{_n_test(cfg)} images, batch {cfg['batch_size']}, {len(cfg['seeds'])} seed(s); accuracy in %, "
        "online, mean ± 95% CI (t) over seeds" + _memory_note(cfg)
    ]
    for arch, r in results["archs"].items():
        parts += ["", _arch_title(arch, r), text_table(summary_header(r["summary"]), summary_rows(r))]
        if r["summary"]["paired"]:
            parts += ["", text_table(paired_header(r["summary"]), paired_rows(r))]
        for table in headline_tables(r["summary"]):
            parts += ["", text_table(*table)]
        parts += ["", text_table(*corruption_rows(r))]
    return "\n".join(parts)


def _recipe_note(cfg: dict[str, Any]) -> str:
    notes = []
    for r in cfg["recipes"]:
        lr = "each grid lr (tuned)" if r["adapt_lr"] is None else f"train lr {r['adapt_lr']:g}"
        ev = "" if r["eval_lr"] is None else f", eval lr {r['eval_lr']:g}"
        notes.append(
            f"`{r['name']}`: batch {r['batch_size'] or cfg['batch_size']}, "
            f"{r['epochs'] or cfg['meta_epochs']} epochs over {r['n_meta'] or cfg['n_meta']} images "
            f"({r['stream'].replace('_', '-')}"
            f"{', shuffled' if r['shuffle'] else ''}), K = {r['unroll']}, {lr}{ev}"
            + (", best epoch on validation" if r["validate"] else "")
            + ("" if r["reset_params"] else ", norm params drift across epochs")
        )
    return "; ".join(notes)


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: settings, definitions, and the tables of :func:`format_text`."""
    cfg, machine = results["config"], results["machine"]
    mgg = "given (not retrained)." if results["given_mgg"] else f"meta-trained by {_recipe_note(cfg)}."
    parts = [
        "# Distribution-shift benchmark (corrupted MNIST)",
        "",
        f"{machine['device']} ({machine.get('cpu', '?')}, {machine['torch_threads']} torch threads), torch "
        f"{machine['torch']}, {machine['date_utc']} UTC; wall time {results['wall_seconds']:.0f} s.",
        "",
        f"Severity {cfg['severity']}; {len(cfg['corruptions'])} test corruptions × {_n_test(cfg)} images; "
        f"batch {cfg['batch_size']}; loss `{cfg['loss']}` (SAR and EATA: their own filtered entropy); seeds "
        f"{', '.join(map(str, cfg['seeds']))}; learning rates tuned per setting on "
        f"{', '.join(cfg['val_corruptions'])} ({cfg['n_tune']} val images each); MGG "
        + mgg
        + _memory_note(cfg),
        "",
        "Accuracies are online (%), mean ± 95% CI (t-distribution) over seeds: each batch is predicted, "
        "then adapted on. *episodic*: reset before each corruption; *continual*: one stream over all "
        "corruptions. *acc@k*: accuracy on the batch predicted after exactly k updates, mean over "
        "corruptions (episodic). *updates to Tent*: first k whose acc@k reaches Tent's final accuracy "
        "(mean of its last 3 acc@k), mean over the seeds that reach it (how many). *paired*: per-seed "
        "differences, mean ± 95% CI; *best hand-made*: of SGD, Adam and sign momentum with the MGG's loss, "
        "the one with the best mean (on the test streams: it favours the baseline). *headline*: the means "
        "over the corruptions where the supervised oracle beats NoAdapt by 5 points or more. "
        "*ms/batch*: predict + adapt; *step ms*: the optimizer step alone.",
    ]
    for arch, r in results["archs"].items():
        parts += [
            "",
            f"## {_arch_title(arch, r)}",
            "",
            md_table(summary_header(r["summary"]), summary_rows(r)),
            "",
        ]
        if r["summary"]["paired"]:
            parts += [md_table(paired_header(r["summary"]), paired_rows(r)), ""]
        head = r["summary"].get("headline")
        if head and head["kept"]:
            kept = ", ".join(head["kept"])
            parts += [f"Corruptions with room (oracle − NoAdapt ≥ {100 * ROOM:.0f} points): {kept}.", ""]
            for table in headline_tables(r["summary"]):
                parts += [md_table(*table), ""]
        parts.append(md_table(*corruption_rows(r)))
    return "\n".join(parts) + "\n"


def panels(results: dict[str, Any]) -> dict[str, report.Panel]:
    """The plot's panels: one per architecture, each method's mean ``acc@k`` curve over seeds with
    its 95% CI band (no band with one seed)."""
    out = {}
    for arch, r in results["archs"].items():
        seeds = len(r["seeds"])
        clean = pct(r["summary"]["clean_accuracy"]["mean"])
        out[f"{arch} ({seeds} seed{'s' * (seeds > 1)}, clean {clean}%)"] = {
            label(method): (
                [c["mean"] for c in m["curve"]],
                [c["ci95"] or 0.0 for c in m["curve"]] if seeds > 1 else None,
            )
            for method, m in r["summary"]["methods"].items()
        }
    return out


def write_reports(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json`` (every per-seed number), ``results.md`` and ``accuracy_vs_updates.png``."""
    title = f"Corrupted MNIST (severity {results['config']['severity']}), mean over corruptions, episodic"
    return report.write_reports(results, out_dir, format_markdown(results), panels(results), title)
