"""The test-time adaptation methods by name: one registry that every caller uses.

A method is a name, a label for reports, its default learning rate and a factory that wraps a
model (``None``: NoAdapt, the model as it is). Besides the test-time methods it names two
reference rows: ``bn-stats`` (test-batch normalisation alone) and ``supervised`` (an oracle
that adapts on the labels). Adding a baseline means one new file in
:mod:`mgg_fast.tta` (a subclass of :class:`~mgg_fast.tta.mgtta.MGTTA`) and one
:func:`register` line below. :class:`MethodOptions` carries what the methods may read besides
the model and the learning rate; each factory takes what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mgg_fast.core.mgg import MGG
from mgg_fast.tta.eata import EATA, IMAGENET_D_MARGIN
from mgg_fast.tta.eata import PUBLISHED_LR as EATA_LR
from mgg_fast.tta.mgtta import DEFAULT_LR, MGTTA
from mgg_fast.tta.sar import PUBLISHED_LR as SAR_LR
from mgg_fast.tta.sar import SAR
from mgg_fast.tta.source_stats import SourceStats
from mgg_fast.tta.supervised import SupervisedOracle

MEMORY_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # MGG memory_W storage by name


def memory_dtype(name: str) -> torch.dtype | None:
    """The ``memory_W_dtype`` of a storage name (``--mgg-memory``); ``ValueError`` for an unknown one."""
    if name not in MEMORY_DTYPES:
        raise ValueError(f"mgg-memory must be one of {', '.join(MEMORY_DTYPES)}, got {name!r}")
    return MEMORY_DTYPES[name]


@dataclass
class MethodOptions:
    """What a method may need besides the model and its learning rate.

    ``loss``/``source_stats`` are the shared loss of Tent, Adam and the MGG (SAR and EATA keep
    their own); ``fisher``/``eata_d_margin`` serve EATA (:func:`~mgg_fast.tta.eata.eata_fisher`;
    a ``None`` Fisher runs EATA without its regulariser). ``data_parallel``: every rank passes
    the whole batch and adapts on its part (``MGTTA(whole_batches=True)``)."""

    mgg: MGG | None = None
    loss: str = "foa"
    source_stats: SourceStats | None = None
    backend: str = "auto"
    memory_W_dtype: torch.dtype | None = None
    episodic: bool = False
    class_mask: Sequence[int] | None = None
    fisher: Sequence[Tensor] | None = None
    eata_d_margin: float = IMAGENET_D_MARGIN
    data_parallel: bool = False


Factory = Callable[[nn.Module, float, MethodOptions], MGTTA | None]


@dataclass(frozen=True)
class Method:
    """A registered method: ``build(model, lr, options)`` gives its adapter (``None``: NoAdapt)."""

    name: str
    label: str
    default_lr: float | None  # None: the method has no learning rate
    build: Factory
    shared_loss: bool  # minimises the options' loss (SAR and EATA: their own objective)
    kind: str = "method"  # "method" (test-time), "ablation" or "reference" (a row for comparison)


METHODS: dict[str, Method] = {}
# The hand-made optimizers of the shared loss: what the MGG is compared with as an optimizer.
HAND_MADE = ("tent", "adam", "signum")


def register(method: Method) -> Method:
    """Add a method under its name (once)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def label(key: str) -> str:
    """Display name of a result key: a method (``mgg-memoryless``), a method of the benchmark's
    other loss (``adam+entropy`` → ``Adam, entropy``) or of a meta-training recipe
    (``mgg-published`` → ``MGG (published)``)."""
    name, _, loss = key.partition("+")
    if name in METHODS:
        text = method(name).label
    else:
        base, _, variant = name.partition("-")
        text = f"{method(base).label} ({variant})"
    return f"{text}, {loss}" if loss else text


def names(kind: str = "method") -> tuple[str, ...]:
    """The registered names of one kind, in registration order."""
    return tuple(name for name, m in METHODS.items() if m.kind == kind)


def build_adapter(name: str, model: nn.Module, lr: float | None, options: MethodOptions) -> MGTTA | None:
    """The adapter of method ``name`` around ``model`` (configured in place), at ``lr`` (``None``:
    the method's default)."""
    m = method(name)
    return m.build(model, m.default_lr if lr is None else lr, options)


def _shared(optimizer: str, carry_memory: bool = True) -> Factory:
    """A factory of ``MGTTA`` with ``optimizer``: the shared loss, only the optimizer differs."""

    def build(model: nn.Module, lr: float, o: MethodOptions) -> MGTTA:
        return MGTTA(
            model,
            optimizer=optimizer,
            mgg=o.mgg if optimizer == "mgg" else None,
            lr=lr,
            loss=o.loss,
            source_stats=o.source_stats,
            episodic=o.episodic,
            class_mask=o.class_mask,
            backend=o.backend,
            memory_W_dtype=o.memory_W_dtype if optimizer == "mgg" else None,
            carry_memory=carry_memory,
            data_parallel=o.data_parallel,
            whole_batches=o.data_parallel,
        )

    return build


register(Method("noadapt", "NoAdapt", None, lambda model, lr, o: None, shared_loss=False))
register(Method("tent", "Tent (SGD)", DEFAULT_LR["sgd"], _shared("sgd"), shared_loss=True))
register(Method("adam", "Adam", DEFAULT_LR["adam"], _shared("adam"), shared_loss=True))
register(Method("signum", "Sign momentum", DEFAULT_LR["signum"], _shared("signum"), shared_loss=True))
register(
    Method(
        "sar",
        "SAR",
        SAR_LR,
        lambda model, lr, o: SAR(model, lr=lr, episodic=o.episodic),
        shared_loss=False,
    )
)
register(
    Method(
        "eata",
        "EATA",
        EATA_LR,
        lambda model, lr, o: EATA(
            model, lr=lr, fisher=o.fisher, d_margin=o.eata_d_margin, episodic=o.episodic
        ),
        shared_loss=False,
    )
)
register(Method("mgg", "MGG", DEFAULT_LR["mgg"], _shared("mgg"), shared_loss=True))
register(
    Method(
        "mgg-memoryless",
        "MGG, memoryless",
        DEFAULT_LR["mgg"],
        _shared("mgg", carry_memory=False),
        shared_loss=True,
        kind="ablation",
    )
)
# Reference rows, not test-time methods: test-batch normalisation alone, and the labels' oracle.
register(
    Method(
        "bn-stats",
        "BN statistics only",
        0.0,
        lambda model, lr, o: MGTTA(model, "sgd", lr=0.0, loss="entropy", episodic=o.episodic),
        shared_loss=False,
        kind="reference",
    )
)
register(
    Method(
        "supervised",
        "Supervised (oracle)",
        DEFAULT_LR["adam"],
        lambda model, lr, o: SupervisedOracle(model, lr=lr, episodic=o.episodic),
        shared_loss=False,
        kind="reference",
    )
)
