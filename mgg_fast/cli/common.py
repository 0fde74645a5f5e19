"""What every command shares: one-line errors, argument types and option groups, devices, output
checks, and the report line. Nothing here runs a command; each command is a module of
:mod:`mgg_fast.cli`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mgg_fast.tta.data_parallel import is_rank_zero, rank_part

if TYPE_CHECKING:
    import torch

EXIT_USAGE = 2
EXIT_FAILURE = 1
BUNDLED = "bundled"
# The flag to lower when a command runs out of memory.
OOM_FLAG = {"bench": "--sizes"}  # every other command: --batch-size


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


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
    import torch

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
    import torch

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


# ---- option groups -------------------------------------------------------------------------------


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the corruptions, source-model training and the MGG"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache of corrupted data and source models; unset: $MGG_FAST_CACHE, else ~/.cache/mgg_fast",
    )
    p.add_argument(
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


def benchmark_options(p: argparse.ArgumentParser) -> None:
    from mgg_fast.evaluation.bundled.config import REGIMES

    p.add_argument(
        "--regime",
        choices=tuple(REGIMES),
        default="demo",
        help="stream regime: demo (the defaults), long (LayerNorm ViT, batch 16, 300 updates per "
        "corruption), small-batch (batch 8), label-shift (class-imbalanced order), mixed (also a "
        "mixed-domain stream); the options below override it",
    )
    p.add_argument(
        "--archs", type=list_of(str), default=None, help="source models: vit,resnet (unset: the regime's)"
    )
    p.add_argument(
        "--corruptions",
        type=list_of(str),
        default=None,
        help="comma-separated test corruptions; unset: all 15 (with --model: 'all' or unset is every "
        "corruption folder)",
    )
    p.add_argument(
        "--n-test",
        type=positive_int,
        default=None,
        help="images per test corruption (more than the split's 1,000 re-corrupts it; unset: the regime's)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="test-time batch size (unset: the regime's)"
    )
    p.add_argument("--out", type=Path, default=Path("mgg_fast_results"), help="report folder")
    p.add_argument(
        "--mgg-memory",
        choices=("float32", "bfloat16"),
        default="float32",
        help="storage of the MGG optimizer's per-coordinate memory matrices (bfloat16: less memory "
        "traffic, slightly different results)",
    )


def user_model_options(p: argparse.ArgumentParser, required: bool = False) -> None:
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


def source_options(p: argparse.ArgumentParser) -> None:
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


# ---- what the commands share ---------------------------------------------------------------------


def say(message: str) -> None:
    """A line of the command's report on stdout, flushed (progress bars go to stderr); under
    torchrun only rank 0 reports."""
    if is_rank_zero():
        print(message, flush=True)


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: unless ``--no-progress``, and under torchrun on rank 0 only."""
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
    """Meta-train an MGG for ``model`` with the train options and save it to ``--output`` (rank 0
    saves when the processes train data-parallel)."""
    from mgg_fast.tta.meta_training import train_mgg

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


def load_mgg(path: Path, device: torch.device) -> Any:
    """``MGG.load`` (ours or the published format); a missing file is a CLI error naming ``train``."""
    from mgg_fast.core.mgg import MGG

    try:
        return MGG.load(path, map_location=device)
    except FileNotFoundError:
        raise CLIError(f"no MGG checkpoint at {path} (make one with 'mgg-fast train')") from None


def check_foa_batches(loss: str, batches: Sequence[torch.Tensor]) -> None:
    """The FOA loss takes a batch std: every meta-training batch needs two images."""
    if loss == "foa" and min(len(b) for b in batches) < 2:
        raise CLIError("the foa loss needs batches of at least 2 images; use --loss entropy or more images")
