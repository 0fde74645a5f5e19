"""Making the shipped models again: ``python -m mgg_fast assets --out DIR``.

For every architecture and seed of a :class:`~.config.BenchmarkConfig` (the demo's by default)
it trains the source model and meta-trains the MGGs of each recipe exactly as a run with
``use_bundled=False`` would (same data, seeds and code path), copies them into ``DIR`` under the
names :mod:`.assets` looks for, and writes the manifest: each file's sha256, size and meta-loss
curve, the command, the versions and the machine. Copy ``DIR`` over
``mgg_fast/evaluation/bundled/assets`` to ship them.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mgg_fast.core.files import save_atomic
from mgg_fast.evaluation.bundled import assets
from mgg_fast.evaluation.bundled.benchmark import meta_trained, prepare
from mgg_fast.evaluation.bundled.config import BenchmarkConfig, recipe_of
from mgg_fast.evaluation.protocol import reproducible
from mgg_fast.evaluation.report import machine_info


def make_assets(
    out: str | os.PathLike,
    cfg: BenchmarkConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] = lambda _message: None,
) -> Path:
    """Train the models ``cfg`` uses into ``out`` and write its manifest; returns the manifest's
    path. ``command`` is recorded as what made them (default: this process's command line).
    Without ``cache_dir`` everything is made anew in a temporary cache (nothing is taken from the
    user's, so the files depend on the command alone)."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="mgg_fast_assets_") as fresh:
            return make_assets(out, cfg, cache_dir=fresh, command=command, log=log)
    cfg = replace(cfg, use_bundled=False)
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    with reproducible(cfg.threads):
        for arch in cfg.archs:
            for seed in cfg.seed_list():
                recipes = {r.method: r for r in map(recipe_of, cfg.recipes)}
                prepared = prepare(arch, seed, cfg, recipes, cache_dir=cache_dir)
                src = prepared.source
                name = assets.source_name(arch, src.config.key())
                payload = torch.load(src.path, map_location="cpu", weights_only=True)
                seconds = payload.pop("train_seconds")  # a timing: kept out of the file, so it reproduces
                save_atomic(payload, out / name)
                files[name] = {
                    "kind": "source model",
                    "arch": arch,
                    "seed": seed,
                    "clean_accuracy": src.clean_accuracy,
                    "train_seconds": seconds,
                }
                log(f"{arch} seed {seed}: source model, clean accuracy {100 * src.clean_accuracy:.1f}%")
                for method, recipe in recipes.items():
                    for loss in (cfg.loss, *cfg.extra_losses):
                        for t in meta_trained(prepared.ctx, recipe, loss, prepared.metas[method], seed):
                            t.mgg.save(out / t.name)
                            files[t.name] = {
                                "kind": "MGG",
                                "arch": arch,
                                "seed": seed,
                                "recipe": recipe.name,
                                "loss": loss,
                                "eval_lr": t.eval_lr,
                                "meta_history": t.history,
                            }
                            log(
                                f"{arch} seed {seed}: MGG ({recipe.name}, {loss}, lr {t.eval_lr:g}), "
                                f"{t.history[-1]['meta_updates']} meta-updates"
                            )
    made = {
        "command": command or " ".join(["python -m mgg_fast", *sys.argv[1:]]),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(cfg.device),
    }
    return assets.write_manifest(out, files, made)
