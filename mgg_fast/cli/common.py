"""What every command shares: one-line errors, the help layout, argument types and option
groups, devices, output checks, progress bars and the report line. Nothing here runs a command;
each command is a module of :mod:`mgg_fast.cli`.

Building the parser and printing ``--help`` import no torch, timm or triton (a second or more
on a busy machine): this module imports them inside the functions that need them, and the
bundled benchmark's defaults come from :mod:`mgg_fast.evaluation.bundled.config`, which
imports no torch either.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

from mgg_fast.evaluation.bundled.config import REGIMES, BenchmarkConfig  # torch-free

EXIT_USAGE = 2
EXIT_FAILURE = 1
BUNDLED = "bundled"
# The flag to lower when a command runs out of memory.
OOM_FLAG = {"bench": "--sizes"}  # every other command: --batch-size
# adapt --model without --method: the baselines, and the MGG when --mgg gives one
DEFAULT_METHODS = ("noadapt", "tent", "adam")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, written as a user would type it: a list as
    ``a,b``; none where the option is unset by default (``None``), a flag, or empty (the help
    says what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if "%(default)" in text or not action.option_strings or unset or default in ([], (), {}):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


# Where the numbers of the bundled benchmark must not depend on the CPU: torch's vectorised kernels
# at AVX2 (not AVX-512), MKL in its conditional-numerical-reproducibility mode at AVX2, and oneDNN
# at most AVX2, so that AVX2 and AVX-512 machines run the same code paths. Read when torch loads.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """One torch thread per core that other processes leave free, judged by the 1-minute load
    average, at least one: torch's threads wait on each other, so a thread on a core another
    process holds slows the whole step many times over (bench/RESULTS.md)."""
    cores = usable_cpus()
    try:
        busy = math.floor(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, cores - busy)


def pin_cpu_numerics() -> bool:
    """Set :data:`PINNED_NUMERICS` (unless the user set them) if torch has not loaded yet; returns
    whether the pins are in effect (a process that already imported torch keeps its own)."""
    if "torch" in sys.modules:
        return all(os.environ.get(k) == v for k, v in PINNED_NUMERICS.items())
    for key, value in PINNED_NUMERICS.items():
        os.environ.setdefault(key, value)
    return all(os.environ.get(k) == v for k, v in PINNED_NUMERICS.items())


# ---- argument types ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def model_kwargs(text: str) -> dict[str, Any]:
    from mgg_fast.evaluation.models import parse_model_args

    try:
        return parse_model_args(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [item(p) for p in parts]

    return parse


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available else CPU; otherwise a checked ``cpu`` / ``cuda[:i]`` device."""
    import torch

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
    import torch

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


# ---- option groups -------------------------------------------------------------------------------


def common_options(
    p: argparse.ArgumentParser,
    seed: str = "seed of the corruptions, source-model training and the MGG",
    threads: int | None = None,
) -> None:
    """``--device``, ``--seed`` (``seed``: what it seeds in this command), ``--threads``
    (``threads``: the command's fixed default; ``None``: :func:`auto_threads`) and
    ``--no-progress``."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help=seed)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=threads,
        help="torch CPU threads"
        + (
            " (fixed: results depend on the thread count)"
            if threads is not None
            else "; unset: one per core that other processes leave free (the 1-minute load average)"
        ),
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (there are none either when stderr is not a terminal)",
    )


def bundled_group(p: argparse.ArgumentParser) -> Any:
    """The titled help section of the options that only the bundled models read."""
    return p.add_argument_group("the bundled models (without --model)")


def cache_options(p: argparse.ArgumentParser, bundled: Any = None) -> None:
    """The cache and the bundled source models' training; ``bundled``: where the options only the
    bundled models read go (an argument group; default ``p``)."""
    bundled = p if bundled is None else bundled
    bundled.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache of corrupted data and source models; unset: $MGG_FAST_CACHE, else ~/.cache/mgg_fast",
    )
    bundled.add_argument(
        "--source-epochs",
        type=positive_int,
        default=None,
        help="source-model training epochs; unset: the per-arch recipe",
    )
    p.add_argument(
        "--source-images",
        type=positive_int,
        default=None,
        help="clean images to train the bundled source models on (unset: all 3,500), or to take from "
        "--source-data (unset: 512)",
    )


def benchmark_options(p: argparse.ArgumentParser, bundled: Any = None) -> None:
    """The benchmark's regime, sizes and report folder; ``bundled``: as in :func:`cache_options`."""
    bundled = p if bundled is None else bundled
    bundled.add_argument(
        "--regime",
        choices=tuple(REGIMES),
        default="demo",
        help="stream regime: demo (the defaults), long (LayerNorm ViT, batch 16, 300 updates per "
        "corruption), small-batch (batch 8), label-shift (class-imbalanced order), mixed (also a "
        "mixed-domain stream); the options below override it",
    )
    bundled.add_argument(
        "--archs",
        type=list_of(str),
        default=None,
        help="bundled source models: vit,resnet (unset: the regime's)",
    )
    p.add_argument(
        "--corruptions",
        type=list_of(str),
        default=None,
        help="comma-separated test corruptions; unset: all 15 (with --model: 'all' or unset is every "
        "corruption folder)",
    )
    bundled.add_argument(
        "--n-test",
        type=positive_int,
        default=None,
        help="images per test corruption (more than the split's 1,000 re-corrupts it; unset: the regime's)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"test-time batch size (unset: the regime's; {BenchmarkConfig.batch_size} with --model)",
    )
    p.add_argument("--out", type=Path, default=Path("mgg_fast_results"), help="report folder")
    p.add_argument(
        "--mgg-memory",
        choices=("float32", "bfloat16"),
        default="float32",
        help="storage of the MGG optimizer's per-coordinate memory matrices (bfloat16: less memory "
        "traffic, slightly different results)",
    )


def user_model_options(p: argparse.ArgumentParser, required: bool = False) -> Any:
    """The --model options, in their own titled help section (returned, for a command's own
    --model options)."""
    g = p.add_argument_group("your own model and data (timm, with --model)")
    g.add_argument(
        "--model",
        required=required,
        default=None,
        help="a timm model name (timm.create_model)" + ("" if required else "; unset: the bundled models"),
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
        type=model_kwargs,
        default={},
        metavar="K=V,...",
        help="more timm.create_model arguments, e.g. num_classes=10,img_size=64",
    )
    g.add_argument(
        "--input-size",
        type=positive_int,
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
        "--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), help="DataLoader processes"
    )
    return g


def source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--source-stats",
        type=Path,
        default=None,
        help="FOA source statistics: a file of the stats command or the published train_info.pt",
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


# ---- what the commands share ---------------------------------------------------------------------


def say(message: str) -> None:
    """A line of the command's report on stdout, flushed (progress bars go to stderr); under
    torchrun only rank 0 reports."""
    from mgg_fast.tta.data_parallel import is_rank_zero

    if is_rank_zero():
        print(message, flush=True)


def stderr_is_terminal() -> bool:
    """Whether stderr, where the progress bars go, is a terminal: else :func:`mgg_fast.cli.main`
    sets ``--no-progress`` (a bar written to a log file or a pipe is thousands of lines)."""
    return sys.stderr.isatty()


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: unless ``--no-progress`` (given, or stderr is no
    terminal), and under torchrun on rank 0 only."""
    from mgg_fast.tta.data_parallel import is_rank_zero

    return not args.no_progress and is_rank_zero()


def meta_train_and_save(
    model: Any,
    batches: list[torch.Tensor],
    loss: str,
    stats: Any,
    args: argparse.Namespace,
    *,
    data_parallel: bool = False,
) -> None:
    """Meta-train an MGG for ``model`` with the train options, report the meta-loss of the first
    and the last epoch (the mean over an epoch's batches, each epoch a fresh adaptation run) and
    save it to ``--output`` (rank 0 saves when the processes train data-parallel)."""
    from mgg_fast.tta.data_parallel import is_rank_zero
    from mgg_fast.tta.meta_training import train_mgg

    history: list[dict[str, float]] = []
    mgg = train_mgg(
        model,
        batches,
        epochs=args.epochs,
        patience=args.patience,
        mgg_lr=args.mgg_lr,
        adapt_lr=args.adapt_lr,
        loss=loss,
        source_stats=stats,
        seed=args.seed,
        progress=show_progress(args),
        history=history,
        data_parallel=data_parallel,
    )
    first, last = history[0]["mean_loss"], history[-1]["mean_loss"]
    if len(history) == 1:
        say(f"meta-loss (mean over the epoch's batches): {first:.4f}, one epoch")
    else:
        say(
            f"meta-loss (mean over an epoch's batches): epoch 1 {first:.4f}, epoch {len(history)} "
            f"{last:.4f} ({last - first:+.4f})"
        )
    if is_rank_zero():
        mgg.save(args.output)
    say(f"saved the MGG to {args.output}")


def rank_parts(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's part of every meta-training batch under torchrun (equal parts)."""
    from mgg_fast.tta.data_parallel import rank_part

    try:
        return [rank_part(b) for b in batches]
    except ValueError as exc:
        raise CLIError(
            f"{exc}: under torchrun, meta-training needs batches (--batch-size, and --n-images for the "
            "last one) that divide evenly over the processes"
        ) from None


def load_mgg(path: Path, device: torch.device) -> Any:
    """``MGG.load`` (ours or the published format); a missing file is a CLI error naming ``train``."""
    from mgg_fast.core.mgg import MGG

    try:
        return MGG.load(path, map_location=device)
    except FileNotFoundError:
        raise CLIError(f"no MGG checkpoint at {path} (make one with the train command)") from None


def check_meta_batches(loss: str, batches: Sequence[torch.Tensor], batch_size: int) -> None:
    """Refuse meta-training data that cannot train the MGG, before any model work: an epoch of
    one batch (its loss comes before the epoch's first MGG update, so no meta-gradient ever
    reaches the MGG and the saved one would be the untrained seed), and for the FOA loss (a
    batch std) a batch of one image."""
    images = sum(len(b) for b in batches)
    if len(batches) < 2:
        smaller = f"--batch-size {images // 2} or less" if images >= 2 else "more images"
        raise CLIError(
            f"{images} image(s) at --batch-size {batch_size} make 1 meta-training batch per epoch: the "
            f"MGG gets no meta-gradient from an epoch's first batch, so it would stay untrained; use "
            f"{smaller} (2 batches or more)"
        )
    if loss == "foa" and min(len(b) for b in batches) < 2:
        raise CLIError("the foa loss needs batches of at least 2 images; use --loss entropy or more images")
