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
outputs are checked before any work, and nothing is written half. Nothing imports this package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mgg_fast.cli import adapt, assets, bench, demo, realnet, stats, train
from mgg_fast.cli.common import EXIT_FAILURE, EXIT_USAGE, OOM_FLAG, CLIError, Parser
from mgg_fast.tta.data_parallel import close_process_group

COMMANDS = (demo, train, adapt, stats, realnet, bench, assets)


def build_parser() -> argparse.ArgumentParser:
    """The ``mgg-fast`` argument parser with its subcommands."""
    parser = Parser(
        prog="mgg-fast", description="Fast Meta Gradient Generator (MGG) for test-time adaptation."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    for command in COMMANDS:
        command.add_parser(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mgg_fast`` / ``mgg-fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"mgg-fast {args.command}"
    try:
        args.run(args)
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
    import torch

    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text
