"""The user's own model on the user's own folders: one result file per (method, stream),
resumable, and the reports (JSON, Markdown, plot of accuracy against updates).

Protocol (:mod:`mgg_fast.evaluation.protocol`). Every (method, stream) pair starts from the
source model (the ImageNet-C protocol: reset before each corruption), so each pair's result
depends on nothing else and an interrupted run can resume by skipping the pairs already
written. Accuracy is online: each batch is predicted with the parameters of that moment, then
adapted on. Batches come in a seeded shuffled order. ``episodic`` also resets before every batch.
An unreadable image is skipped, which leaves its batch one image short: the batches stay the
ones planned for the files (the same on every run, so a resumed run matches), and the
accuracy-against-updates curve still counts such a batch (:func:`~mgg_fast.evaluation.protocol.summarize`).

Output folder::

    run.json                          the run's settings (a resumed run must match them)
    runs/<method>/<stream>.json       one finished pair, written atomically as it finishes
    predictions/<method>/<stream>.csv file, label, prediction, confidence of every image
    results.json, results.md, accuracy_vs_updates.png   the reports over all finished pairs
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mgg_fast.evaluation.report as report
from mgg_fast.core.files import atomic_write
from mgg_fast.core.mgg import MGG
from mgg_fast.evaluation.images import ImageStream, Skipped, make_loader
from mgg_fast.evaluation.protocol import Runner, summarize
from mgg_fast.evaluation.report import json_bytes, machine_info, md_table, pct, text_table
from mgg_fast.tta.data_parallel import is_rank_zero
from mgg_fast.tta.registry import MethodOptions, label, memory_dtype
from mgg_fast.tta.source_stats import SourceStats

RUN_FORMAT = "mgg_fast.user_run/v1"
METHODS = ("noadapt", "tent", "adam", "mgg")
# settings a resumed run may change: which pairs to run (finished pairs stay valid)
FREE_ON_RESUME = ("streams", "methods", "workers")
MIN_FOA_BATCH = 2


@dataclass
class RunSettings:
    """The settings of a run that decide its numbers (JSON-ready; saved in ``run.json``)."""

    methods: list[str]
    lrs: dict[str, float]
    loss: str
    batch_size: int
    episodic: bool = False
    class_mask: list[int] | None = None
    seed: int = 0
    mgg_memory: str = "float32"
    workers: int = 0


@dataclass
class RunSetup:
    """Everything one run needs: the live objects, its :class:`RunSettings`, and ``described``,
    what else identifies the run (model name, weights, data, file paths). :attr:`config`, their
    union, is compared on ``--resume``."""

    model: nn.Module
    transform: Callable[[Any], Tensor]
    streams: list[ImageStream]
    settings: RunSettings
    mgg: MGG | None = None
    stats: SourceStats | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    described: dict[str, Any] = field(default_factory=dict)
    data_parallel: bool = False  # under torchrun: every rank runs the same pairs, see run_all

    @property
    def config(self) -> dict[str, Any]:
        return {**self.described, **asdict(self.settings), "streams": [s.name for s in self.streams]}

    def runner(self, method: str) -> Runner:
        """The method on a private copy of the model (the FOA loss's batches need two images)."""
        s = self.settings
        options = MethodOptions(
            mgg=self.mgg,
            loss=s.loss,
            source_stats=self.stats,
            memory_W_dtype=memory_dtype(s.mgg_memory),
            episodic=s.episodic,
            class_mask=s.class_mask,
            data_parallel=self.data_parallel,
        )
        min_batch = MIN_FOA_BATCH if s.loss == "foa" else 1
        return Runner(self.model, method, lr=s.lrs.get(method), options=options, min_batch=min_batch)


def _pair_path(out: Path, method: str, stream: str) -> Path:
    return out / "runs" / method / f"{stream}.json"


def check_resume(out: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse to mix runs: an existing ``run.json`` needs ``resume`` and the same settings."""
    path = out / "run.json"
    if not path.exists():
        if (out / "results.json").exists():  # e.g. the demo's reports: not ours to overwrite
            raise ValueError(f"{out} holds other results (results.json but no run.json); use another --out")
        return
    if not resume:
        raise ValueError(
            f"{out} already holds a run ({path}); pass --resume to continue it, or another --out"
        )
    try:
        old = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot resume: {path} is unreadable ({type(exc).__name__})") from None
    differ = sorted(
        k for k in set(old) | set(config) if k not in FREE_ON_RESUME and old.get(k) != config.get(k)
    )
    if differ:
        first = differ[0]
        raise ValueError(
            f"cannot resume the run in {out}: its {', '.join(differ)} differ (e.g. {first} was "
            f"{old.get(first)!r}, now {config.get(first)!r}); use another --out"
        )


def run_pair(
    setup: RunSetup, method: str, stream: ImageStream, *, progress: bool, warn: Callable[[str], None]
) -> tuple[dict[str, Any], bytes]:
    """Adapt on one stream with one method: ``(result, predictions CSV)``."""
    runner = setup.runner(method)
    loader = make_loader(
        stream,
        setup.transform,
        batch_size=setup.settings.batch_size,
        workers=setup.settings.workers,
        device=setup.device,
        seed=setup.settings.seed,
    )
    skipped = Skipped()
    counts: list[tuple[int, int]] = []
    confidence = 0.0
    rows = io.StringIO()
    table = csv.writer(rows)
    table.writerow(["file", "label", "prediction", "confidence"])
    start = time.perf_counter()
    bar = tqdm(
        total=len(stream), desc=f"{method} {stream.name}", unit="img", disable=not progress, leave=False
    )
    with bar:
        for batch in loader:
            skipped.add(stream, batch, warn)
            bar.update(len(batch.skipped))
            if batch.x is None:
                continue
            probs = runner(batch.x.to(setup.device, non_blocking=True)).float().softmax(1).cpu()
            conf, pred = probs.max(1)
            confidence += float(conf.sum())
            counts.append((int((pred == batch.labels).sum()), len(pred)))
            for i, label, p, c in zip(
                batch.indices.tolist(), batch.labels.tolist(), pred.tolist(), conf.tolist(), strict=True
            ):
                table.writerow([stream.files[i], label, p, f"{c:.4f}"])
            bar.update(len(pred))
            if stream.labeled:
                done = sum(n for _, n in counts)
                bar.set_postfix(acc=f"{100 * sum(k for k, _ in counts) / done:.1f}%")
    images = sum(n for _, n in counts)
    result = {
        "method": method,
        "stream": stream.name,
        "images": images,
        "skipped_images": skipped.count,
        "skipped_examples": skipped.examples,
        "unadapted_small_batches": runner.small_batches,
        "labeled": stream.labeled,
        "accuracy": (sum(k for k, _ in counts) / images if images else None) if stream.labeled else None,
        "batch_counts": counts if stream.labeled else None,
        "mean_confidence": confidence / images if images else None,
        "updates": runner.updates,
        "seconds": time.perf_counter() - start,
    }
    return result, rows.getvalue().encode()


def run_all(
    setup: RunSetup,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Run every missing (method, stream) pair, each written as it finishes; returns the results.

    Under torchrun (``setup.data_parallel``) every rank runs the same pairs (each adapting on its
    part of every batch) and only rank 0 writes; the finished pairs are read before anything is
    written, so every rank resumes the same ones."""
    check_resume(out, setup.config, resume)
    kept = {
        (method, stream.name): json.loads(path.read_text())
        for method in setup.settings.methods
        for stream in setup.streams
        if resume and (path := _pair_path(out, method, stream.name)).is_file()
    }
    if setup.data_parallel:
        torch.distributed.barrier()  # every rank has checked and read the folder before rank 0 writes
    writes = is_rank_zero()
    if writes:
        atomic_write(
            out / "run.json", lambda fh: fh.write(json_bytes({"format": RUN_FORMAT, "config": setup.config}))
        )
    pairs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in setup.settings.methods}
    for method in setup.settings.methods:
        for stream in setup.streams:
            if (method, stream.name) in kept:
                pairs[method][stream.name] = kept[method, stream.name]
                log(f"  {label(method):<11} {stream.name}: done before, kept")
                continue
            result, csv = run_pair(setup, method, stream, progress=progress, warn=warn)
            if writes:
                csv_path = out / "predictions" / method / f"{stream.name}.csv"
                atomic_write(csv_path, lambda fh, data=csv: fh.write(data))
                atomic_write(
                    _pair_path(out, method, stream.name), lambda fh, r=result: fh.write(json_bytes(r))
                )
            pairs[method][stream.name] = result
            log("  " + pair_line(result))
    return collect(setup.config, pairs, setup.settings.batch_size, setup.device)


def pair_line(r: dict[str, Any]) -> str:
    """One finished pair as a log line."""
    acc = f"accuracy {pct(r['accuracy'])}%  " if r["accuracy"] is not None else ""
    skipped = f"  ({r['skipped_images']} unreadable images skipped)" if r["skipped_images"] else ""
    return (
        f"{label(r['method']):<11} {r['stream']}: {r['images']} images  {acc}mean confidence "
        f"{r['mean_confidence'] or 0:.3f}  {r['seconds']:.1f} s{skipped}"
    )


def collect(
    config: dict[str, Any], pairs: dict[str, dict[str, dict[str, Any]]], batch_size: int, device: torch.device
) -> dict[str, Any]:
    """The results document: per method the per-stream accuracy, mean and the acc@k curve."""
    methods = {}
    for method, by_stream in pairs.items():
        labeled = all(r["labeled"] for r in by_stream.values())
        summary = (
            summarize({s: r["batch_counts"] for s, r in by_stream.items()}, batch_size) if labeled else {}
        )
        methods[method] = {
            "lr": config["lrs"].get(method),
            **summary,
            "mean_confidence": {s: r["mean_confidence"] for s, r in by_stream.items()},
            "images": sum(r["images"] for r in by_stream.values()),
            "skipped_images": sum(r["skipped_images"] for r in by_stream.values()),
        }
    return {"format": RUN_FORMAT, "config": config, "machine": machine_info(str(device)), "methods": methods}


# ---- reports ---------------------------------------------------------------------------------------


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Streams as rows, methods as columns: accuracy (%) if labeled, else mean confidence."""
    methods = results["methods"]
    labeled = all("per_corruption" in m for m in methods.values())
    streams = list(next(iter(methods.values()))["mean_confidence"])
    header = ["stream", *(label(m) for m in methods)]
    if labeled:
        rows = [[s, *(pct(m["per_corruption"][s]) for m in methods.values())] for s in streams]
        rows.append(["mean", *(pct(m["mean"]) for m in methods.values())])
    else:
        rows = [[s, *(f"{m['mean_confidence'][s]:.3f}" for m in methods.values())] for s in streams]
    return header, rows


def _what(results: dict[str, Any]) -> str:
    cfg = results["config"]
    labeled = all("per_corruption" in m for m in results["methods"].values())
    severity = f", severity {cfg['severity']}" if cfg["layout"] == "imagenet-c" else ""
    lrs = ", ".join(f"{label(m)} {lr:g}" for m, lr in cfg["lrs"].items())
    return (
        f"{cfg['model']} on {cfg['data']} ({cfg['layout']}{severity}), batch {cfg['batch_size']}, loss "
        f"{cfg['loss']}, {'episodic' if cfg['episodic'] else 'reset per stream'}; lr {lrs or '-'}. "
        + ("Online accuracy in %." if labeled else "Unlabeled: mean confidence of the predictions.")
    )


def format_text(results: dict[str, Any]) -> str:
    """The terminal report."""
    return _what(results) + "\n" + text_table(*_table(results))


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: settings, machine, the table, skipped images."""
    machine = results["machine"]
    skipped = {label(m): r["skipped_images"] for m, r in results["methods"].items() if r["skipped_images"]}
    parts = [
        "# Test-time adaptation of your model",
        "",
        f"{machine['device']}, torch {machine['torch']}, {machine['date_utc']} UTC.",
        "",
        _what(results),
        "",
        md_table(*_table(results)),
    ]
    if skipped:
        parts += ["", "Unreadable images skipped: " + ", ".join(f"{m} {n}" for m, n in skipped.items()) + "."]
    return "\n".join(parts) + "\n"


def panels(results: dict[str, Any]) -> dict[str, report.Panel] | None:
    """The plot's one panel: each method's ``acc@k`` curve, the mean over the streams; ``None``
    for unlabeled data (no accuracy to plot)."""
    methods = results["methods"]
    if not all("curve" in r for r in methods.values()):
        return None
    title = f"{results['config']['model']}: mean over {len(results['config']['streams'])} stream(s)"
    return {title: {label(m): (r["curve"], None) for m, r in methods.items()}}


def write_reports(results: dict[str, Any], out: Path) -> tuple[list[Path], str]:
    """``results.json``, ``results.md`` and (labeled data, matplotlib installed) the plot of
    accuracy against updates; returns the paths written and :func:`plot_note`."""
    drawn = panels(results)
    paths = report.write_reports(results, out, format_markdown(results), drawn)
    return list(paths.values()), plot_note(results, drawn is not None, "plot" in paths)


def plot_note(results: dict[str, Any], labeled: bool, written: bool) -> str:
    """Why there is no plot, or why it has no curve (its panel says so too); ``""`` when it has one."""
    if not labeled:
        return "no plot: the images are unlabeled (no accuracy to plot)"
    if not written:
        return "no plot: matplotlib is not installed (pip install matplotlib, or the shift extra)"
    if not any(r["curve"] for r in results["methods"].values()):
        batch = results["config"]["batch_size"]
        return (
            f"the plot has no curve: no stream fills a batch of {batch} images (a stream's short last "
            "batch is left out of the curve); lower --batch-size"
        )
    return ""
