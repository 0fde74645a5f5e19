"""Source feature statistics for the FOA loss, and the features they describe.

Features (one vector per sample, the per-layer parts concatenated, taken by forward hooks):

* ViTs with a class token (timm ``VisionTransformer``: ``blocks`` and ``cls_token``): the CLS
  token after each block, passed through the layer norm that follows it (``blocks[i+1].norm1``,
  and the final ``norm`` after the last block), exactly the published ``layers_cls_features``.
  These are read at the output of those norm layers (token 0), so the discrepancy term
  reaches their affine parameters directly, as in the published loss.
* Models without a CLS token: the globally average-pooled (over H, W of an NCHW output)
  feature of each stage: ``layer1 .. layerN`` (ResNets), else ``stages[i]`` (timm ConvNeXt
  style), else every top-level child whose output is 4-D (plain CNNs).

The first submodule (in ``named_modules`` order, the model itself first) that looks like a ViT,
a ResNet or a staged CNN is used, so backbones wrapped in e.g. ``nn.Sequential(normalize, vit)``
are found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgg_fast.core.files import load_weights, save_atomic
from mgg_fast.tta.batches import batch_inputs

STATS_FORMAT = "mgg_fast.source_stats/v1"


@dataclass(frozen=True)
class SourceStats:
    """Per-feature std and mean of the source (clean) data, and which features they describe.

    ``layers`` are qualified module names; ``mode`` is ``"cls"`` (token 0 of a ``[B, T, D]``
    output) or ``"pooled"`` (mean over H, W of an NCHW output).
    """

    std: Tensor
    mean: Tensor
    layers: tuple[str, ...]
    mode: str

    def to(self, device: torch.device | str) -> SourceStats:
        """The same statistics on ``device``."""
        return SourceStats(self.std.to(device), self.mean.to(device), self.layers, self.mode)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics atomically as a weights-only torch file (the ``stats`` command's
        output): ``{"format": "mgg_fast.source_stats/v1", "std": [D] float32, "mean": [D] float32,
        "layers": [qualified module names], "mode": "cls" | "pooled"}``; feature ``j`` of ``std``
        and ``mean`` belongs to the layers in order, each contributing its feature width."""
        save_atomic(
            {
                "format": STATS_FORMAT,
                "std": self.std.detach().float().cpu(),
                "mean": self.mean.detach().float().cpu(),
                "layers": list(self.layers),
                "mode": self.mode,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> SourceStats:
        """Read a file written by :meth:`save`, or the published ``train_info.pt``.

        The published file is the ``(std, mean)`` pair of ``torch.std_mean`` over the
        concatenated CLS features of every block (ViT-B/16: 12 × 768 values each); it does not
        name its layers, so ``model`` (the ViT it describes) is required and the sizes are
        checked against its blocks and width. With ``model`` given, the layers of our format
        must exist in it. Loads with ``weights_only=True``; bad files are a ``ValueError``."""
        path = Path(path)
        payload = load_weights(path, "source statistics file")
        if isinstance(payload, dict) and payload.get("format") == STATS_FORMAT:
            std, mean, layers, mode = (payload.get(k) for k in ("std", "mean", "layers", "mode"))
            if mode not in ("cls", "pooled") or not (
                isinstance(layers, list) and layers and all(isinstance(n, str) for n in layers)
            ):
                raise ValueError(f"{path}: invalid layers {layers!r} or mode {mode!r}")
        elif isinstance(payload, (tuple, list)) and len(payload) == 2:
            std, mean = payload
            layers, mode = _published_layers(model, path, std)
        else:
            raise ValueError(
                f"{path} is neither an mgg_fast source statistics file (format {STATS_FORMAT!r}) nor the "
                "published (std, mean) pair"
            )
        for name, t in (("std", std), ("mean", mean)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: {name} must be a finite floating-point tensor")
        if std.shape != mean.shape or std.dim() != 1:
            raise ValueError(
                f"{path}: std {list(std.shape)} and mean {list(mean.shape)} must be equal 1-D shapes"
            )
        if model is not None:
            resolve_layers(model, layers)
        return cls(std.float(), mean.float(), tuple(layers), mode)


def _candidate_layers(model: nn.Module) -> tuple[list[str], str]:
    """The feature layers (qualified names) and how to read them; wrapped backbones are found too."""
    for prefix, m in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and getattr(m, "cls_token", None) is not None:
            return [dot + name for name in _vit_feature_layers(m)], "cls"
        resnet_stages = [
            f"layer{i}" for i in range(1, 10) if isinstance(getattr(m, f"layer{i}", None), nn.Module)
        ]
        if resnet_stages:
            return [dot + name for name in resnet_stages], "pooled"
        stages = getattr(m, "stages", None)
        if isinstance(stages, (nn.Sequential, nn.ModuleList)):
            return [f"{dot}stages.{i}" for i in range(len(stages))], "pooled"
    return [name for name, _ in model.named_children()], "pooled"


def _published_layers(model: nn.Module | None, path: Path, std: Any) -> tuple[list[str], str]:
    """The CLS layers of ``model`` that a published ``(std, mean)`` file of ``std.numel()`` values
    describes, after checking the count against the model's blocks and width."""
    if model is None:
        raise ValueError(f"{path} is the published (std, mean) pair: load it with the model it describes")
    layers, mode = _candidate_layers(model)
    vit = next((m for m in model.modules() if getattr(m, "cls_token", None) is not None), None)
    if mode != "cls" or vit is None:
        raise ValueError(
            f"{path} holds the published CLS-feature statistics of a ViT, but "
            f"{type(model).__name__} has no class token"
        )
    width = vit.cls_token.shape[-1]
    n = std.numel() if isinstance(std, Tensor) else -1
    if n != len(layers) * width:
        raise ValueError(
            f"{path} holds {n} values per statistic, but the model's {len(layers)} blocks × width "
            f"{width} give {len(layers) * width} (statistics of another model?)"
        )
    return layers, mode


def _vit_feature_layers(vit: nn.Module) -> list[str]:
    """Where the published normalised CLS features appear: the output of the norm that follows
    each block (``blocks[i+1].norm1``, and ``norm`` after the last); the block output if absent."""
    blocks = vit.blocks
    layers = [
        f"blocks.{i + 1}.norm1"
        if isinstance(getattr(blocks[i + 1], "norm1", None), nn.Module)
        else f"blocks.{i}"
        for i in range(len(blocks) - 1)
    ]
    last = len(blocks) - 1
    layers.append("norm" if isinstance(getattr(vit, "norm", None), nn.Module) else f"blocks.{last}")
    return layers


def _extract(output: Any, mode: str) -> Tensor | None:
    if not isinstance(output, Tensor):
        return None
    if mode == "cls" and output.dim() == 3:
        return output[:, 0]
    if mode == "pooled" and output.dim() == 4:
        return output.mean(dim=(2, 3))
    return None


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for the qualified ``layers`` of ``model``; clear error if one is missing."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"the model has no layers {missing} (source statistics from another model?)")
    return {name: modules[name] for name in layers}


@contextmanager
def feature_tap(layers: dict[str, nn.Module], mode: str) -> Iterator[dict[str, Tensor]]:
    """Collect ``{layer: [B, D] feature}`` of the given layers during forwards inside the block."""
    found: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            feature = _extract(output, mode)
            if feature is not None:
                found[name] = feature

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def concat_features(found: dict[str, Tensor], layers: Sequence[str]) -> Tensor:
    """The per-layer features in ``layers`` order, as one ``[B, D]`` tensor: float32, or float64
    for a float64 model."""
    missing = [name for name in layers if name not in found]
    if missing:
        raise ValueError(f"layers {missing} produced no {list(found)} features in this forward")
    return torch.cat(
        [f if (f := found[name]).dtype == torch.float64 else f.float() for name in layers], dim=1
    )


@torch.no_grad()
def fit_source_stats(
    model: nn.Module, batches: Iterable[Tensor | Sequence[Any]], max_batches: int | None = None
) -> SourceStats:
    """Per-feature std (unbiased) and mean over a few unlabeled source batches, for ``foa_loss``.

    The model runs in eval mode (restored afterwards) on its own device; batches may be tensors
    or ``(x, y)`` tuples. See the module docstring for which features are used. Raises
    ``ValueError`` when no usable feature layer exists (use ``loss="entropy"`` then).
    """
    candidates, mode = _candidate_layers(model)
    device = next(model.parameters()).device
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    chunks: list[Tensor] = []
    layers: list[str] | None = None
    try:
        with feature_tap(resolve_layers(model, candidates), mode) as found:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                found.clear()
                model(batch_inputs(batch).to(device))
                if layers is None:
                    layers = [name for name in candidates if name in found]
                    if not layers:
                        raise ValueError(
                            f"loss='foa' needs per-layer features, but no layer of {type(model).__name__} "
                            f"gave a {'[B, T, D]' if mode == 'cls' else 'NCHW'} output; use loss='entropy'"
                        )
                chunks.append(concat_features(found, layers))
    finally:
        for m, training in was_training.items():
            m.training = training
    if layers is None:
        raise ValueError("fit_source_stats got no batches")
    features = torch.cat(chunks)
    if features.shape[0] < 2:
        raise ValueError("fit_source_stats needs at least 2 samples to estimate a std")
    std, mean = torch.std_mean(features, dim=0)
    return SourceStats(std, mean, tuple(layers), mode)
