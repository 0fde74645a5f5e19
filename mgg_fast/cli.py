"""Command line: ``python -m mgg_fast {demo,train,adapt,bench}`` (also installed as ``mgg-fast``).

* ``demo``   the distribution-shift benchmark on bundled data (corrupted MNIST): NoAdapt, Tent,
  Adam and a freshly meta-trained MGG; prints the table, writes JSON, Markdown and a PNG.
* ``train``  meta-train an MGG on bundled validation corruptions or on a folder of images; saves
  it with ``MGG.save``.
* ``adapt``  evaluate a saved MGG against the baselines on the bundled benchmark or a folder.
* ``bench``  optimizer-step throughput: the reference step, the fused step (CUDA), torch Adam.

Bad arguments and paths end with a one-line message and a non-zero exit status, no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

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
        help="clean images to train source models on; unset: all 3,500",
    )


def _benchmark_sizes(p: argparse.ArgumentParser) -> None:
    from mgg_fast.shift_benchmark import BenchmarkConfig
    from mgg_fast.source_models import ARCHS

    p.add_argument("--archs", type=_list_of(str), default=list(ARCHS), help="source models: vit,resnet")
    p.add_argument(
        "--corruptions",
        type=_list_of(str),
        default=None,
        help="comma-separated test corruptions; unset: all 15",
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


def build_parser() -> argparse.ArgumentParser:
    """The ``mgg-fast`` argument parser with its four subcommands."""
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
        help="meta-train an MGG on bundled validation corruptions or a folder of images",
        description="Meta-train an MGG (unlabeled images) on a bundled source model and save it.",
    )
    train.add_argument(
        "--data",
        default=BUNDLED,
        help="'bundled' (MNIST under the 4 validation corruptions) or a folder of png/jpg images",
    )
    train.add_argument("--arch", default="vit", help="source model: vit or resnet")
    train.add_argument("--output", type=Path, default=Path("mgg.pt"), help="where to save the MGG")
    train.add_argument(
        "--n-images", type=_positive_int, default=BenchmarkConfig.n_meta, help="at most this many images"
    )
    train.add_argument("--batch-size", type=_positive_int, default=BenchmarkConfig.batch_size)
    train.add_argument(
        "--epochs", type=_positive_int, default=BenchmarkConfig.meta_epochs, help="passes over the images"
    )
    train.add_argument("--adapt-lr", type=_positive_float, default=1e-3, help="step size of the adaptation")
    train.add_argument(
        "--mgg-lr", type=_positive_float, default=BenchmarkConfig.mgg_lr, help="Adam lr of the MGG itself"
    )
    train.add_argument("--loss", choices=("foa", "entropy"), default="foa")
    _cache(train)
    _common(train)

    adapt = sub.add_parser(
        "adapt",
        **fmt,
        help="evaluate a saved MGG against NoAdapt/Tent/Adam",
        description="Evaluate a saved MGG against the baselines: on the bundled benchmark (learning rates "
        "tuned on the validation corruptions, as in the demo) or on a folder of images with the "
        "given learning rates (accuracy if the folder has class subfolders named 0..9).",
    )
    adapt.add_argument("--mgg", type=Path, required=True, help="an MGG saved by 'train' (MGG.save)")
    adapt.add_argument("--data", default=BUNDLED, help="'bundled' or a folder of png/jpg images")
    adapt.add_argument(
        "--lr",
        type=_positive_float,
        nargs=3,
        metavar=("TENT", "ADAM", "MGG"),
        default=None,
        help="learning rates for a folder (default: the middle of each tuning grid)",
    )
    _benchmark_sizes(adapt)
    _cache(adapt)
    _common(adapt)

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


def _say(message: str) -> None:
    print(message, flush=True)


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

    _say(format_text(results))
    paths = write_reports(results, out)
    _say("")
    _say(f"Results: {paths['json']}, {paths['markdown']}, plot {paths['plot']}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The benchmark at demo size, with timing of the whole run."""
    from mgg_fast.shift_benchmark import run_benchmark
    from mgg_fast.shift_data import resolve_cache_dir

    device = resolve_device(args.device)
    cfg = _benchmark_config(args, device)
    cfg.n_seeds, cfg.recipes, cfg.threads = args.seeds, tuple(args.recipes), args.threads
    cfg.validate()
    cache = resolve_cache_dir(args.cache_dir)
    _say(f"mgg_fast demo on {device}: archs {', '.join(cfg.archs)}, {cfg.n_seeds} seed(s); cache {cache}")
    start = time.perf_counter()
    results = run_benchmark(cfg, cache_dir=cache, progress=not args.no_progress, log=_say)
    _report(results, args.out)
    _say(f"Total time {time.perf_counter() - start:.0f} s (data and source models cached in {cache})")


def _source(arch: str, args: argparse.Namespace, device: torch.device) -> Any:
    from mgg_fast.source_models import source_model

    return source_model(
        arch,
        epochs=args.source_epochs,
        n_train=args.source_images,
        seed=args.seed,
        cache_dir=args.cache_dir,
        device=device,
        progress=not args.no_progress,
    )


def _folder(path: str) -> Any:
    from mgg_fast.shift_data import load_image_folder

    return load_image_folder(path)


def cmd_train(args: argparse.Namespace) -> None:
    """Meta-train an MGG and save it."""
    from mgg_fast.meta_training import train_mgg
    from mgg_fast.shift_benchmark import BenchmarkConfig, clean_source_stats, meta_batches
    from mgg_fast.shift_data import resolve_cache_dir, to_tensor

    device = resolve_device(args.device)
    cache = resolve_cache_dir(args.cache_dir)
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
    if args.loss == "foa" and min(len(b) for b in batches) < 2:
        raise CLIError("the foa loss needs batches of at least 2 images; use --loss entropy or more images")
    torch.manual_seed(args.seed)
    src = _source(args.arch, args, device)
    stats = clean_source_stats(src.model) if args.loss == "foa" else None
    _say(
        f"meta-training an MGG on {what} ({args.arch} source model, {args.epochs} epochs, "
        f"adapt lr {args.adapt_lr})"
    )
    mgg = train_mgg(
        src.model,
        batches,
        epochs=args.epochs,
        mgg_lr=args.mgg_lr,
        adapt_lr=args.adapt_lr,
        loss=args.loss,
        source_stats=stats,
        seed=args.seed,
        progress=not args.no_progress,
    )
    mgg.save(args.output)
    _say(f"saved the MGG to {args.output}")


def cmd_adapt(args: argparse.Namespace) -> None:
    """Evaluate a saved MGG against the baselines."""
    from mgg_fast.mgg import MGG

    device = resolve_device(args.device)
    try:
        mgg = MGG.load(args.mgg, map_location=device)
    except FileNotFoundError:
        raise CLIError(f"no MGG checkpoint at {args.mgg} (make one with 'mgg-fast train')") from None
    if args.data == BUNDLED:
        from mgg_fast.shift_benchmark import run_benchmark

        cfg = _benchmark_config(args, device)
        results = run_benchmark(
            cfg, cache_dir=args.cache_dir, mgg=mgg, progress=not args.no_progress, log=_say
        )
        _report(results, args.out)
        return
    _adapt_folder(args, device, mgg)


def _adapt_folder(args: argparse.Namespace, device: torch.device, mgg: Any) -> None:
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
        src = _source(arch, args, device)
        stats = clean_source_stats(src.model)
        _say(f"{arch} on {len(data)} images from {args.data} ({'labeled' if data.labeled else 'unlabeled'})")
        for method in METHODS:
            runner = Runner(
                src.model, method, lr=lrs.get(method), mgg=mgg, stats=stats, mgg_memory=args.mgg_memory
            )
            correct, confidence = 0, 0.0
            for x, y in batches:
                probs = runner(x).softmax(1).cpu()
                confidence += float(probs.max(1).values.sum())
                correct += int((probs.argmax(1) == y).sum())
            acc = f"accuracy {100 * correct / len(data):5.1f}%  " if data.labeled else ""
            _say(
                f"  {LABELS[method]:<11} lr {lrs.get(method, 0):<8g} {acc}mean confidence "
                f"{confidence / len(data):.3f}  {1e3 * runner.seconds / runner.batches:.1f} ms/batch"
            )


def cmd_bench(args: argparse.Namespace) -> None:
    """Time optimizer steps at a few sizes."""
    from tqdm.auto import tqdm

    from mgg_fast.mgg import MGG
    from mgg_fast.optimizer import MGGOptimizer

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ([38_400, 1 << 20, 8 << 20] if cuda else [4_608, 38_400])
    steps = args.steps or (50 if cuda else 10)
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
    _say(f"optimizer step on {where}, torch {torch.__version__}")
    _say(f"{'coords':>10}  {'optimizer':<20} {'µs/step':>10} {'coords/s':>10}")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for n in tqdm(sizes, desc="sizes", disable=args.no_progress, leave=False):
        params = [t.to(device).requires_grad_(True) for t in torch.randn(n, generator=gen).split(768)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-2
        for name, make in kinds:
            opt = make(params)
            seconds = _time_steps(opt, steps, device)
            _say(f"{n:>10,}  {name:<20} {1e6 * seconds:>10.1f} {n / seconds:>10.3g}")


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


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "adapt": cmd_adapt, "bench": cmd_bench}


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
    except (ValueError, OSError, ImportError) as exc:  # bad paths, files, names, missing extras
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
