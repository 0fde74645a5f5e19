"""The distribution-shift benchmark on corrupted MNIST: the test-time methods, the hand-made
optimizers of the same loss, the MGG and its memoryless ablation, and two reference rows.

Protocol, per source architecture and per seed (the seed draws the source model's training,
the corruptions and the MGG's initialisation); :mod:`mgg_fast.evaluation.bundled.config` holds
the choices:

1. Source statistics for the FOA loss, and EATA's Fisher, from clean training images.
2. Every method's learning rate is tuned on the 4 *validation* corruptions only (the labeled
   ``val`` split re-corrupted as often as needed), on streams as long as the test streams and at
   the same batch size, separately per setting: the mean episodic online accuracy over the 4
   corruptions chooses the episodic lr, the online accuracy of one continual validation stream
   (the 4 corruptions one after the other, never reset) the continual lr, and one mixed stream
   the mixed lr. The test corruptions are never used for a choice.
3. The MGG is meta-trained on unlabeled validation-corruption images by a :class:`MetaRecipe`
   (several can run side by side) until its meta-loss stops improving; the memoryless row
   evaluates the same trained MGG with its memory reset every step. A given MGG (``adapt``
   command) is not retrained; only its step size is tuned.
4. Evaluation on the test corruptions (``test`` split, severity 5), the same batches for every
   method: *episodic* (reset before each corruption), *continual* (one stream over all of them,
   never reset) and, where asked, *mixed* (one stream whose batches mix the corruptions).
   Shared-loss methods run once per loss (``loss`` and ``extra_losses``).

Metrics. All accuracies are *online* (:mod:`mgg_fast.evaluation.protocol`). Over seeds: the
mean, a 95% t-interval and *paired* per-seed differences: the MGG against Tent, Adam, the best
hand-made optimizer of the same loss (SGD, Adam or sign momentum: the one with the best mean) and
its memoryless self. The *headline* means keep only the corruptions with room: where the
supervised oracle beats NoAdapt by at least :data:`~.summary.ROOM` (episodic, mean over seeds). Time is
wall time per batch of predict+adapt, and of the optimizer step alone.
"""

from __future__ import annotations

import copy
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
from mgg_fast.evaluation.bundled import assets
from mgg_fast.evaluation.bundled.config import (
    EATA_D_MARGIN,
    RECIPES,
    BenchmarkConfig,
    MetaRecipe,
    recipe_of,
)
from mgg_fast.evaluation.bundled.data import (
    CACHE_FORMAT,
    PER_CLASS,
    corrupted_split,
    mnist_split,
    resolve_cache_dir,
    to_tensor,
)
from mgg_fast.evaluation.bundled.source_models import source_model
from mgg_fast.evaluation.bundled.summary import aggregate
from mgg_fast.evaluation.images import ImageSet
from mgg_fast.evaluation.protocol import (
    Choice,
    Runner,
    evaluate,
    mark_updates_to_tent,
    reproducible,
    tune,
    validation_scores,
)
from mgg_fast.evaluation.report import machine_info, pct
from mgg_fast.evaluation.streams import Batch, label_shift_order, make_batches, mixed, reordered
from mgg_fast.tta.data_parallel import rank_zero_first
from mgg_fast.tta.eata import eata_fisher
from mgg_fast.tta.meta_training import train_mgg
from mgg_fast.tta.norm_params import select_norm_params
from mgg_fast.tta.registry import METHODS as REGISTERED
from mgg_fast.tta.registry import MethodOptions, label, memory_dtype
from mgg_fast.tta.source_stats import SourceStats, fit_source_stats

# The benchmark settings that decide a meta-trained MGG (with the recipe, loss, lr and source model).
MGG_FIELDS = ("n_meta", "batch_size", "meta_epochs", "meta_patience", "mgg_lr", "severity", "n_stats")
FORMAT = "mgg_fast.shift_benchmark/v3"  # v3: losses, ablation, reference rows, regimes


@dataclass(frozen=True)
class Row:
    """One row of the tables: a registered ``method`` with a ``loss`` (shared-loss methods) and,
    for the MGG and its ablation, the ``recipe`` that meta-trained it."""

    key: str
    method: str
    loss: str
    recipe: MetaRecipe | None = None


def rows_of(cfg: BenchmarkConfig, given_mgg: bool) -> list[Row]:
    """The rows a run measures: each method of ``cfg`` once, the shared-loss ones once per loss
    (``+loss`` keys after the first), the MGG rows once per recipe (``mgg-<recipe>`` keys) unless
    an MGG is given."""
    recipes = [RECIPES["demo"]] if given_mgg else [recipe_of(r) for r in cfg.recipes]
    rows = []
    for loss in (cfg.loss, *cfg.extra_losses):
        suffix = "" if loss == cfg.loss else f"+{loss}"
        for method in cfg.methods:
            if not REGISTERED[method].shared_loss:
                if not suffix:
                    rows.append(Row(method, method, cfg.loss))
            elif method.startswith("mgg"):
                ablation = method.removeprefix("mgg")  # "" or "-memoryless"
                rows += [Row(f"{r.method}{ablation}{suffix}", method, loss, r) for r in recipes]
            else:
                rows.append(Row(f"{method}{suffix}", method, loss))
    return rows


# ---- the protocol ---------------------------------------------------------------------------------


def _stream_set(
    split: str, name: str, n: int | None, cfg: BenchmarkConfig, seed: int, cache: Path
) -> ImageSet:
    """One corruption's images of ``split`` (cached), in the order ``cfg`` asks for."""
    data = corrupted_split(split, name, cfg.severity, n, seed=seed, cache_dir=cache)
    if cfg.order == "label_shift":
        data = reordered(data, label_shift_order(data.labels, max(1, cfg.batch_size // 2), seed))
    return data


def _streams(
    split: str,
    names: list[str],
    n: int | None,
    cfg: BenchmarkConfig,
    seed: int,
    cache: Path,
    device: torch.device,
) -> tuple[dict[str, list[Batch]], list[Batch] | None]:
    """The streams of ``names`` as batches, and (with the mixed setting) the mixed stream of them."""
    sets = {name: _stream_set(split, name, n, cfg, seed, cache) for name in names}
    streams = {name: make_batches(data, cfg.batch_size, device, to_tensor) for name, data in sets.items()}
    mix = None
    if "mixed" in cfg.settings:
        mix = make_batches(mixed(list(sets.values()), seed), cfg.batch_size, device, to_tensor)
    return streams, mix


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
    batch = recipe.batch_size or cfg.batch_size
    seed = cfg.seed if seed is None else seed
    sets = [corrupted_split("val", name, cfg.severity, per, seed=seed, cache_dir=cache) for name in names]
    streams = [[x for x, _ in make_batches(s, batch, device, to_tensor)] for s in sets]
    if recipe.stream == "blocks":
        return [x for s in streams for x in s]
    return [s[k] for k in range(max(map(len, streams))) for s in streams if k < len(s)]


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
    tune_mixed: list[Batch] | None
    data_parallel: bool = False
    described: dict[str, Any] = field(default_factory=dict)  # arch, seed, source model: in the MGGs' keys
    trained: dict[tuple[str, str], list[Trained]] = field(default_factory=dict)

    def runner(
        self, method: str, lr: float | None, mgg: MGG | None = None, loss: str | None = None
    ) -> Runner:
        cfg = self.cfg
        options = MethodOptions(
            mgg=mgg,
            loss=loss or cfg.loss,
            source_stats=self.stats,
            backend=cfg.backend,
            memory_W_dtype=memory_dtype(cfg.mgg_memory),
            fisher=self.fisher,
            eata_d_margin=EATA_D_MARGIN,
            data_parallel=self.data_parallel,
        )
        return Runner(self.model, method, lr=lr, options=options, dtype=getattr(torch, cfg.dtype))

    def validation_scores(self, row: Row, lr: float, mgg: MGG | None = None) -> dict[str, float]:
        """Online accuracy on the validation corruptions: episodic mean, one continual stream (and
        the mixed one)."""
        runner = self.runner(row.method, lr, mgg, row.loss)
        return validation_scores(runner, self.tune, self.cfg.batch_size, self.tune_mixed)


def _meta_train(
    ctx: _Context,
    recipe: MetaRecipe,
    loss: str,
    batches: list[Tensor],
    adapt_lr: float,
    eval_lr: float,
    seed: int,
) -> tuple[MGG, list[dict[str, float]]]:
    """One MGG by ``recipe`` with ``loss`` (validation at ``eval_lr`` after each epoch if the recipe
    says so), trained until its meta-loss stops improving; a K-step recipe gets K times the epochs
    and the patience, so it is judged after as many meta-updates as a one-step recipe. A
    curriculum trains each window so in turn, from the MGG the previous one kept (a fresh Adam for
    each); its history counts epochs and meta-updates across the stages and names each one's K."""
    cfg = ctx.cfg
    history: list[dict[str, float]] = []
    row = Row("mgg", "mgg", loss)
    validate = (lambda m: ctx.validation_scores(row, eval_lr, m)["episodic"]) if recipe.validate else None
    patience = cfg.meta_patience if recipe.patience is None else recipe.patience
    mgg: MGG | None = None
    for k in recipe.unrolls:
        stage: list[dict[str, float]] = []
        mgg = train_mgg(
            copy.deepcopy(ctx.model),
            batches,
            epochs=(recipe.epochs or cfg.meta_epochs) * k,
            mgg=mgg,
            mgg_lr=cfg.mgg_lr,
            adapt_lr=adapt_lr,
            loss=loss,
            source_stats=ctx.stats,
            seed=seed,
            validate=validate,
            progress=False,
            unroll=k,
            shuffle=recipe.shuffle,
            reset_params=recipe.reset_params,
            history=stage,
            patience=patience * k if patience else None,
        )
        epochs, updates = (history[-1]["epoch"], history[-1]["meta_updates"]) if history else (0, 0)
        history += [
            {**h, "epoch": h["epoch"] + epochs, "meta_updates": h["meta_updates"] + updates, "unroll": k}
            for h in stage
        ]
    return mgg.to(next(ctx.model.parameters()).device), history


@dataclass
class Trained:
    """An MGG a recipe meta-trained (or the shipped one it would have), at its evaluation lr."""

    eval_lr: float
    mgg: MGG
    history: list[dict[str, float]]
    name: str  # its file name among the bundled assets
    bundled: bool


def meta_trained(
    ctx: _Context, recipe: MetaRecipe, loss: str, batches: list[Tensor], seed: int
) -> list[Trained]:
    """The MGGs ``recipe`` meta-trains with ``loss`` (one per grid lr, or the recipe's lr): the
    shipped ones where ``cfg.use_bundled`` and the package holds them for exactly this
    configuration, else trained here."""
    cfg = ctx.cfg
    adapt_lrs = [recipe.adapt_lr] if recipe.adapt_lr is not None else list(cfg.grid("mgg"))
    out = []
    for adapt_lr in adapt_lrs:
        eval_lr = recipe.eval_lr if recipe.eval_lr is not None else adapt_lr
        described = {
            **ctx.described,
            "recipe": asdict(recipe),
            "loss": loss,
            "adapt_lr": adapt_lr,
            **{k: getattr(cfg, k) for k in MGG_FIELDS},
            "val_corruptions": cfg.validation_corruptions(),
            "data": CACHE_FORMAT,
        }
        name = assets.mgg_name(ctx.described["arch"], assets.key_of(described))
        shipped = assets.find(name) if cfg.use_bundled else None
        if shipped is not None:
            mgg = MGG.load(shipped, map_location=next(ctx.model.parameters()).device)
            out.append(Trained(eval_lr, mgg, assets.entry(name)["meta_history"], name, True))
        else:
            mgg, history = _meta_train(ctx, recipe, loss, batches, adapt_lr, eval_lr, seed)
            out.append(Trained(eval_lr, mgg, history, name, False))
    return out


def _candidates(
    ctx: _Context, row: Row, given: MGG | None, metas: dict[str, list[Tensor]], seed: int
) -> list[tuple[float, MGG | None]]:
    """The ``(lr, mgg)`` pairs tuned for a row: the grid's lrs, with the given MGG or the MGGs its
    recipe meta-trains (once per recipe and loss, shared by the memoryless row)."""
    cfg = ctx.cfg
    if not row.method.startswith("mgg"):
        return [(lr, None) for lr in cfg.grid(row.method)]
    if given is not None:
        return [(lr, given) for lr in cfg.grid("mgg")]
    key = (row.recipe.method, row.loss)
    if key not in ctx.trained:
        ctx.trained[key] = meta_trained(ctx, row.recipe, row.loss, metas[row.recipe.method], seed)
    return [(t.eval_lr, t.mgg) for t in ctx.trained[key]]


def _selected_epoch(history: list[dict[str, float]]) -> int | None:
    """The epoch a validated recipe keeps: the latest with the best score (``None`` unvalidated)."""
    scored = [(h["score"], h["epoch"]) for h in history if h["score"] == h["score"]]
    return max(scored)[1] if scored else None


@dataclass
class Prepared:
    """What one (architecture, seed) run starts from: the source model, the test streams, the
    meta-training batches of each recipe, and the context shared by tuning and meta-training."""

    source: Any  # SourceModel
    test: dict[str, list[Batch]]
    test_mixed: list[Batch] | None
    metas: dict[str, list[Tensor]]
    ctx: _Context
    seconds: dict[str, float]


def prepare(
    arch: str,
    seed: int,
    cfg: BenchmarkConfig,
    recipes: dict[str, MetaRecipe],
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    data_parallel: bool = False,
) -> Prepared:
    """The source model (shipped, cached or trained), the test and validation streams, the
    recipes' meta-training batches, the FOA statistics and EATA's Fisher of one seed; under
    ``data_parallel`` rank 0 makes and caches them first."""
    device = torch.device(cfg.device)
    cache = resolve_cache_dir(cache_dir)
    torch.manual_seed(seed)
    seconds = {}
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
            bundled=cfg.use_bundled,
        )
        seconds["source_model"] = time.perf_counter() - start
        start = time.perf_counter()
        n_test = cfg.n_test or 10 * PER_CLASS["test"]
        test, test_mixed = _streams("test", cfg.test_corruptions(), n_test, cfg, seed, cache, device)
        tune_n = cfg.tune_images() or n_test
        tune, tune_mixed = _streams("val", cfg.validation_corruptions(), tune_n, cfg, seed, cache, device)
        metas = {m: meta_batches(cfg, cache, device, recipe=r, seed=seed) for m, r in recipes.items()}
        seconds["data"] = time.perf_counter() - start
    model = src.model
    stats = clean_source_stats(model, cfg.n_stats) if "foa" in (cfg.loss, *cfg.extra_losses) else None
    fisher = eata_fisher(model, clean_batches(cfg.n_stats, cfg.batch_size, device))
    described = {"arch": arch, "seed": seed, "source": src.config.key()}
    ctx = _Context(cfg, model, stats, fisher, tune, tune_mixed, data_parallel, described)
    return Prepared(src, test, test_mixed, metas, ctx, seconds)


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
    bar: Any = None,
) -> dict[str, Any]:
    """The whole protocol for one source architecture and one seed; JSON-ready results.

    ``log`` receives one line per finished stage (source model, data, tuning, evaluation).
    ``data_parallel``: every rank of the process group runs this with the same arguments; rank 0
    trains and caches the source model and data first, the shared-loss methods adapt
    data-parallel (see :class:`Runner`). ``bar``: a progress bar that advances twice per row
    (tuned, evaluated), shared by the whole run for one overall estimate of the time left."""
    timings: dict[str, float] = {}
    rows = rows_of(cfg, mgg is not None)
    recipes = {r.recipe.method: r.recipe for r in rows if r.recipe is not None and mgg is None}
    prepared = prepare(
        arch, seed, cfg, recipes, cache_dir=cache_dir, progress=progress, data_parallel=data_parallel
    )
    ctx, src, metas = prepared.ctx, prepared.source, prepared.metas
    timings.update(prepared.seconds)
    how = (
        "bundled"
        if src.bundled
        else "loaded from cache"
        if src.from_cache
        else f"trained in {src.train_seconds:.0f} s"
    )
    tag = f"{arch} seed {seed}"
    log(f"{tag}: source model {how}, clean test accuracy {pct(src.clean_accuracy)}%")
    log(f"{tag}: corrupted data ready in {timings['data']:.0f} s")
    model = ctx.model

    start = time.perf_counter()
    chosen: dict[str, dict[str, Choice]] = {}
    tuning: dict[str, Any] = {}
    bar = bar if bar is not None else tqdm(total=2 * len(rows), disable=not progress, leave=False)
    for row in rows:
        bar.set_postfix_str(f"{tag}: tuning {label(row.key)}")
        if REGISTERED[row.method].default_lr is None:  # NoAdapt: nothing to tune
            chosen[row.key] = {s: (None, None) for s in cfg.settings}
        else:
            candidates = _candidates(ctx, row, mgg, metas, seed)
            chosen[row.key], tuning[row.key] = tune(
                lambda lr, m, row=row: ctx.validation_scores(row, lr, m), candidates
            )
        bar.update()
    for (recipe_key, loss), trained in ctx.trained.items():
        key = recipe_key if loss == cfg.loss else f"{recipe_key}+{loss}"
        histories = {f"{t.eval_lr:g}": t.history for t in trained}
        tuning[key]["meta_history"] = histories
        tuning[key]["selected_epoch"] = {lr: _selected_epoch(h) for lr, h in histories.items()}
        tuning[key]["bundled"] = all(t.bundled for t in trained)
    timings["tune_and_meta_train"] = time.perf_counter() - start
    lrs = ", ".join(
        f"{label(k)} " + "/".join(f"{c[s][0]:g}" for s in c) for k, c in chosen.items() if k != "noadapt"
    )
    log(f"{tag}: lrs chosen in {timings['tune_and_meta_train']:.0f} s: {lrs}")

    start = time.perf_counter()
    methods = {}
    for row in rows:
        bar.set_postfix_str(f"{tag}: evaluating {label(row.key)}")
        methods[row.key] = evaluate(
            lambda lr, m, row=row: ctx.runner(row.method, lr, m, row.loss),
            chosen[row.key],
            prepared.test,
            cfg.batch_size,
            prepared.test_mixed,
        )
        bar.update()
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
        "seconds": timings,
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
    rows = len(rows_of(cfg, mgg is not None))
    with (
        reproducible(cfg.threads),
        tqdm(total=2 * rows * len(cfg.archs) * cfg.n_seeds, desc="demo", disable=not progress) as bar,
    ):
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
                    log=lambda message: bar.write(message) if progress else log(message),
                    data_parallel=data_parallel,
                    bar=bar,
                )
                for s in cfg.seed_list()
            ]
            archs[arch] = {"seeds": seeds, "summary": aggregate(seeds)}
    return {
        "format": FORMAT,
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
