"""The distribution-shift benchmark: NoAdapt, Tent (SGD), Adam and MGG on corrupted MNIST.

Protocol (per source model):

1. Source statistics for the FOA loss from clean training images.
2. Learning rates of every adapting method are tuned on the 4 *validation* corruptions only
   (the ``val`` split, labeled), on a small grid: the mean episodic online accuracy decides.
   For the MGG, each grid value is also the ``adapt_lr`` it is meta-trained with: the MGG is
   meta-trained on ≤ ``n_meta`` unlabeled validation-corruption images (a round-robin stream
   over the 4 corruptions), then scored like the baselines. A given MGG (``adapt`` command) is
   not retrained; only its step size is tuned.
3. Evaluation on the 15 test corruptions (``test`` split, severity 5), same batch size and loss
   for all methods: *episodic* (reset before each corruption) and *continual* (one stream over
   all 15, never reset).

Metrics. All accuracies are *online*: each batch is predicted with the parameters of that
moment, then adapted on. ``accuracy`` of a corruption is over all its images. ``acc@k`` is the
accuracy on the batch predicted after exactly ``k`` updates (the ``k+1``-th batch of a
corruption, episodic), averaged over the corruptions; the curve of ``acc@k`` for every ``k`` is
what the plot shows. Time is wall time per batch of predict+adapt, and of the optimizer step
alone.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mgg_fast.adaptation import MGTTA
from mgg_fast.losses import SourceStats, fit_source_stats
from mgg_fast.meta_training import train_mgg
from mgg_fast.mgg import MGG
from mgg_fast.norm_params import select_norm_params
from mgg_fast.shift_data import (
    ImageSet,
    atomic_write,
    check_corruption,
    corrupted_split,
    corruption_names,
    mnist_split,
    resolve_cache_dir,
    to_tensor,
)
from mgg_fast.source_models import ARCHS, source_model

METHODS = ("noadapt", "tent", "adam", "mgg")
OPTIMIZER_OF = {"tent": "sgd", "adam": "adam", "mgg": "mgg"}
LABELS = {"noadapt": "NoAdapt", "tent": "Tent (SGD)", "adam": "Adam", "mgg": "MGG"}
ACC_AT = (1, 5, 10)
MEMORY_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # --mgg-memory: MGG memory_W storage
# SGD's step scales with the gradient (tiny on small models' norm params): a wider, ×10 grid. Adam
# and MGG take normalised steps (the MGG's output is in (-1, 1)): the same ×5 grid for both.
DEFAULT_GRID = {
    "tent": (1e-3, 1e-2, 1e-1, 1.0),
    "adam": (2e-4, 1e-3, 5e-3, 2.5e-2),
    "mgg": (2e-4, 1e-3, 5e-3, 2.5e-2),
}

Batch = tuple[Tensor, Tensor]


def memory_dtype(name: str) -> torch.dtype | None:
    """The ``memory_W_dtype`` of a ``--mgg-memory`` name; ``ValueError`` for an unknown one."""
    if name not in MEMORY_DTYPES:
        raise ValueError(f"mgg-memory must be one of {', '.join(MEMORY_DTYPES)}, got {name!r}")
    return MEMORY_DTYPES[name]


@dataclass
class BenchmarkConfig:
    """Sizes and settings of one benchmark run (the defaults are the demo's)."""

    archs: tuple[str, ...] = ARCHS
    corruptions: tuple[str, ...] | None = None  # None: the 15 test corruptions
    val_corruptions: tuple[str, ...] | None = None  # None: the 4 validation corruptions
    severity: int = 5
    n_test: int = 256  # images per test corruption
    n_tune: int = 96  # labeled validation images per validation corruption, for lr tuning
    n_meta: int = 128  # unlabeled validation-corruption images for meta-training (all corruptions)
    batch_size: int = 16
    loss: str = "foa"
    n_stats: int = 512  # clean training images for the source statistics
    meta_epochs: int = 8
    mgg_lr: float = 1e-2
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_GRID))
    source_epochs: int | None = None  # None: each architecture's default
    n_train: int | None = None  # source-model training images; None: all 3,500
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    mgg_memory: str = "float32"  # storage of the MGG optimizer's memory matrices (MEMORY_DTYPES)

    def validate(self) -> None:
        """Raise ``ValueError`` for sizes or names that cannot work."""
        for name in ("n_test", "n_tune", "n_meta", "batch_size", "n_stats", "meta_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2 and self.loss == "foa":
            raise ValueError("batch-size must be at least 2 for the foa loss (it uses the batch std)")
        if not 1 <= self.severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {self.severity}")
        memory_dtype(self.mgg_memory)
        for arch in self.archs:
            if arch not in ARCHS:
                raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
        for name in (*self.test_corruptions(), *self.validation_corruptions()):
            check_corruption(name)
        for method, grid in self.lr_grid.items():
            if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
                raise ValueError(f"the {method} learning-rate grid must hold positive numbers, got {grid}")

    def test_corruptions(self) -> list[str]:
        return list(self.corruptions) if self.corruptions else corruption_names("test")

    def validation_corruptions(self) -> list[str]:
        return list(self.val_corruptions) if self.val_corruptions else corruption_names("validation")


# ---- running one method over streams of batches -------------------------------------------------


def make_batches(data: ImageSet, batch_size: int, device: torch.device | str) -> list[Batch]:
    """Consecutive batches ``(x, y)`` of a set, on ``device``."""
    x, y = to_tensor(data.images), torch.from_numpy(data.labels)
    return [
        (x[i : i + batch_size].to(device), y[i : i + batch_size]) for i in range(0, len(data), batch_size)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One method on a private copy of the model: predict a batch, then adapt on it (timed)."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        *,
        lr: float | None = None,
        mgg: MGG | None = None,
        stats: SourceStats | None = None,
        loss: str = "foa",
        backend: str = "auto",
        mgg_memory: str = "float32",
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        memory_W_dtype = memory_dtype(mgg_memory)
        self.model = copy.deepcopy(model)
        self.device = next(self.model.parameters()).device
        self.adapter: MGTTA | None = None
        if method == "noadapt":
            self.model.eval()
        else:
            self.adapter = MGTTA(
                self.model,
                optimizer=OPTIMIZER_OF[method],
                mgg=mgg,
                lr=lr,
                loss=loss,
                source_stats=stats,
                backend=backend,
                memory_W_dtype=memory_W_dtype if method == "mgg" else None,
            )
        self.seconds = 0.0
        self.step_seconds = 0.0
        self.batches = 0

    def reset(self) -> None:
        """Back to the source model and a fresh optimizer state."""
        if self.adapter is not None:
            self.adapter.reset()

    def __call__(self, x: Tensor) -> Tensor:
        """Logits of ``x`` under the current parameters; adapts on ``x`` afterwards."""
        _sync(self.device)
        start = time.perf_counter()
        if self.adapter is None:
            with torch.no_grad():
                logits = self.model(x)
        else:
            logits = self.adapter.forward_backward(x)
            _sync(self.device)
            step_start = time.perf_counter()
            self.adapter.step()
            _sync(self.device)
            self.step_seconds += time.perf_counter() - step_start
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return logits

    def run(self, batches: list[Batch]) -> list[tuple[int, int]]:
        """``(correct, size)`` per batch of one stream, in order (no reset)."""
        out = []
        for x, y in batches:
            pred = self(x).argmax(1).cpu()
            out.append((int((pred == y).sum()), len(y)))
        return out


def _accuracy(counts: list[tuple[int, int]]) -> float:
    return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))


def episodic_accuracy(runner: Runner, streams: dict[str, list[Batch]]) -> dict[str, list[tuple[int, int]]]:
    """Per-batch counts of every stream, resetting the runner before each."""
    result = {}
    for name, batches in streams.items():
        runner.reset()
        result[name] = runner.run(batches)
    return result


def summarize(per_stream: dict[str, list[tuple[int, int]]], batch_size: int) -> dict[str, Any]:
    """Accuracy per stream and mean, the ``acc@k`` curve and ``acc@1/5/10`` (see the module doc).

    ``curve[k]`` averages over the streams that have a full-size batch ``k`` (so every point
    weighs the same number of images per corruption).
    """
    per = {name: _accuracy(counts) for name, counts in per_stream.items()}
    length = max((len(c) for c in per_stream.values()), default=0)
    curve = []
    for k in range(length):
        accs = [c[k][0] / c[k][1] for c in per_stream.values() if len(c) > k and c[k][1] == batch_size]
        if not accs:
            break
        curve.append(float(np.mean(accs)))
    return {
        "per_corruption": per,
        "mean": float(np.mean(list(per.values()))) if per else float("nan"),
        "curve": curve,
        "acc_at": {str(k): (curve[k] if k < len(curve) else None) for k in ACC_AT},
    }


# ---- the protocol ---------------------------------------------------------------------------------


def _streams(
    split: str, names: list[str], n: int, cfg: BenchmarkConfig, cache: Path, device: torch.device
) -> dict[str, list[Batch]]:
    return {
        name: make_batches(
            corrupted_split(split, name, cfg.severity, n, seed=cfg.seed, cache_dir=cache),
            cfg.batch_size,
            device,
        )
        for name in names
    }


def meta_batches(cfg: BenchmarkConfig, cache: Path, device: torch.device) -> list[Tensor]:
    """≤ ``n_meta`` unlabeled validation images, round-robin over the validation corruptions."""
    names = cfg.validation_corruptions()
    per = max(1, cfg.n_meta // len(names))
    streams = _streams("val", names, per, cfg, cache, device)
    out = []
    for k in range(max(len(s) for s in streams.values())):
        out.extend(s[k][0] for s in streams.values() if k < len(s))
    return out


def clean_source_stats(model: nn.Module, n_images: int = 512) -> SourceStats:
    """FOA source statistics of ``model`` from the first ``n_images`` clean training images."""
    device = next(model.parameters()).device
    clean = make_batches(mnist_split("train", n_images), 64, device)
    return fit_source_stats(model, (x for x, _ in clean))


def _runner(
    model: nn.Module,
    method: str,
    cfg: BenchmarkConfig,
    *,
    lr: float | None,
    mgg: MGG | None,
    stats: SourceStats | None,
) -> Runner:
    return Runner(
        model,
        method,
        lr=lr,
        mgg=mgg,
        stats=stats,
        loss=cfg.loss,
        backend=cfg.backend,
        mgg_memory=cfg.mgg_memory,
    )


def _tune(
    method: str,
    model: nn.Module,
    tune: dict[str, list[Batch]],
    cfg: BenchmarkConfig,
    stats: SourceStats | None,
    make_mgg: Callable[[float], MGG] | None,
) -> tuple[float, MGG | None, dict[str, float]]:
    """Best learning rate on the validation streams: ``(lr, mgg at that lr, {lr: score})``."""
    scores: dict[str, float] = {}
    best: tuple[float, float, MGG | None] = (-1.0, 0.0, None)
    for lr in cfg.lr_grid[method]:
        mgg = make_mgg(lr) if make_mgg is not None else None
        runner = _runner(model, method, cfg, lr=lr, mgg=mgg, stats=stats)
        score = summarize(episodic_accuracy(runner, tune), cfg.batch_size)["mean"]
        scores[f"{lr:g}"] = score
        if score > best[0]:
            best = (score, lr, mgg)
    return best[1], best[2], scores


def _evaluate(
    method: str,
    model: nn.Module,
    streams: dict[str, list[Batch]],
    cfg: BenchmarkConfig,
    *,
    lr: float | None,
    mgg: MGG | None,
    stats: SourceStats | None,
) -> dict[str, Any]:
    runner = _runner(model, method, cfg, lr=lr, mgg=mgg, stats=stats)
    episodic = summarize(episodic_accuracy(runner, streams), cfg.batch_size)
    timing = {
        "ms_per_batch": 1e3 * runner.seconds / runner.batches,
        "step_ms_per_batch": 1e3 * runner.step_seconds / runner.batches,
    }
    runner.reset()
    continual = {name: runner.run(batches) for name, batches in streams.items()}
    return {
        "lr": lr,
        "episodic": episodic,
        "continual": summarize(continual, cfg.batch_size),
        **timing,
    }


def run_arch(
    arch: str,
    cfg: BenchmarkConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    mgg: MGG | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _message: None,
) -> dict[str, Any]:
    """The whole protocol for one source architecture; returns its JSON-ready results.

    ``log`` receives one line per finished stage (source model, data, tuning, evaluation)."""
    device = torch.device(cfg.device)
    cache = resolve_cache_dir(cache_dir)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    src = source_model(
        arch,
        epochs=cfg.source_epochs,
        n_train=cfg.n_train,
        seed=cfg.seed,
        cache_dir=cache,
        device=device,
        progress=progress,
    )
    timings["source_model"] = time.perf_counter() - start
    how = "loaded from cache" if src.from_cache else f"trained in {src.train_seconds:.0f} s"
    log(f"{arch}: source model {how}, clean test accuracy {_pct(src.clean_accuracy)}%")
    model = src.model
    start = time.perf_counter()
    test = _streams("test", cfg.test_corruptions(), cfg.n_test, cfg, cache, device)
    tune = _streams("val", cfg.validation_corruptions(), cfg.n_tune, cfg, cache, device)
    meta = meta_batches(cfg, cache, device) if mgg is None else []
    timings["data"] = time.perf_counter() - start
    log(f"{arch}: corrupted data ready in {timings['data']:.0f} s")
    stats = clean_source_stats(model, cfg.n_stats) if cfg.loss == "foa" else None

    def meta_train(adapt_lr: float) -> MGG:
        return train_mgg(
            copy.deepcopy(model),
            meta,
            epochs=cfg.meta_epochs,
            mgg_lr=cfg.mgg_lr,
            adapt_lr=adapt_lr,
            loss=cfg.loss,
            source_stats=stats,
            seed=cfg.seed,
            progress=False,
        ).to(device)

    start = time.perf_counter()
    chosen: dict[str, tuple[float | None, MGG | None]] = {"noadapt": (None, None)}
    tuning: dict[str, dict[str, float]] = {}
    bar = tqdm(("tent", "adam", "mgg"), desc=f"{arch}: tune lr", disable=not progress, leave=False)
    for method in bar:
        make_mgg = (meta_train if mgg is None else lambda _lr: mgg) if method == "mgg" else None
        lr, trained, tuning[method] = _tune(method, model, tune, cfg, stats, make_mgg)
        chosen[method] = (lr, trained)
    timings["tune_and_meta_train"] = time.perf_counter() - start
    lrs = ", ".join(f"{LABELS[m]} {chosen[m][0]:g}" for m in tuning)
    what = "learning rates tuned" if mgg else "learning rates tuned and MGG meta-trained"
    log(f"{arch}: {what} in {timings['tune_and_meta_train']:.0f} s: {lrs}")

    start = time.perf_counter()
    methods = {}
    for method in tqdm(METHODS, desc=f"{arch}: evaluate", disable=not progress, leave=False):
        lr, method_mgg = chosen[method]
        methods[method] = _evaluate(method, model, test, cfg, lr=lr, mgg=method_mgg, stats=stats)
    timings["evaluate"] = time.perf_counter() - start
    log(f"{arch}: evaluated in {timings['evaluate']:.0f} s")
    return {
        "source": {
            "config": asdict(src.config),
            "clean_accuracy": src.clean_accuracy,
            "train_seconds": src.train_seconds,
            "from_cache": src.from_cache,
            "parameters": sum(p.numel() for p in model.parameters()),
            "adapted_parameters": sum(p.numel() for _, p in select_norm_params(model)),
        },
        "tuning": tuning,
        "methods": methods,
        "seconds": timings,
    }


def run_benchmark(
    cfg: BenchmarkConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    mgg: MGG | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _message: None,
) -> dict[str, Any]:
    """Run the benchmark for every architecture of ``cfg``; JSON-ready results with run details."""
    cfg.validate()
    start = time.perf_counter()
    archs = {
        arch: run_arch(arch, cfg, cache_dir=cache_dir, mgg=mgg, progress=progress, log=log)
        for arch in cfg.archs
    }
    return {
        "format": "mgg_fast.shift_benchmark/v1",
        "config": {
            **asdict(cfg),
            "corruptions": cfg.test_corruptions(),
            "val_corruptions": cfg.validation_corruptions(),
        },
        "machine": machine_info(cfg.device),
        "archs": archs,
        "wall_seconds": time.perf_counter() - start,
        "given_mgg": mgg is not None,
    }


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = torch.device(device)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---- reports ---------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary_rows(arch_result: dict[str, Any]) -> list[list[str]]:
    """One row per method: lr, episodic mean, continual mean, acc@1/5/10, ms per batch, step ms."""
    rows = []
    for method, r in arch_result["methods"].items():
        rows.append(
            [
                LABELS[method],
                "–" if r["lr"] is None else f"{r['lr']:g}",
                _pct(r["episodic"]["mean"]),
                _pct(r["continual"]["mean"]),
                *(_pct(r["episodic"]["acc_at"][str(k)]) for k in ACC_AT),
                f"{r['ms_per_batch']:.1f}",
                "–" if r["lr"] is None else f"{r['step_ms_per_batch']:.2f}",
            ]
        )
    return rows


SUMMARY_HEADER = [
    "method",
    "lr",
    "episodic",
    "continual",
    *(f"acc@{k}" for k in ACC_AT),
    "ms/batch",
    "step ms",
]


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def corruption_rows(arch_result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-corruption episodic accuracy (rows) of each method (columns), then the means."""
    methods = arch_result["methods"]
    names = list(next(iter(methods.values()))["episodic"]["per_corruption"])
    header = ["corruption", *(LABELS[m] for m in methods)]
    rows = [[n, *(_pct(r["episodic"]["per_corruption"][n]) for r in methods.values())] for n in names]
    rows.append(["mean (episodic)", *(_pct(r["episodic"]["mean"]) for r in methods.values())])
    rows.append(["mean (continual)", *(_pct(r["continual"]["mean"]) for r in methods.values())])
    return header, rows


def _arch_title(arch: str, r: dict[str, Any]) -> str:
    src = r["source"]
    return (
        f"{arch}: {src['parameters']:,} parameters ({src['adapted_parameters']:,} adapted), "
        f"clean test accuracy {_pct(src['clean_accuracy'])}%"
    )


def _memory_note(cfg: dict[str, Any]) -> str:
    memory = cfg.get("mgg_memory", "float32")
    return "" if memory == "float32" else f"; MGG memory_W stored as {memory}"


def format_text(results: dict[str, Any]) -> str:
    """The terminal report: per architecture, the summary table and the per-corruption table."""
    cfg = results["config"]
    parts = [
        f"Corrupted MNIST, severity {cfg['severity']}, {len(cfg['corruptions'])} corruptions × "
        f"{cfg['n_test']} images, batch {cfg['batch_size']}, loss {cfg['loss']} (accuracy in %, online)"
        + _memory_note(cfg)
    ]
    for arch, r in results["archs"].items():
        parts += ["", _arch_title(arch, r), _text_table(SUMMARY_HEADER, summary_rows(r)), ""]
        parts.append(_text_table(*corruption_rows(r)))
    return "\n".join(parts)


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: settings, definitions, and the tables of :func:`format_text`."""
    cfg, machine = results["config"], results["machine"]
    parts = [
        "# Distribution-shift benchmark (corrupted MNIST)",
        "",
        f"{machine['device']}, torch {machine['torch']}, {machine['date_utc']} UTC; "
        f"wall time {results['wall_seconds']:.0f} s.",
        "",
        f"Severity {cfg['severity']}; {len(cfg['corruptions'])} test corruptions × {cfg['n_test']} images; "
        f"batch {cfg['batch_size']}; loss `{cfg['loss']}`; learning rates tuned on "
        f"{', '.join(cfg['val_corruptions'])} ({cfg['n_tune']} val images each); MGG "
        + (
            "given (not retrained)."
            if results["given_mgg"]
            else f"meta-trained on {cfg['n_meta']} unlabeled "
            f"validation-corruption images, {cfg['meta_epochs']} epochs."
        )
        + _memory_note(cfg),
        "",
        "Accuracies are online (%): each batch is predicted, then adapted on. *episodic*: reset before "
        "each corruption; *continual*: one stream over all corruptions. *acc@k*: accuracy on the batch "
        "predicted after exactly k updates, mean over corruptions (episodic). *ms/batch*: predict + "
        "adapt; *step ms*: the optimizer step alone.",
    ]
    for arch, r in results["archs"].items():
        parts += ["", f"## {_arch_title(arch, r)}", "", _md_table(SUMMARY_HEADER, summary_rows(r)), ""]
        parts.append(_md_table(*corruption_rows(r)))
        tuned = "; ".join(
            f"{LABELS[m]}: " + ", ".join(f"{lr} → {_pct(s)}" for lr, s in scores.items())
            for m, scores in r["tuning"].items()
        )
        parts += ["", f"Validation accuracy per learning rate: {tuned}."]
    return "\n".join(parts) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """PNG of acc@k against k (number of updates), one panel per architecture, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = results["archs"]
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.2), squeeze=False)
    for ax, (arch, r) in zip(axes[0], archs.items(), strict=True):
        for method, m in r["methods"].items():
            curve = m["episodic"]["curve"]
            ax.plot(range(len(curve)), [100 * c for c in curve], marker=".", label=LABELS[method])
        ax.set_title(f"{arch} (clean {_pct(r['source']['clean_accuracy'])}%)", fontsize=10)
        ax.set_xlabel("updates before the batch")
        ax.set_ylabel("batch accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Corrupted MNIST (severity {results['config']['severity']}), mean over corruptions, episodic",
        fontsize=10,
    )
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    plt.close(fig)


def write_reports(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``accuracy_vs_updates.png`` under ``out_dir``."""
    out = Path(out_dir)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "plot": out / "accuracy_vs_updates.png",
    }
    atomic_write(paths["json"], lambda fh: fh.write(json.dumps(results, indent=1).encode()))
    atomic_write(paths["markdown"], lambda fh: fh.write(format_markdown(results).encode()))
    plot_curves(results, paths["plot"])
    return paths
