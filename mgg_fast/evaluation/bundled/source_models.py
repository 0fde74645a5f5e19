"""Small source models for the bundled benchmark, trained on clean MNIST and cached on disk.

Two architectures, so that both kinds of norm layer get adapted: a small timm
``VisionTransformer`` (LayerNorm) and a small timm ``ResNet`` with BasicBlocks (BatchNorm).
Training takes seconds to a minute on a CPU; the result (state dict + config + clean test
accuracy) is saved atomically under ``<cache>/models/`` and reloaded with ``weights_only=True``
whenever the configuration matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mgg_fast.core.files import atomic_write
from mgg_fast.evaluation.bundled import assets
from mgg_fast.evaluation.bundled.config import ARCHS
from mgg_fast.evaluation.bundled.data import NUM_CLASSES, mnist_split, resolve_cache_dir, to_tensor
from mgg_fast.evaluation.images import ImageSet

MODEL_FORMAT = "mgg_fast.source_model/v1"


@dataclass(frozen=True)
class SourceConfig:
    """Architecture and training recipe of a source model (the cache key)."""

    arch: str
    epochs: int
    n_train: int | None = None  # first n of the train split; None = all 3,500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"format": MODEL_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Default recipes: the most accurate of a few learning rates within about a minute of 2-core CPU
# time (the comparison: bench/RESULTS.md).
RECIPES: dict[str, dict[str, Any]] = {"vit": {"epochs": 10, "lr": 1e-3}, "resnet": {"epochs": 3, "lr": 3e-3}}


@dataclass
class SourceModel:
    """A trained source model with its recipe, clean test accuracy and training time."""

    model: nn.Module
    config: SourceConfig
    clean_accuracy: float
    train_seconds: float
    from_cache: bool
    path: Path | None = None  # the file it was loaded from or saved to
    bundled: bool = False  # shipped with the package (mgg_fast.evaluation.bundled.assets)


def build_source_model(arch: str) -> nn.Module:
    """A fresh, randomly initialised source model for 32×32×3 inputs and 10 classes."""
    from timm.models.resnet import BasicBlock, ResNet
    from timm.models.vision_transformer import VisionTransformer

    if arch == "vit":
        return VisionTransformer(
            img_size=32,
            patch_size=8,
            num_classes=NUM_CLASSES,
            embed_dim=96,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
        )
    if arch == "resnet":
        return ResNet(
            BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES, stem_width=16, channels=(16, 32, 64, 128)
        )
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def _shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill), one offset per batch."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift), value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


@torch.no_grad()
def accuracy(
    model: nn.Module, data: ImageSet, device: torch.device | str = "cpu", batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on a labeled set."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = to_tensor(data.images[i : i + batch_size]).to(device)
        correct += int((model(x).argmax(1).cpu().numpy() == data.labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(data)


def train_source_model(
    config: SourceConfig, train: ImageSet, device: torch.device | str = "cpu", progress: bool = True
) -> nn.Module:
    """Train a fresh model on labeled clean images: AdamW, cosine schedule, small shifts."""
    torch.manual_seed(config.seed)
    model = build_source_model(config.arch).to(device)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.15)
    x_all, y_all = to_tensor(train.images), torch.from_numpy(train.labels)
    model.train()
    bar = tqdm(total=total, desc=f"train source {config.arch}", disable=not progress, leave=False)
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), config.batch_size):
            idx = order[i : i + config.batch_size]
            x = _shift_augment(x_all[idx], gen).to(device)
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def _load_cached(path: Path, config: SourceConfig, device: torch.device | str) -> SourceModel | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != MODEL_FORMAT or payload.get("config") != asdict(config):
            return None
        model = build_source_model(config.arch)
        model.load_state_dict(payload["state_dict"])
    except (OSError, RuntimeError, ValueError, KeyError, AttributeError, EOFError):
        return None  # missing, truncated or from another version: retrain
    return SourceModel(
        model.to(device).eval(),
        config,
        float(payload["clean_accuracy"]),
        float(payload.get("train_seconds", math.nan)),  # shipped models carry no timing
        True,
        path,
    )


def source_model(
    arch: str,
    *,
    epochs: int | None = None,
    n_train: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    bundled: bool = True,
) -> SourceModel:
    """The trained ``arch`` source model: the one shipped with the package for this recipe (unless
    ``bundled=False``), else from ``<cache>/models/`` if there, else trained and saved there."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    epochs = RECIPES[arch]["epochs"] if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    config = SourceConfig(arch=arch, epochs=epochs, n_train=n_train, lr=RECIPES[arch]["lr"], seed=seed)
    shipped = assets.find(assets.source_name(arch, config.key())) if bundled else None
    if shipped is not None and (found := _load_cached(shipped, config, device)) is not None:
        found.bundled = True
        return found
    cache = resolve_cache_dir(cache_dir)
    path = cache / "models" / f"{arch}-{config.key()}.pt"
    cached = _load_cached(path, config, device)
    if cached is not None:
        return cached
    start = time.perf_counter()
    model = train_source_model(config, mnist_split("train", n_train), device, progress)
    seconds = time.perf_counter() - start
    clean = accuracy(model, mnist_split("test"), device)
    payload: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "clean_accuracy": clean,
        "train_seconds": seconds,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return SourceModel(model, config, clean, seconds, False, path)
