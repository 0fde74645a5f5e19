"""``bench``: optimizer-step throughput: the reference step, the fused step (CUDA), torch Adam."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mgg_fast.cli.common import (
    CLIError,
    available_memory,
    common_options,
    list_of,
    positive_int,
    resolve_device,
    say,
    show_progress,
)

if TYPE_CHECKING:
    import torch


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``bench`` subcommand's options."""
    p = sub.add_parser(
        "bench",
        **fmt,
        description="Time one optimizer step over N coordinates (tensors of 768, like ViT-B/16 norms): "
        "the reference MGG step, the fused Triton step (CUDA only; also with bf16 memory matrices) "
        "and torch Adam(foreach).",
    )
    p.add_argument(
        "--sizes",
        type=list_of(positive_int),
        default=None,
        help="coordinate counts (default 4608,38400 on CPU; 38400,1048576,8388608 on CUDA)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="timed steps per size (default 10; CUDA 50)"
    )
    common_options(p, seed="seed of the random parameters and gradients that are timed")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Time optimizer steps at a few sizes."""
    import torch
    from tqdm.auto import tqdm

    from mgg_fast.core.mgg import MGG
    from mgg_fast.optim.optimizer import MGGOptimizer

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
    fused = "triton" if cuda else "cpu"
    kinds[1:1] = [
        (name, lambda ps, w=w: MGGOptimizer(ps, MGG().to(device), backend=fused, memory_W_dtype=w))
        for name, w in (("MGG fused", None), ("MGG fused, bf16 W", torch.bfloat16))
    ]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} torch thread(s)"
    say(f"optimizer step on {where}, torch {torch.__version__}")
    if not cuda:
        from mgg_fast.kernels.cpu_step import cpu_step_unavailable_reason

        why = "--device cpu" if torch.cuda.is_available() else "no CUDA GPU on this machine"
        say(f"MGG fused: the fused CPU step (the Triton step runs on a CUDA GPU only: {why})")
        reason = cpu_step_unavailable_reason()
        if reason is not None:
            say(f"MGG fused: not timed, the fused CPU step cannot run here ({reason})")
            kinds = [k for k in kinds if not k[0].startswith("MGG fused")]
    say(f"{'coords':>10}  {'optimizer':<20} {'µs/step':>10} {'coords/s':>10}")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for n in tqdm(sizes, desc="sizes", disable=not show_progress(args), leave=False):
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
