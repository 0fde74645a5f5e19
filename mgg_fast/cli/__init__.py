"""Command line: ``python -m mgg_fast {demo,train,adapt,stats,realnet,bench}`` (or ``mgg-fast``).

One module per command, each with ``add_parser`` (its options) and ``run`` (the command):

* ``demo``    the distribution-shift benchmark on bundled data (corrupted MNIST): NoAdapt, Tent,
  Adam, SAR, EATA and a meta-trained MGG; prints the tables, writes JSON, Markdown and a PNG.
* ``train``   meta-train an MGG on bundled validation corruptions or on a folder of images; with
  ``--model``: for any timm model, on your ImageNet-C / ImageFolder tree.
* ``adapt``   evaluate a saved MGG against the baselines on the bundled benchmark or a folder;
  with ``--model``: adapt a timm model on your folders, resumable.
* ``stats``   FOA source statistics of a timm model over clean images.
* ``realnet`` a real ImageNet network (MobileNetV2) adapted on corrupted real photos.
* ``bench``   optimizer-step throughput: the reference step, the fused step, torch Adam.
* ``assets``  train the source models and MGGs the demo ships (with their manifest).

Bad arguments, paths and files end with a one-line message and exit status 2, no traceback;
outputs are checked before any work, and nothing is written half. ``--help`` imports only the
asked command's module, and no torch, timm or triton (but ``demo``'s). Progress bars are drawn
only when stderr is a terminal. Nothing imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mgg_fast.cli import common
from mgg_fast.cli.common import EXIT_FAILURE, EXIT_USAGE, OOM_FLAG, CLIError, HelpFormatter, Parser

# Each command's one-line summary in the top-level help; its module (mgg_fast.cli.<name>) is
# imported only when the command is run or asked for its --help.
COMMANDS = {
    "demo": "benchmark the MGG against the hand-made optimizers on corrupted MNIST (bundled data)",
    "train": "meta-train an MGG on bundled validation corruptions or a folder; --model: for your timm model",
    "adapt": "evaluate a saved MGG against the baselines; --model: adapt your timm model on your data",
    "stats": "FOA source statistics of your model on clean images (for adapt/train --source-stats)",
    "realnet": "adaptation check on a real ImageNet network: MobileNetV2 on corrupted photos",
    "bench": "optimizer-step throughput: reference vs fused (CUDA) vs torch Adam",
    "assets": "train the source models and MGGs the demo ships (with their manifest)",
}
PROG = "mgg-fast"


def build_parser(command: str | None = None, prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser: every command listed with its summary, and ``command``'s own options
    (the other commands' modules are not imported, so that ``--help`` is quick)."""
    parser = Parser(prog=prog, description="Fast Meta Gradient Generator (MGG) for test-time adaptation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name == command:
            module = importlib.import_module(f"{__name__}.{name}")
            module.add_parser(sub, {"formatter_class": HelpFormatter})
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``mgg-fast`` and (with ``prog="python -m mgg_fast"``) of ``python -m
    mgg_fast``; returns the exit status. Errors name the program as the user invoked it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None, prog)
    args = parser.parse_args(argv)
    args.no_progress = args.no_progress or not common.stderr_is_terminal()  # no bars in a log
    if getattr(args, "pin_numerics", False):  # before the command loads torch
        common.pin_cpu_numerics()
    if args.threads is None:
        args.threads = common.auto_threads()
    where = f"{prog} {args.command}"
    import torch  # the command's options are checked: now load it, with its thread count

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    finished = False
    try:
        args.run(args)
        finished = True
    except CLIError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(exc):
            raise
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        flag = OOM_FLAG.get(args.command, "--batch-size")
        print(f"{where}: error: out of memory ({text[:200]}); lower {flag}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:  # bad paths, files, names: the user's input
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # a missing optional extra
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    finally:
        from mgg_fast.tta.data_parallel import close_process_group

        close_process_group(synchronize=finished)
        torch.set_num_threads(threads)
    return 0


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text
