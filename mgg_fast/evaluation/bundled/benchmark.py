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

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mgg_fast.core.mgg import MGG
from mgg_fast.evaluation.bundled.data import corrupted_split, mnist_split, resolve_cache_dir, to_tensor
from mgg_fast.evaluation.bundled.source_models import ARCHS, source_model
from mgg_fast.evaluation.corruptions import check_corruption, corruption_names
from mgg_fast.evaluation.protocol import (
    SETTINGS,
    Batch,
    Runner,
    evaluate,
    make_batches,
    mark_updates_to_tent,
    reproducible,
    tune,
    validation_scores,
)
from mgg_fast.evaluation.report import machine_info, pct
from mgg_fast.evaluation.stats import aggregate_methods, mean_ci
from mgg_fast.tta.data_parallel import rank_zero_first
from mgg_fast.tta.eata import eata_fisher
from mgg_fast.tta.meta_training import train_mgg
from mgg_fast.tta.norm_params import select_norm_params
from mgg_fast.tta.registry import MethodOptions, label, memory_dtype
from mgg_fast.tta.source_stats import SourceStats, fit_source_stats

METHODS = ("noadapt", "tent", "adam", "sar", "eata", "mgg")
BASELINES = ("tent", "adam", "sar", "eata")  # the tuned, hand-made adapting methods
EATA_D_MARGIN = 0.4  # EATA's redundancy margin on the 10-class scale (ImageNet: 0.05); SHIFT_RESULTS.md
# SGD's step scales with the gradient (tiny on small models' norm params): a wider, ×10 grid. Adam
# and MGG take normalised steps (the MGG's output is in (-1, 1)): the same ×5 grid for both.
DEFAULT_GRID = {
    "tent": (1e-3, 1e-2, 1e-1, 1.0),
    "adam": (2e-4, 1e-3, 5e-3, 2.5e-2),
    "mgg": (2e-4, 1e-3, 5e-3, 2.5e-2),
}
SGD_GRID = {"sar": DEFAULT_GRID["tent"], "eata": DEFAULT_GRID["tent"]}  # SAR and EATA step with SGD


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
            corrupted_split(split, name, cfg.severity, n, seed=seed, cache_dir=cache),
            cfg.batch_size,
            device,
            to_tensor,
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
    return make_batches(mnist_split("train", n_images), batch_size, device, to_tensor)


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
        options = MethodOptions(
            mgg=mgg,
            loss=cfg.loss,
            source_stats=self.stats,
            backend=cfg.backend,
            memory_W_dtype=memory_dtype(cfg.mgg_memory),
            fisher=self.fisher,
            eata_d_margin=EATA_D_MARGIN,
            data_parallel=self.data_parallel,
        )
        return Runner(self.model, method, lr=lr, options=options)

    def validation_scores(self, method: str, lr: float, mgg: MGG | None = None) -> dict[str, float]:
        """Online accuracy on the validation corruptions: episodic mean and one continual stream."""
        return validation_scores(self.runner(method, lr, mgg), self.tune, self.cfg.batch_size)


def _tune(
    ctx: _Context, method: str, candidates: list[tuple[float, MGG | None]]
) -> tuple[dict[str, tuple[float | None, MGG | None]], dict[str, dict[str, float]]]:
    """The best ``(lr, mgg)`` per setting on the validation streams, and every candidate's scores."""
    return tune(lambda lr, mgg: ctx.validation_scores(method, lr, mgg), candidates)


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
    log(f"{tag}: source model {how}, clean test accuracy {pct(src.clean_accuracy)}%")
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
