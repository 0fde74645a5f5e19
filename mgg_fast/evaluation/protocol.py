"""The one evaluation protocol: online accuracy of a method on streams of batches.

Every suite (the bundled benchmark, the real network, the user's folders) measures through
these pieces. *Online*: each batch is predicted with the parameters of that moment, then adapted
on. *Episodic*: the method is reset before each stream (corruption); *continual*: one run over
all streams, never reset; *mixed* (where asked for): one run over a stream whose batches mix the
corruptions. ``acc@k`` is the accuracy of the batch predicted after exactly ``k``
updates (episodic, averaged over streams); ``updates_to_tent`` the first ``k`` whose ``acc@k``
reaches Tent's final accuracy (the mean of its last :data:`FINAL_POINTS` ``acc@k``). Learning
rates are tuned with :func:`tune` on validation streams only.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mgg_fast.core.mgg import MGG
from mgg_fast.evaluation.streams import Batch
from mgg_fast.tta.registry import MethodOptions, build_adapter

SETTINGS = ("episodic", "continual")  # the settings of every suite; "mixed" where a suite asks
ACC_AT = (1, 5, 10)
FINAL_POINTS = 3  # Tent's final accuracy: the mean of its last 3 acc@k

Counts = list[tuple[int, int]]  # (correct, size) of each batch of a stream, in order


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One registered method on a private copy of the model: predict a batch, then adapt on it
    (timed: the whole batch, and the optimizer step alone).

    ``options`` (:class:`~mgg_fast.tta.registry.MethodOptions`) carries what the method reads
    besides its learning rate; an episodic adapter (``options.episodic``) is reset before every
    batch. A batch smaller than ``min_batch`` (the FOA loss's batch std needs two images) is
    predicted but not adapted on, and counted in :attr:`small_batches`. With
    ``options.data_parallel`` every rank calls the runner on the same whole batches (see
    :class:`~mgg_fast.tta.mgtta.MGTTA`'s ``whole_batches``). ``dtype``: the copy of the model, the
    MGG and the inputs are cast to it (float64: evaluations that agree across CPUs)."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        *,
        lr: float | None = None,
        options: MethodOptions | None = None,
        min_batch: int = 1,
        dtype: torch.dtype | None = None,
    ):
        options = options or MethodOptions()
        self.model = copy.deepcopy(model)
        if dtype is not None:
            self.model.to(dtype)
            if options.mgg is not None and options.mgg.W1.dtype != dtype:
                options = replace(options, mgg=copy.deepcopy(options.mgg).to(dtype))
        self.dtype = dtype
        self.device = next(self.model.parameters()).device
        self.adapter = build_adapter(method, self.model, lr, options)
        if self.adapter is None:
            self.model.eval()
        mask = options.class_mask
        self.class_mask = None if mask is None else torch.as_tensor(list(mask), device=self.device)
        self.min_batch = min_batch
        self.seconds = 0.0
        self.step_seconds = 0.0
        self.batches = 0
        self.small_batches = 0

    @property
    def updates(self) -> int:
        """Optimizer steps taken since construction."""
        return 0 if self.adapter is None else self.adapter.total_updates

    def reset(self) -> None:
        """Back to the source model and a fresh optimizer state."""
        if self.adapter is not None:
            self.adapter.reset()

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits of ``x`` under the current parameters; adapts on ``x`` afterwards (on its labels
        ``y`` for the supervised oracle, the one method that reads them)."""
        if self.dtype is not None:
            x = x.to(self.dtype)
        _sync(self.device)
        start = time.perf_counter()
        adapter = self.adapter
        if adapter is not None and len(x) < self.min_batch:
            self.small_batches += 1
            adapter = None
        if adapter is None:
            with torch.no_grad():
                logits = self.model(x)
            if self.class_mask is not None:
                logits = logits[:, self.class_mask]
        else:
            if adapter.episodic:
                adapter.reset()
            if adapter.needs_labels:
                if y is None:
                    raise ValueError("the supervised oracle needs the batch's labels")
                adapter.set_labels(y)
            logits = adapter.forward_backward(x)
            _sync(self.device)
            step_start = time.perf_counter()
            adapter.step()
            _sync(self.device)
            self.step_seconds += time.perf_counter() - step_start
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return logits

    def run(self, batches: list[Batch]) -> Counts:
        """``(correct, size)`` per batch of one stream, in order (no reset)."""
        out = []
        for x, y in batches:
            pred = self(x, y).argmax(1).cpu()
            out.append((int((pred == y).sum()), len(y)))
        return out


def accuracy(counts: Counts) -> float:
    """The fraction correct over every batch of ``counts``."""
    return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))


def episodic_accuracy(runner: Runner, streams: dict[str, list[Batch]]) -> dict[str, Counts]:
    """Per-batch counts of every stream, resetting the runner before each."""
    result = {}
    for name, batches in streams.items():
        runner.reset()
        result[name] = runner.run(batches)
    return result


def continual_accuracy(runner: Runner, streams: dict[str, list[Batch]]) -> dict[str, Counts]:
    """Per-batch counts of the streams run one after the other from one reset (never reset again)."""
    runner.reset()
    return {name: runner.run(batches) for name, batches in streams.items()}


def summarize(per_stream: dict[str, Counts], batch_size: int) -> dict[str, Any]:
    """Accuracy per stream and mean, the ``acc@k`` curve and ``acc@1/5/10`` (see the module doc).

    ``curve[k]`` averages over the streams that have a full batch ``k`` (so every point weighs
    about the same number of images per stream): every batch of a stream but its last one, and
    the last one if it holds ``batch_size`` images or more. So the short rest of a stream is left
    out (a stream smaller than one batch gives no point), while a batch that lost an unreadable
    image (the user's folders: the loader skips it and the batch is one image short) still
    counts: one bad file does not cut the curve.
    """
    per = {name: accuracy(counts) for name, counts in per_stream.items()}
    length = max((len(c) for c in per_stream.values()), default=0)
    curve = []
    for k in range(length):
        accs = [
            c[k][0] / c[k][1]
            for c in per_stream.values()
            if len(c) > k and (k < len(c) - 1 or c[k][1] >= batch_size)
        ]
        if not accs:
            break
        curve.append(float(np.mean(accs)))
    return {
        "per_corruption": per,
        "mean": float(np.mean(list(per.values()))) if per else float("nan"),
        "curve": curve,
        "acc_at": {str(k): (curve[k] if k < len(curve) else None) for k in ACC_AT},
    }


def updates_to_reach(curve: list[float], target: float) -> int | None:
    """The first ``k`` with ``curve[k] >= target``; ``None`` if the curve never gets there."""
    return next((k for k, acc in enumerate(curve) if acc >= target), None)


def final_accuracy(curve: list[float]) -> float:
    """The mean of the last :data:`FINAL_POINTS` points of an ``acc@k`` curve."""
    return float(np.mean(curve[-FINAL_POINTS:])) if curve else float("nan")


def mark_updates_to_tent(methods: dict[str, dict[str, Any]]) -> None:
    """Set every method's ``updates_to_tent`` (see the module doc) in place; ``None`` without Tent."""
    target = final_accuracy(methods["tent"]["episodic"]["curve"]) if "tent" in methods else None
    for r in methods.values():
        r["updates_to_tent"] = None if target is None else updates_to_reach(r["episodic"]["curve"], target)


def validation_scores(
    runner: Runner, streams: dict[str, list[Batch]], batch_size: int, mixed: list[Batch] | None = None
) -> dict[str, float]:
    """The scores that choose a setting's learning rate: the mean episodic online accuracy over
    the streams, the online accuracy of one continual run over them and, given the ``mixed``
    stream, of one run over it."""
    scores = {
        "episodic": summarize(episodic_accuracy(runner, streams), batch_size)["mean"],
        "continual": accuracy([c for cs in continual_accuracy(runner, streams).values() for c in cs]),
    }
    if mixed is not None:
        runner.reset()
        scores["mixed"] = accuracy(runner.run(mixed))
    return scores


Choice = tuple[float | None, MGG | None]  # (lr, MGG) of a setting


def tune(
    score: Callable[[float, MGG | None], dict[str, float]], candidates: list[tuple[float, MGG | None]]
) -> tuple[dict[str, Choice], dict[str, dict[str, float]]]:
    """The best ``(lr, mgg)`` per setting by ``score`` (:func:`validation_scores` on validation
    streams), the first of equals; and every candidate's scores by setting and lr."""
    scores: dict[str, dict[str, float]] = {}
    best: dict[str, tuple[float, float, MGG | None]] = {}
    for lr, mgg in candidates:
        for setting, value in score(lr, mgg).items():
            scores.setdefault(setting, {})[f"{lr:g}"] = value
            if setting not in best or value > best[setting][0]:
                best[setting] = (value, lr, mgg)
    return {s: (b[1], b[2]) for s, b in best.items()}, scores


def evaluate(
    make_runner: Callable[[float | None, MGG | None], Runner],
    chosen: dict[str, Choice],
    streams: dict[str, list[Batch]],
    batch_size: int,
    mixed: list[Batch] | None = None,
) -> dict[str, Any]:
    """Online accuracy on the test streams in each setting of ``chosen`` (episodic, continual and,
    given the ``mixed`` stream, mixed), each with its own ``(lr, mgg)`` (a runner is reused where
    they are the same), and the time per batch of the episodic run."""
    runners: dict[Choice, Runner] = {}

    def runner_for(setting: str) -> Runner:
        choice = chosen[setting]
        if choice not in runners:
            runners[choice] = make_runner(*choice)
        return runners[choice]

    runner = runner_for("episodic")
    out: dict[str, Any] = {"episodic": summarize(episodic_accuracy(runner, streams), batch_size)}
    out["ms_per_batch"] = 1e3 * runner.seconds / runner.batches
    out["step_ms_per_batch"] = 1e3 * runner.step_seconds / runner.batches
    out["continual"] = summarize(continual_accuracy(runner_for("continual"), streams), batch_size)
    if mixed is not None:
        runner = runner_for("mixed")
        runner.reset()
        out["mixed"] = summarize({"mixed": runner.run(mixed)}, batch_size)
    out["lr"] = {s: chosen[s][0] for s in chosen}
    return out


@contextlib.contextmanager
def reproducible(threads: int | None) -> Iterator[None]:
    """Fixed torch thread count (if given) and deterministic algorithms, restored afterwards.

    On the CPU the float results of a run depend on the thread count (how reductions are split)
    and on the instruction set the kernels dispatch to (AVX-512 vs AVX2)."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
