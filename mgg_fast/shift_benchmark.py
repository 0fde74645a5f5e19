"""The distribution-shift benchmark on corrupted MNIST: NoAdapt, Tent, Adam, SAR, EATA and MGG.

Protocol, per source architecture and per seed (the seed draws the source model's training,
the corruptions and the MGG's initialisation):

1. Source statistics for the FOA loss, and EATA's Fisher, from clean training images.
2. Learning rates of every adapting method are tuned on the 4 *validation* corruptions only
   (the labeled ``val`` split), on a small grid, separately for the two settings: the mean
   episodic online accuracy over the 4 corruptions chooses the episodic lr, the online
   accuracy of one continual validation stream (the 4 corruptions one after the other, never
   reset) chooses the continual lr. The test corruptions are never used for a choice.
3. The MGG is meta-trained on unlabeled validation-corruption images by a :class:`MetaRecipe`
   (several recipes can run side by side against the same baselines): ``demo`` (the fast
   default: meta-trained once per grid lr, with that lr, and tuned like the baselines),
   ``published`` (the MGTTA recipe: batch 2, 40 epochs, train adapt lr 1e-4, eval lr 1e-3,
   shuffled, per-epoch validation keeping the best epoch, drifting norm params) and ``unroll``
   (K = 4 step truncated unrolls on streams that switch corruptions, at the evaluation batch).
   A given MGG (``adapt`` command) is not retrained; only its step size is tuned.
4. Evaluation on the 15 test corruptions (``test`` split, all its images, severity 5), same
   batch size for all methods: *episodic* (reset before each corruption) and *continual* (one
   stream over all 15, never reset).

Metrics. All accuracies are *online*: each batch is predicted with the parameters of that
moment, then adapted on. ``accuracy`` of a corruption is over all its images. ``acc@k`` is the
accuracy on the batch predicted after exactly ``k`` updates (the ``k+1``-th batch of a
corruption, episodic), averaged over the corruptions. ``updates_to_tent`` is the first ``k``
whose ``acc@k`` reaches Tent's final accuracy (the mean of Tent's last 3 ``acc@k``), ``None``
if never. Over seeds: the mean, a 95% confidence interval from the t-distribution, and the
*paired* per-seed differences MGG − Tent and MGG − Adam with their own intervals. Time is wall
time per batch of predict+adapt, and of the optimizer step alone.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mgg_fast.adaptation import MGTTA
from mgg_fast.baselines import EATA, SAR, eata_fisher
from mgg_fast.distributed import rank_zero_first
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

METHODS = ("noadapt", "tent", "adam", "sar", "eata", "mgg")
BASELINES = ("tent", "adam", "sar", "eata")  # the tuned, hand-made adapting methods
SETTINGS = ("episodic", "continual")
OPTIMIZER_OF = {"tent": "sgd", "adam": "adam", "mgg": "mgg"}
LABELS = {
    "noadapt": "NoAdapt",
    "tent": "Tent (SGD)",
    "adam": "Adam",
    "sar": "SAR",
    "eata": "EATA",
    "mgg": "MGG",
}
ACC_AT = (1, 5, 10)
FINAL_POINTS = 3  # Tent's final accuracy: the mean of its last 3 acc@k
EATA_D_MARGIN = 0.4  # EATA's redundancy margin on the 10-class scale (ImageNet: 0.05); SHIFT_RESULTS.md
MEMORY_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # --mgg-memory: MGG memory_W storage
# SGD's step scales with the gradient (tiny on small models' norm params): a wider, ×10 grid. Adam
# and MGG take normalised steps (the MGG's output is in (-1, 1)): the same ×5 grid for both.
DEFAULT_GRID = {
    "tent": (1e-3, 1e-2, 1e-1, 1.0),
    "adam": (2e-4, 1e-3, 5e-3, 2.5e-2),
    "mgg": (2e-4, 1e-3, 5e-3, 2.5e-2),
}
SGD_GRID = {"sar": DEFAULT_GRID["tent"], "eata": DEFAULT_GRID["tent"]}  # SAR and EATA step with SGD

Batch = tuple[Tensor, Tensor]


def memory_dtype(name: str) -> torch.dtype | None:
    """The ``memory_W_dtype`` of a ``--mgg-memory`` name; ``ValueError`` for an unknown one."""
    if name not in MEMORY_DTYPES:
        raise ValueError(f"mgg-memory must be one of {', '.join(MEMORY_DTYPES)}, got {name!r}")
    return MEMORY_DTYPES[name]


@dataclass(frozen=True)
class MetaRecipe:
    """How the benchmark meta-trains an MGG on the validation corruptions.

    ``None`` sizes take the benchmark's (``batch_size``: the evaluation batch; ``epochs`` /
    ``n_meta``: ``meta_epochs`` / ``n_meta``). ``adapt_lr=None``: one MGG per grid lr, trained
    with that lr; ``eval_lr=None``: the lr (and so the MGG) is tuned per setting like the
    baselines' lrs. ``stream``: ``"round_robin"`` (one batch of each corruption in turn) or
    ``"blocks"`` (consecutive batches of one corruption, then the next: a stream that switches).
    """

    name: str
    batch_size: int | None = None
    epochs: int | None = None
    n_meta: int | None = None
    adapt_lr: float | None = None
    eval_lr: float | None = None
    unroll: int = 1
    shuffle: bool = False
    validate: bool = False  # per-epoch validation (episodic accuracy on the tuning streams), best kept
    reset_params: bool = True  # False: the norm params drift across epochs (published init_state)
    stream: str = "round_robin"

    @property
    def method(self) -> str:
        """The result key of this recipe's MGG: ``mgg`` for the demo recipe, else ``mgg-<name>``."""
        return "mgg" if self.name == "demo" else f"mgg-{self.name}"


RECIPES = {
    "demo": MetaRecipe("demo"),
    "published": MetaRecipe(
        "published",
        batch_size=2,
        epochs=40,
        n_meta=128,
        adapt_lr=1e-4,
        eval_lr=1e-3,
        shuffle=True,
        validate=True,
        reset_params=False,
    ),
    "unroll": MetaRecipe("unroll", n_meta=512, unroll=4, stream="blocks"),
}


def recipe_of(spec: str | MetaRecipe) -> MetaRecipe:
    """A recipe by name (:data:`RECIPES`) or as given; ``ValueError`` for an unknown name."""
    if isinstance(spec, MetaRecipe):
        return spec
    if spec not in RECIPES:
        raise ValueError(f"unknown meta-training recipe {spec!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[spec]


def label(method: str) -> str:
    """Display name of a result key (``mgg-published`` → ``MGG (published)``)."""
    if method.startswith("mgg-"):
        return f"MGG ({method[4:]})"
    return LABELS[method]


@dataclass
class BenchmarkConfig:
    """Sizes and settings of one benchmark run (the defaults are the demo's)."""

    archs: tuple[str, ...] = ARCHS
    corruptions: tuple[str, ...] | None = None  # None: the 15 test corruptions
    val_corruptions: tuple[str, ...] | None = None  # None: the 4 validation corruptions
    severity: int = 5
    n_test: int | None = None  # images per test corruption; None: all 1,000 of the split
    n_tune: int = 128  # labeled validation images per validation corruption, for lr tuning
    n_meta: int = 256  # unlabeled validation-corruption images for meta-training (all corruptions)
    batch_size: int = 64
    loss: str = "foa"
    n_stats: int = 512  # clean training images for the source statistics and EATA's Fisher
    meta_epochs: int = 8
    mgg_lr: float = 1e-2
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: {**DEFAULT_GRID, **SGD_GRID})
    recipes: tuple[str | MetaRecipe, ...] = ("demo",)
    source_epochs: int | None = None  # None: each architecture's default
    n_train: int | None = None  # source-model training images; None: all 3,500
    seed: int = 0  # the first seed
    n_seeds: int = 1  # seeds seed, seed + 1, ...
    threads: int | None = None  # torch intra-op threads for the run; None: leave torch's setting
    device: str = "cpu"
    backend: str = "auto"
    mgg_memory: str = "float32"  # storage of the MGG optimizer's memory matrices (MEMORY_DTYPES)

    def validate(self) -> None:
        """Raise ``ValueError`` for sizes or names that cannot work."""
        for name in ("n_tune", "n_meta", "batch_size", "n_stats", "meta_epochs", "n_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"n-test must be positive, got {self.n_test}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")
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
        recipes = [recipe_of(r) for r in self.recipes]
        if not recipes or len({r.method for r in recipes}) != len(recipes):
            raise ValueError("recipes must name at least one meta-training recipe, each once")
        for r in recipes:
            if r.stream not in ("round_robin", "blocks"):
                raise ValueError(f"recipe {r.name!r}: stream must be round_robin or blocks, got {r.stream!r}")

    def test_corruptions(self) -> list[str]:
        return list(self.corruptions) if self.corruptions else corruption_names("test")

    def validation_corruptions(self) -> list[str]:
        return list(self.val_corruptions) if self.val_corruptions else corruption_names("validation")

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n_seeds))


# ---- running one method over streams of batches -------------------------------------------------


def make_batches(
    data: ImageSet,
    batch_size: int,
    device: torch.device | str,
    to_input: Callable[[np.ndarray], Tensor] = to_tensor,
) -> list[Batch]:
    """Consecutive batches ``(x, y)`` of a set, on ``device``; ``to_input`` turns the uint8 images
    into the model's input (default: the bundled models' [-1, 1] scaling)."""
    x, y = to_input(data.images), torch.from_numpy(data.labels)
    return [
        (x[i : i + batch_size].to(device), y[i : i + batch_size]) for i in range(0, len(data), batch_size)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One method on a private copy of the model: predict a batch, then adapt on it (timed).

    ``fisher`` (EATA's, from :func:`eata_fisher`) and ``eata_d_margin`` (its redundancy margin:
    the 10-class value by default, 0.05 for 1,000 classes) are used by ``"eata"`` only; a ``None``
    Fisher runs EATA without its regulariser. SAR and EATA keep their own entropy objectives.

    ``data_parallel`` (every rank of the process group calls the runner on the same whole
    batches): Tent, Adam and MGG adapt data-parallel (``MGTTA(whole_batches=True)``: each rank
    its part, the whole batch's logits returned); NoAdapt, SAR and EATA run the whole batch on
    every rank (the same computation, so the same result).
    """

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
        fisher: list[Tensor] | None = None,
        data_parallel: bool = False,
        eata_d_margin: float = EATA_D_MARGIN,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        memory_W_dtype = memory_dtype(mgg_memory)
        self.model = copy.deepcopy(model)
        self.device = next(self.model.parameters()).device
        self.adapter: MGTTA | None = None
        if method == "noadapt":
            self.model.eval()
        elif method == "sar":
            self.adapter = SAR(self.model, lr=lr)
        elif method == "eata":
            self.adapter = EATA(self.model, lr=lr, fisher=fisher, d_margin=eata_d_margin)
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
                data_parallel=data_parallel,
                whole_batches=data_parallel,
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


def continual_accuracy(runner: Runner, streams: dict[str, list[Batch]]) -> dict[str, list[tuple[int, int]]]:
    """Per-batch counts of the streams run one after the other from one reset (never reset again)."""
    runner.reset()
    return {name: runner.run(batches) for name, batches in streams.items()}


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


def updates_to_reach(curve: list[float], target: float) -> int | None:
    """The first ``k`` with ``curve[k] >= target``; ``None`` if the curve never gets there."""
    return next((k for k, acc in enumerate(curve) if acc >= target), None)


def final_accuracy(curve: list[float]) -> float:
    """The mean of the last :data:`FINAL_POINTS` points of an ``acc@k`` curve."""
    return float(np.mean(curve[-FINAL_POINTS:])) if curve else float("nan")


def mark_updates_to_tent(methods: dict[str, dict[str, Any]]) -> None:
    """Set every method's ``updates_to_tent`` (see the module doc) in place; ``None`` without Tent."""
    target = final_accuracy(methods["tent"]["episodic"]["curve"]) if "tent" in methods else None
    for r in methods.values():
        r["updates_to_tent"] = None if target is None else updates_to_reach(r["episodic"]["curve"], target)


# ---- statistics over seeds ------------------------------------------------------------------------


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


def aggregate(seed_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the seeds of one architecture: :func:`aggregate_methods` with the paired MGG − Tent /
    MGG − Adam differences, and the source model's clean accuracy."""
    methods = list(seed_runs[0]["methods"])
    pairs = [
        (m, base) for m in methods if m.startswith("mgg") for base in ("tent", "adam") if base in methods
    ]
    out = aggregate_methods(seed_runs, pairs)
    out["clean_accuracy"] = mean_ci([r["source"]["clean_accuracy"] for r in seed_runs])
    return out


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


# ---- the protocol ---------------------------------------------------------------------------------


def _streams(
    split: str,
    names: list[str],
    n: int | None,
    cfg: BenchmarkConfig,
    seed: int,
    cache: Path,
    device: torch.device,
) -> dict[str, list[Batch]]:
    return {
        name: make_batches(
            corrupted_split(split, name, cfg.severity, n, seed=seed, cache_dir=cache), cfg.batch_size, device
        )
        for name in names
    }


def meta_batches(
    cfg: BenchmarkConfig,
    cache: Path,
    device: torch.device,
    *,
    recipe: MetaRecipe | None = None,
    seed: int | None = None,
) -> list[Tensor]:
    """≤ ``n_meta`` unlabeled validation images in batches of the recipe's size, as its stream
    orders them: round-robin over the validation corruptions, or in blocks of one corruption."""
    recipe = recipe or RECIPES["demo"]
    names = cfg.validation_corruptions()
    per = max(1, (recipe.n_meta or cfg.n_meta) // len(names))
    sized = copy.copy(cfg)
    sized.batch_size = recipe.batch_size or cfg.batch_size
    streams = _streams("val", names, per, sized, cfg.seed if seed is None else seed, cache, device)
    if recipe.stream == "blocks":
        return [x for s in streams.values() for x, _ in s]
    out = []
    for k in range(max(len(s) for s in streams.values())):
        out.extend(s[k][0] for s in streams.values() if k < len(s))
    return out


def clean_batches(n_images: int, batch_size: int, device: torch.device) -> list[Batch]:
    """The first ``n_images`` clean training images, in batches."""
    return make_batches(mnist_split("train", n_images), batch_size, device)


def clean_source_stats(model: nn.Module, n_images: int = 512) -> SourceStats:
    """FOA source statistics of ``model`` from the first ``n_images`` clean training images."""
    device = next(model.parameters()).device
    return fit_source_stats(model, (x for x, _ in clean_batches(n_images, 64, device)))


@dataclass
class _Context:
    """What one (architecture, seed) run shares between tuning, meta-training and evaluation."""

    cfg: BenchmarkConfig
    model: nn.Module
    stats: SourceStats | None
    fisher: list[Tensor]
    tune: dict[str, list[Batch]]
    data_parallel: bool = False

    def runner(self, method: str, lr: float | None, mgg: MGG | None = None) -> Runner:
        cfg = self.cfg
        return Runner(
            self.model,
            method,
            lr=lr,
            mgg=mgg,
            stats=self.stats,
            loss=cfg.loss,
            backend=cfg.backend,
            mgg_memory=cfg.mgg_memory,
            fisher=self.fisher,
            data_parallel=self.data_parallel,
        )

    def validation_scores(self, method: str, lr: float, mgg: MGG | None = None) -> dict[str, float]:
        """Online accuracy on the validation corruptions: episodic mean and one continual stream."""
        runner = self.runner(method, lr, mgg)
        bs = self.cfg.batch_size
        return {
            "episodic": summarize(episodic_accuracy(runner, self.tune), bs)["mean"],
            "continual": _accuracy([c for cs in continual_accuracy(runner, self.tune).values() for c in cs]),
        }


def _tune(
    ctx: _Context, method: str, candidates: list[tuple[float, MGG | None]]
) -> tuple[dict[str, tuple[float, MGG | None]], dict[str, dict[str, float]]]:
    """The best ``(lr, mgg)`` per setting on the validation streams, and every candidate's scores."""
    scores: dict[str, dict[str, float]] = {s: {} for s in SETTINGS}
    best: dict[str, tuple[float, float, MGG | None]] = {}
    for lr, mgg in candidates:
        for setting, score in ctx.validation_scores(method, lr, mgg).items():
            scores[setting][f"{lr:g}"] = score
            if setting not in best or score > best[setting][0]:
                best[setting] = (score, lr, mgg)
    return {s: (best[s][1], best[s][2]) for s in SETTINGS}, scores


def _meta_train(
    ctx: _Context, recipe: MetaRecipe, batches: list[Tensor], adapt_lr: float, eval_lr: float, seed: int
) -> tuple[MGG, list[dict[str, float]]]:
    """One MGG by ``recipe`` (validation at ``eval_lr`` after each epoch if the recipe says so)."""
    cfg = ctx.cfg
    history: list[dict[str, float]] = []
    validate = (lambda m: ctx.validation_scores("mgg", eval_lr, m)["episodic"]) if recipe.validate else None
    mgg = train_mgg(
        copy.deepcopy(ctx.model),
        batches,
        epochs=recipe.epochs or cfg.meta_epochs,
        mgg_lr=cfg.mgg_lr,
        adapt_lr=adapt_lr,
        loss=cfg.loss,
        source_stats=ctx.stats,
        seed=seed,
        validate=validate,
        progress=False,
        unroll=recipe.unroll,
        shuffle=recipe.shuffle,
        reset_params=recipe.reset_params,
        history=history,
    )
    return mgg.to(next(ctx.model.parameters()).device), history


def evaluate(
    make_runner: Callable[[float | None, MGG | None], Runner],
    chosen: dict[str, tuple[float | None, MGG | None]],
    streams: dict[str, list[Batch]],
    batch_size: int,
) -> dict[str, Any]:
    """Episodic and continual online accuracy on the test streams, each setting with its own
    ``(lr, mgg)`` of ``chosen`` (one runner for both when they are the same), and the time per
    batch of the episodic run."""
    lr, mgg = chosen["episodic"]
    runner = make_runner(lr, mgg)
    episodic = summarize(episodic_accuracy(runner, streams), batch_size)
    timing = {
        "ms_per_batch": 1e3 * runner.seconds / runner.batches,
        "step_ms_per_batch": 1e3 * runner.step_seconds / runner.batches,
    }
    lr_c, mgg_c = chosen["continual"]
    if (lr_c, mgg_c) != (lr, mgg):
        runner = make_runner(lr_c, mgg_c)
    continual = summarize(continual_accuracy(runner, streams), batch_size)
    return {"lr": {s: chosen[s][0] for s in SETTINGS}, "episodic": episodic, "continual": continual, **timing}


def run_seed(
    arch: str,
    seed: int,
    cfg: BenchmarkConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    mgg: MGG | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _message: None,
    data_parallel: bool = False,
) -> dict[str, Any]:
    """The whole protocol for one source architecture and one seed; JSON-ready results.

    ``log`` receives one line per finished stage (source model, data, tuning, evaluation).
    ``data_parallel``: every rank of the process group runs this with the same arguments; rank 0
    trains and caches the source model and data first, Tent, Adam and the given MGG adapt
    data-parallel (see :class:`Runner`)."""
    device = torch.device(cfg.device)
    cache = resolve_cache_dir(cache_dir)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with rank_zero_first(data_parallel):  # the others then read rank 0's cache
        src = source_model(
            arch,
            epochs=cfg.source_epochs,
            n_train=cfg.n_train,
            seed=seed,
            cache_dir=cache,
            device=device,
            progress=progress,
        )
        timings["source_model"] = time.perf_counter() - start
        start = time.perf_counter()
        test = _streams("test", cfg.test_corruptions(), cfg.n_test, cfg, seed, cache, device)
        tune = _streams("val", cfg.validation_corruptions(), cfg.n_tune, cfg, seed, cache, device)
        recipes = [] if mgg is not None else [recipe_of(r) for r in cfg.recipes]
        metas = {r.method: meta_batches(cfg, cache, device, recipe=r, seed=seed) for r in recipes}
        timings["data"] = time.perf_counter() - start
    how = "loaded from cache" if src.from_cache else f"trained in {src.train_seconds:.0f} s"
    tag = f"{arch} seed {seed}"
    log(f"{tag}: source model {how}, clean test accuracy {_pct(src.clean_accuracy)}%")
    model = src.model
    log(f"{tag}: corrupted data ready in {timings['data']:.0f} s")
    stats = clean_source_stats(model, cfg.n_stats) if cfg.loss == "foa" else None
    fisher = eata_fisher(model, clean_batches(cfg.n_stats, cfg.batch_size, device))
    ctx = _Context(cfg, model, stats, fisher, tune, data_parallel)

    start = time.perf_counter()
    chosen: dict[str, dict[str, tuple[float | None, MGG | None]]] = {
        "noadapt": {s: (None, None) for s in SETTINGS}
    }
    tuning: dict[str, Any] = {}
    for method in tqdm(BASELINES, desc=f"{tag}: tune lr", disable=not progress, leave=False):
        chosen[method], tuning[method] = _tune(ctx, method, [(lr, None) for lr in cfg.lr_grid[method]])
    if mgg is not None:
        chosen["mgg"], tuning["mgg"] = _tune(ctx, "mgg", [(lr, mgg) for lr in cfg.lr_grid["mgg"]])
    meta_seconds: dict[str, float] = {}
    for recipe in recipes:
        t0 = time.perf_counter()
        adapt_lrs = [recipe.adapt_lr] if recipe.adapt_lr is not None else list(cfg.lr_grid["mgg"])
        candidates, histories = [], {}
        for adapt_lr in adapt_lrs:
            eval_lr = recipe.eval_lr if recipe.eval_lr is not None else adapt_lr
            trained, histories[f"{adapt_lr:g}"] = _meta_train(
                ctx, recipe, metas[recipe.method], adapt_lr, eval_lr, seed
            )
            candidates.append((eval_lr, trained))
        meta_seconds[recipe.method] = time.perf_counter() - t0
        chosen[recipe.method], tuning[recipe.method] = _tune(ctx, "mgg", candidates)
        tuning[recipe.method]["meta_history"] = histories
    timings["tune_and_meta_train"] = time.perf_counter() - start
    lrs = ", ".join(
        f"{label(m)} {c['episodic'][0]:g}/{c['continual'][0]:g}" for m, c in chosen.items() if m != "noadapt"
    )
    log(f"{tag}: lrs (episodic/continual) chosen in {timings['tune_and_meta_train']:.0f} s: {lrs}")

    start = time.perf_counter()
    methods = {}
    for method in tqdm(list(chosen), desc=f"{tag}: evaluate", disable=not progress, leave=False):
        kind = "mgg" if method.startswith("mgg") else method
        methods[method] = evaluate(
            lambda lr, m, kind=kind: ctx.runner(kind, lr, m), chosen[method], test, cfg.batch_size
        )
    mark_updates_to_tent(methods)
    timings["evaluate"] = time.perf_counter() - start
    log(f"{tag}: evaluated in {timings['evaluate']:.0f} s")
    return {
        "seed": seed,
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
        "seconds": {**timings, "meta_train": meta_seconds},
    }


@contextlib.contextmanager
def reproducible(threads: int | None) -> Iterator[None]:
    """Fixed torch thread count (if given) and deterministic algorithms, restored afterwards.

    On the CPU the float results of a run depend on the thread count (how reductions are split)
    and on the instruction set the kernels dispatch to (see README: AVX-512 vs AVX2)."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def run_benchmark(
    cfg: BenchmarkConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    mgg: MGG | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _message: None,
    data_parallel: bool = False,
) -> dict[str, Any]:
    """Run the benchmark for every architecture and seed of ``cfg``; JSON-ready results: every
    per-seed number under ``archs[arch]["seeds"]``, the statistics over seeds under ``summary``.
    ``data_parallel``: see :func:`run_seed`."""
    cfg.validate()
    start = time.perf_counter()
    archs = {}
    with reproducible(cfg.threads):
        machine = machine_info(cfg.device)
        for arch in cfg.archs:
            seeds = [
                run_seed(
                    arch,
                    s,
                    cfg,
                    cache_dir=cache_dir,
                    mgg=mgg,
                    progress=progress,
                    log=log,
                    data_parallel=data_parallel,
                )
                for s in cfg.seed_list()
            ]
            archs[arch] = {"seeds": seeds, "summary": aggregate(seeds)}
    return {
        "format": "mgg_fast.shift_benchmark/v2",
        "config": {
            **asdict(cfg),
            "recipes": [asdict(recipe_of(r)) for r in cfg.recipes] if mgg is None else [],
            "seeds": cfg.seed_list(),
            "corruptions": cfg.test_corruptions(),
            "val_corruptions": cfg.validation_corruptions(),
        },
        "machine": machine,
        "archs": archs,
        "wall_seconds": time.perf_counter() - start,
        "given_mgg": mgg is not None,
    }


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


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (CPU model, threads, versions, date)."""
    dev = torch.device(device)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
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


# ---- reports ---------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _pm(stat: dict[str, Any], signed: bool = False) -> str:
    """``mean ± half-width`` in percentage points (``mean`` alone for one seed)."""
    mean = f"{100 * stat['mean']:+.1f}" if signed else _pct(stat["mean"])
    return mean if stat["ci95"] is None else f"{mean} ± {100 * stat['ci95']:.1f}"


def _lrs(values: list[float | None]) -> str:
    distinct = sorted({v for v in values if v is not None})
    return "–" if not distinct else ",".join(f"{v:g}" for v in distinct)


def _updates(entry: dict[str, Any], n_seeds: int) -> str:
    u = entry["updates_to_tent"]
    return "–" if u["mean"] is None else f"{u['mean']:.1f} ({u['reached']}/{n_seeds})"


SUMMARY_HEADER = [
    "method",
    "lr ep./cont.",
    "episodic",
    "continual",
    *(f"acc@{k}" for k in ACC_AT),
    "updates to Tent",
    "ms/batch",
    "step ms",
]
PAIRED_HEADER = ["paired difference (points)", "episodic", "continual", "seeds"]


def summary_rows(arch_result: dict[str, Any]) -> list[list[str]]:
    """One row per method: lrs chosen, episodic and continual mean ± 95% CI, acc@1/5/10, updates to
    reach Tent's final accuracy (mean over the seeds that reach it), ms per batch, step ms."""
    summary = arch_result["summary"]
    n = len(arch_result["seeds"])
    rows = []
    for method, r in summary["methods"].items():
        adapting = method != "noadapt"
        rows.append(
            [
                label(method),
                f"{_lrs(r['lr']['episodic'])} / {_lrs(r['lr']['continual'])}" if adapting else "–",
                _pm(r["episodic"]),
                _pm(r["continual"]),
                *(_pct(r["acc_at"][str(k)]) for k in ACC_AT),
                _updates(r, n),
                f"{r['ms_per_batch']:.1f}",
                f"{r['step_ms_per_batch']:.2f}" if adapting else "–",
            ]
        )
    return rows


def paired_rows(arch_result: dict[str, Any]) -> list[list[str]]:
    """One row per MGG recipe and baseline: the paired per-seed difference, mean ± 95% CI."""
    rows = []
    for key, d in arch_result["summary"]["paired"].items():
        mgg, base = key.rsplit("-", 1)
        rows.append(
            [
                f"{label(mgg)} − {label(base)}",
                _pm(d["episodic"], True),
                _pm(d["continual"], True),
                str(d["episodic"]["n"]),
            ]
        )
    return rows


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
    """Per-corruption episodic accuracy, mean over seeds (rows) of each method (columns), then the means."""
    methods = arch_result["summary"]["methods"]
    names = list(next(iter(methods.values()))["per_corruption"]["episodic"])
    header = ["corruption", *(label(m) for m in methods)]
    rows = [[n, *(_pct(r["per_corruption"]["episodic"][n]) for r in methods.values())] for n in names]
    for s in SETTINGS:
        rows.append([f"mean ({s})", *(_pct(r[s]["mean"]) for r in methods.values())])
    return header, rows


def _arch_title(arch: str, r: dict[str, Any]) -> str:
    src = r["seeds"][0]["source"]
    seeds = ", ".join(str(s["seed"]) for s in r["seeds"])
    return (
        f"{arch}: {src['parameters']:,} parameters ({src['adapted_parameters']:,} adapted), clean test "
        f"accuracy {_pm(r['summary']['clean_accuracy'])}%, seeds {seeds}"
    )


def _memory_note(cfg: dict[str, Any]) -> str:
    memory = cfg.get("mgg_memory", "float32")
    return "" if memory == "float32" else f"; MGG memory_W stored as {memory}"


def _n_test(cfg: dict[str, Any]) -> str:
    return "all" if cfg["n_test"] is None else str(cfg["n_test"])


def format_text(results: dict[str, Any]) -> str:
    """The terminal report: per architecture, the summary, the paired differences, per corruption."""
    cfg = results["config"]
    parts = [
        f"Corrupted MNIST, severity {cfg['severity']}, {len(cfg['corruptions'])} corruptions × "
        f"{_n_test(cfg)} images, batch {cfg['batch_size']}, {len(cfg['seeds'])} seed(s); accuracy in %, "
        "online, mean ± 95% CI (t) over seeds" + _memory_note(cfg)
    ]
    for arch, r in results["archs"].items():
        parts += ["", _arch_title(arch, r), _text_table(SUMMARY_HEADER, summary_rows(r))]
        if r["summary"]["paired"]:
            parts += ["", _text_table(PAIRED_HEADER, paired_rows(r))]
        parts += ["", _text_table(*corruption_rows(r))]
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
        "differences, mean ± 95% CI. *ms/batch*: predict + adapt; *step ms*: the optimizer step alone.",
    ]
    for arch, r in results["archs"].items():
        parts += ["", f"## {_arch_title(arch, r)}", "", _md_table(SUMMARY_HEADER, summary_rows(r)), ""]
        if r["summary"]["paired"]:
            parts += [_md_table(PAIRED_HEADER, paired_rows(r)), ""]
        parts.append(_md_table(*corruption_rows(r)))
    return "\n".join(parts) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """PNG of acc@k against k (number of updates) with the 95% CI band over seeds, one panel per
    architecture, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = results["archs"]
    fig, axes = plt.subplots(1, len(archs), figsize=(4.6 * len(archs), 3.4), squeeze=False)
    for ax, (arch, r) in zip(axes[0], archs.items(), strict=True):
        for method, m in r["summary"]["methods"].items():
            mean = np.array([100 * c["mean"] for c in m["curve"]])
            half = np.array([100 * (c["ci95"] or 0.0) for c in m["curve"]])
            (line,) = ax.plot(range(len(mean)), mean, marker=".", label=label(method))
            if len(r["seeds"]) > 1:
                ax.fill_between(
                    range(len(mean)), mean - half, mean + half, alpha=0.15, color=line.get_color()
                )
        ax.set_title(
            f"{arch} ({len(r['seeds'])} seeds, clean {_pct(r['summary']['clean_accuracy']['mean'])}%)",
            fontsize=10,
        )
        ax.set_xlabel("updates before the batch")
        ax.set_ylabel("batch accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"Corrupted MNIST (severity {results['config']['severity']}), mean over corruptions, episodic; "
        "bands: 95% CI over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    plt.close(fig)


def write_reports(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json`` (every per-seed number), ``results.md`` and ``accuracy_vs_updates.png``."""
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
