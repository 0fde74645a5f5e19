"""The bundled benchmark's reports: its settings and definitions around the shared tables of
:mod:`mgg_fast.evaluation.report` (terminal text, Markdown, the plot of accuracy against updates)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mgg_fast.evaluation.report as report
from mgg_fast.core.files import atomic_write
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


def _n_tune(cfg: dict[str, Any]) -> str:
    """Images per validation stream: ``n_tune`` when set, else as many as each test stream."""
    if cfg.get("n_tune") is not None:
        return f"{cfg['n_tune']} val images each"
    return f"{_n_test(cfg)} val images each, as the test streams"


def grid_end_note(arch_result: dict[str, Any]) -> str:
    """Which rows chose a learning rate at an end of the lrs they tuned, per setting and end with
    the number of seeds (the best may lie beyond the grid); ``""`` when none did."""
    counts: dict[tuple[str, str, str], int] = {}
    for seed in arch_result["seeds"]:
        for key, method in seed["methods"].items():
            for setting, lr in method["lr"].items():
                tried = sorted(float(v) for v in seed["tuning"].get(key, {}).get(setting, {}))
                if lr is None or len(tried) < 2 or tried[0] < lr < tried[-1]:
                    continue
                end = (key, setting, "lowest" if lr == tried[0] else "highest")
                counts[end] = counts.get(end, 0) + 1
    if not counts:
        return ""
    n = len(arch_result["seeds"])
    ends = "; ".join(f"{label(k)} {s} {e} ({c}/{n})" for (k, s, e), c in counts.items())
    return f"Learning rates at an end of their grid (the best may lie beyond it): {ends}."


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
        if note := grid_end_note(r):
            parts += ["", note]
    return "\n".join(parts)


def _windows(unroll: int | list[int]) -> str:
    """A recipe's truncation window, or its curriculum as ``1→2→4→8``."""
    return "→".join(map(str, unroll)) if isinstance(unroll, list) else str(unroll)


def _recipe_note(cfg: dict[str, Any]) -> str:
    notes = []
    for r in cfg["recipes"]:
        lr = "each grid lr (tuned)" if r["adapt_lr"] is None else f"train lr {r['adapt_lr']:g}"
        ev = "" if r["eval_lr"] is None else f", eval lr {r['eval_lr']:g}"
        most = "" if r["patience"] == 0 else "at most "  # the others stop when the meta-loss does
        per_k = "" if r["unroll"] == 1 else " × K"  # K-step windows get K times the epochs
        epochs = f"{most}{r['epochs'] or cfg['meta_epochs']}{per_k}"
        notes.append(
            f"`{r['name']}`: batch {r['batch_size'] or cfg['batch_size']}, "
            f"{epochs} epochs over {r['n_meta'] or cfg['n_meta']} images "
            f"({r['stream'].replace('_', '-')}"
            f"{', shuffled' if r['shuffle'] else ''}), K = {_windows(r['unroll'])}, {lr}{ev}"
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
        f"{', '.join(cfg['val_corruptions'])} ({_n_tune(cfg)}); MGG " + mgg + _memory_note(cfg),
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
        if note := grid_end_note(r):
            parts += [note, ""]
        if r["summary"]["paired"]:
            parts += [md_table(paired_header(r["summary"]), paired_rows(r)), ""]
        head = r["summary"].get("headline")
        if head and head["kept"]:
            kept = ", ".join(head["kept"])
            parts += [f"Corruptions with room (oracle − NoAdapt ≥ {100 * ROOM:.0f} points): {kept}.", ""]
            for table in headline_tables(r["summary"]):
                parts += [md_table(*table), ""]
        parts.append(md_table(*corruption_rows(r)))
        meta = meta_training_rows(r)
        if meta[1]:
            parts += ["", md_table(*meta)]
    return "\n".join(parts) + "\n"


History = list[dict[str, float]]  # per epoch: epoch, mean_loss, meta_updates, score (NaN: unvalidated)


def _histories(arch_result: dict[str, Any]) -> dict[tuple[str, str], list[tuple[History, int | None]]]:
    """Each meta-trained MGG's per-epoch history and kept epoch (``None``: the last, unvalidated),
    per seed: ``(row, eval lr) -> [(history, kept), ...]``."""
    out: dict[tuple[str, str], list[tuple[History, int | None]]] = {}
    for seed in arch_result["seeds"]:
        for key, tuned in seed["tuning"].items():
            for lr, history in tuned.get("meta_history", {}).items():
                out.setdefault((key, lr), []).append((history, tuned["selected_epoch"][lr]))
    return out


def meta_training_rows(arch_result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """How each MGG was meta-trained, per row and eval lr over seeds: the meta-updates and epochs
    run (the meta-loss's plateau or the recipe's epochs end it), the mean meta-loss of the first and
    last epoch, and for a validated recipe the epoch kept per seed (the latest with the best score)."""
    header = ["MGG (meta-training)", "eval lr", "meta-updates", "epochs", "meta-loss first → last"]
    rows = []
    for (key, lr), runs in _histories(arch_result).items():
        first = sum(run[0]["mean_loss"] for run, _ in runs) / len(runs)
        last = sum(run[-1]["mean_loss"] for run, _ in runs) / len(runs)
        kept = [k for _, k in runs if k is not None]
        rows.append(
            [
                label(key),
                lr,
                "/".join(str(run[-1].get("meta_updates", "?")) for run, _ in runs),
                "/".join(str(len(run)) for run, _ in runs),
                f"{first:.4f} → {last:.4f}",
                "/".join(map(str, kept)) if kept else "last",
            ]
        )
    return [*header, "epoch kept"], rows


def plot_meta_training(results: dict[str, Any], path: Path) -> bool:
    """A PNG of each MGG's meta-training, one row per architecture: the meta-loss per epoch against
    the meta-updates so far, and for validated recipes the validation score per epoch (the kept
    epoch circled); one line per seed. False (nothing written) without a history or matplotlib."""
    archs = {a: _histories(r) for a, r in results["archs"].items()}
    archs = {a: h for a, h in archs.items() if h}
    try:
        import matplotlib
    except ImportError:
        return False
    if not archs:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for histories in archs.values() for seeds in histories.values() for run, _ in seeds]
    validated = any(h["score"] == h["score"] for run in runs for h in run)
    fig, axes = plt.subplots(len(archs), 1 + validated, figsize=(5.5 * (1 + validated), 3.6 * len(archs)),
                             squeeze=False)  # fmt: skip
    for row, (arch, histories) in zip(axes, archs.items(), strict=True):
        for i, ((key, lr), runs) in enumerate(histories.items()):
            color = f"C{i % 10}"
            for j, (run, kept) in enumerate(runs):
                name = f"{label(key)}, lr {lr}" if j == 0 else None
                updates = [h.get("meta_updates", h["epoch"]) for h in run]
                row[0].plot(updates, [h["mean_loss"] for h in run], color=color, alpha=0.7, label=name)
                points = [(h["epoch"], 100 * h["score"]) for h in run if h["score"] == h["score"]]
                if points:
                    row[1].plot(*zip(*points, strict=True), color=color, alpha=0.7, label=name)
                    row[1].plot(*points[[e for e, _ in points].index(kept)], "o", color=color,
                                fillstyle="none", markersize=9)  # fmt: skip
        row[0].set_title(f"{arch}: meta-loss per epoch (one line per seed)", fontsize=9)
        row[0].set(xlabel="meta-updates", ylabel="mean meta-loss of the epoch")
        row[0].legend(fontsize=7)
        if validated:
            row[1].set_title(f"{arch}: validation score per epoch (circled: the epoch kept)", fontsize=9)
            row[1].set(xlabel="epoch", ylabel="validation accuracy (%)")
        for ax in row:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    plt.close(fig)
    return True


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
    """Write ``results.json`` (every per-seed number), ``results.md``, ``accuracy_vs_updates.png``
    and, where MGGs were meta-trained (or shipped with their history), ``meta_training.png``."""
    title = f"Corrupted MNIST (severity {results['config']['severity']}), mean over corruptions, episodic"
    paths = report.write_reports(results, out_dir, format_markdown(results), panels(results), title)
    meta = Path(out_dir) / "meta_training.png"
    if plot_meta_training(results, meta):
        paths["meta_training"] = meta
    return paths
