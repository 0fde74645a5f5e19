"""Adapting a user's model on the user's streams: one result file per (method, stream), resumable,
and the reports (JSON, Markdown, plot of accuracy against updates).

Protocol. Every (method, stream) pair starts from the source model (the ImageNet-C protocol:
reset before each corruption), so each pair's result depends on nothing else and an
interrupted run can resume by skipping the pairs already written. Accuracy is online: each
batch is predicted with the parameters of that moment, then adapted on. Batches come in a
seeded shuffled order. ``episodic`` also resets before every batch.

Output folder::

    run.json                          the run's settings (a resumed run must match them)
    runs/<method>/<stream>.json       one finished pair, written atomically as it finishes
    predictions/<method>/<stream>.csv file, label, prediction, confidence of every image
    results.json, results.md, accuracy_vs_updates.png   the reports over all finished pairs
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mgg_fast.adaptation import MGTTA
from mgg_fast.distributed import is_rank_zero
from mgg_fast.files import atomic_write
from mgg_fast.losses import SourceStats
from mgg_fast.mgg import MGG
from mgg_fast.shift_benchmark import (
    LABELS,
    OPTIMIZER_OF,
    _md_table,
    _pct,
    _text_table,
    machine_info,
    summarize,
)
from mgg_fast.user_data import ImageStream, Skipped, make_loader

RUN_FORMAT = "mgg_fast.user_run/v1"
METHODS = ("noadapt", "tent", "adam", "mgg")
# settings a resumed run may change: which pairs to run (finished pairs stay valid)
FREE_ON_RESUME = ("streams", "methods", "workers")
MIN_FOA_BATCH = 2


@dataclass
class RunSetup:
    """Everything one run needs; ``config`` is its JSON description (compared on ``--resume``)."""

    model: nn.Module
    transform: Callable[[Any], Tensor]
    streams: list[ImageStream]
    methods: list[str]
    lrs: dict[str, float]
    mgg: MGG | None
    stats: SourceStats | None
    loss: str
    class_mask: list[int] | None
    batch_size: int
    workers: int
    episodic: bool
    seed: int
    device: torch.device
    memory_W_dtype: torch.dtype | None
    config: dict[str, Any]
    data_parallel: bool = False  # under torchrun: every rank runs the same pairs, see run_all


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


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


class _Predictor:
    """One method on a private copy of the source model: ``logits = predictor(x)`` predicts on
    ``x`` and then (unless NoAdapt) adapts on it."""

    def __init__(self, setup: RunSetup, method: str):
        self.model = copy.deepcopy(setup.model)
        self.mask = None if setup.class_mask is None else torch.tensor(setup.class_mask, device=setup.device)
        self.adapter: MGTTA | None = None
        self.small_batches = 0
        if method == "noadapt":
            self.model.eval()
        else:
            self.adapter = MGTTA(
                self.model,
                optimizer=OPTIMIZER_OF[method],
                mgg=setup.mgg if method == "mgg" else None,
                lr=setup.lrs[method],
                loss=setup.loss,
                source_stats=setup.stats,
                episodic=setup.episodic,
                class_mask=setup.class_mask,
                memory_W_dtype=setup.memory_W_dtype if method == "mgg" else None,
                data_parallel=setup.data_parallel,
                whole_batches=setup.data_parallel,
            )
            self.min_batch = MIN_FOA_BATCH if setup.loss == "foa" else 1

    def __call__(self, x: Tensor) -> Tensor:
        if self.adapter is not None and len(x) >= self.min_batch:
            return self.adapter(x)
        if self.adapter is not None:  # unreadable images left one image: too few for a batch std
            self.small_batches += 1
        with torch.no_grad():
            logits = self.model(x)
        return logits if self.mask is None else logits[:, self.mask]

    @property
    def updates(self) -> int:
        return 0 if self.adapter is None else self.adapter.total_updates


def run_pair(
    setup: RunSetup, method: str, stream: ImageStream, *, progress: bool, warn: Callable[[str], None]
) -> tuple[dict[str, Any], bytes]:
    """Adapt on one stream with one method: ``(result, predictions CSV)``."""
    predictor = _Predictor(setup, method)
    loader = make_loader(
        stream,
        setup.transform,
        batch_size=setup.batch_size,
        workers=setup.workers,
        device=setup.device,
        seed=setup.seed,
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
            probs = predictor(batch.x.to(setup.device, non_blocking=True)).float().softmax(1).cpu()
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
        "unadapted_small_batches": predictor.small_batches,
        "labeled": stream.labeled,
        "accuracy": (sum(k for k, _ in counts) / images if images else None) if stream.labeled else None,
        "batch_counts": counts if stream.labeled else None,
        "mean_confidence": confidence / images if images else None,
        "updates": predictor.updates,
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
        for method in setup.methods
        for stream in setup.streams
        if resume and (path := _pair_path(out, method, stream.name)).is_file()
    }
    if setup.data_parallel:
        torch.distributed.barrier()  # every rank has checked and read the folder before rank 0 writes
    writes = is_rank_zero()
    if writes:
        atomic_write(
            out / "run.json", lambda fh: fh.write(_json_bytes({"format": RUN_FORMAT, "config": setup.config}))
        )
    pairs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in setup.methods}
    for method in setup.methods:
        for stream in setup.streams:
            if (method, stream.name) in kept:
                pairs[method][stream.name] = kept[method, stream.name]
                log(f"  {LABELS[method]:<11} {stream.name}: done before, kept")
                continue
            result, csv = run_pair(setup, method, stream, progress=progress, warn=warn)
            if writes:
                csv_path = out / "predictions" / method / f"{stream.name}.csv"
                atomic_write(csv_path, lambda fh, data=csv: fh.write(data))
                atomic_write(
                    _pair_path(out, method, stream.name), lambda fh, r=result: fh.write(_json_bytes(r))
                )
            pairs[method][stream.name] = result
            log("  " + pair_line(result))
    return collect(setup.config, pairs, setup.batch_size, setup.device)


def pair_line(r: dict[str, Any]) -> str:
    """One finished pair as a log line."""
    acc = f"accuracy {_pct(r['accuracy'])}%  " if r["accuracy"] is not None else ""
    skipped = f"  ({r['skipped_images']} unreadable images skipped)" if r["skipped_images"] else ""
    return (
        f"{LABELS[r['method']]:<11} {r['stream']}: {r['images']} images  {acc}mean confidence "
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
    header = ["stream", *(LABELS[m] for m in methods)]
    if labeled:
        rows = [[s, *(_pct(m["per_corruption"][s]) for m in methods.values())] for s in streams]
        rows.append(["mean", *(_pct(m["mean"]) for m in methods.values())])
    else:
        rows = [[s, *(f"{m['mean_confidence'][s]:.3f}" for m in methods.values())] for s in streams]
    return header, rows


def _what(results: dict[str, Any]) -> str:
    cfg = results["config"]
    labeled = all("per_corruption" in m for m in results["methods"].values())
    severity = f", severity {cfg['severity']}" if cfg["layout"] == "imagenet-c" else ""
    lrs = ", ".join(f"{LABELS[m]} {lr:g}" for m, lr in cfg["lrs"].items())
    return (
        f"{cfg['model']} on {cfg['data']} ({cfg['layout']}{severity}), batch {cfg['batch_size']}, loss "
        f"{cfg['loss']}, {'episodic' if cfg['episodic'] else 'reset per stream'}; lr {lrs or '-'}. "
        + ("Online accuracy in %." if labeled else "Unlabeled: mean confidence of the predictions.")
    )


def format_text(results: dict[str, Any]) -> str:
    """The terminal report."""
    return _what(results) + "\n" + _text_table(*_table(results))


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: settings, machine, the table, skipped images."""
    machine = results["machine"]
    skipped = {LABELS[m]: r["skipped_images"] for m, r in results["methods"].items() if r["skipped_images"]}
    parts = [
        "# Test-time adaptation of your model",
        "",
        f"{machine['device']}, torch {machine['torch']}, {machine['date_utc']} UTC.",
        "",
        _what(results),
        "",
        _md_table(*_table(results)),
    ]
    if skipped:
        parts += ["", "Unreadable images skipped: " + ", ".join(f"{m} {n}" for m, n in skipped.items()) + "."]
    return "\n".join(parts) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> bool:
    """PNG of batch accuracy against the number of updates before it (mean over streams); False
    when there is nothing to plot (unlabeled data) or matplotlib is not installed."""
    curves = {m: r["curve"] for m, r in results["methods"].items() if r.get("curve")}
    try:
        import matplotlib
    except ImportError:
        return False
    if not curves:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method, curve in curves.items():
        ax.plot(range(len(curve)), [100 * c for c in curve], marker=".", label=LABELS[method])
    ax.set_xlabel("updates before the batch")
    ax.set_ylabel("batch accuracy (%)")
    ax.set_title(
        f"{results['config']['model']}: mean over {len(results['config']['streams'])} stream(s)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    plt.close(fig)
    return True


def write_reports(results: dict[str, Any], out: Path) -> list[Path]:
    """``results.json``, ``results.md`` and (labeled data, matplotlib installed) the plot."""
    paths = [out / "results.json", out / "results.md"]
    atomic_write(paths[0], lambda fh: fh.write(_json_bytes(results)))
    atomic_write(paths[1], lambda fh: fh.write(format_markdown(results).encode()))
    if plot_curves(results, out / "accuracy_vs_updates.png"):
        paths.append(out / "accuracy_vs_updates.png")
    return paths
