"""MGGOptimizer: the published MGTTA step as a ``torch.optim.Optimizer``.

One way through a step, as in torch's Adam: ``step`` -> ``_prepare_group`` (validate, nothing
changes; :mod:`~mgg_fast.optim.validation`) -> the whole-step non-finite decision -> the
functional :func:`~mgg_fast.optim.functional.mgg_step` on the backend of the group's device.
``state[p]`` is the truth: whatever it holds when ``step()`` runs is what is stepped (see
:mod:`mgg_fast.optim.packed_state`).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from mgg_fast.core.mgg import MGG
from mgg_fast.optim.dtensor import REJECTED, is_dtensor, local_tensor, max_over_ranks, meshes
from mgg_fast.optim.functional import BACKENDS, mgg_step, resolve_backend
from mgg_fast.optim.packed_state import STATE_KEYS, PackedState, StateRecord, check_entry
from mgg_fast.optim.validation import (
    SKIPPED_GROUP_KEY,
    check_grad,
    check_group_params,
    check_mgg,
    check_mgg_dtype,
    hyperparams,
    local_grad,
    real,
    saved_skip_count,
)

NONFINITE_POLICIES = ("skip", "raise")
STATE_DICT_FORMAT = "mgg_fast.optimizer/v1"
_DCP_STATE_DICT = "torch.distributed.checkpoint.state_dict"
_CALLER_DEPTH = 8  # frames between DCP's state initialisation and step(): torch's wrappers, a scheduler's
MGG_GROUP_KEY = "mgg"  # ZeroRedundancyOptimizer's groups carry the constructor's mgg= (see _mgg_entry)


@dataclass
class _GroupWork:
    """One group of a step, validated: its hyper-parameters, the parameters that are (or become)
    packed with their gradients, and whether the pack must be made anew."""

    index: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    members: list[Tensor]  # parameters with state or a gradient, in group order
    locals: list[Tensor]  # what is stepped: the members, or their local shards (DTensors)
    grads: list[Tensor | None]  # aligned with members (local shards of DTensor gradients)
    entries: list[Mapping | None]  # their state[p] before the step (None: none yet)
    repack: bool
    backend: str  # "reference" or "triton" (functional.resolve_backend)
    creates_state: bool  # some member has no state yet


class MGGOptimizer(torch.optim.Optimizer):
    """Learned optimizer: Adam-like moments feed an MGG whose output is the update.

    Per step and parameter group: ``m, v`` moments (with the published ``t + 1`` bias
    correction), features ``[m̃, g̃]``, one MGG memory step with the carried per-coordinate
    memory, then ``p -= lr * update`` in the parameter's dtype. The group's parameters are
    concatenated in order.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        mgg: the (trained) MGG; its dtype (float32/float64) is the dtype of the state.
        lr, betas, eps: as published (``adapt_lr``, ``beta1``/``beta2``, the 1e-8 in m̃/g̃).
            ``lr`` may be a one-element tensor (read on every step: a host synchronisation for a
            CUDA tensor, so not with ``capturable=True``).
        backend: ``"auto"`` (the fused Triton step on CUDA, the fused CPU step on the CPU, each
            where it handles the MGG: float32, head dim 8/16/32, hidden size <= 64; the reference
            otherwise), ``"triton"``, ``"cpu"`` or ``"reference"`` (the eager ground truth).
        nonfinite: ``"skip"`` (default) drops a step whose gradients (or MGG weights) hold NaN/Inf,
            leaving everything unchanged and counting it in :attr:`num_skipped_steps`;
            ``"raise"`` raises ``FloatingPointError`` instead.
        capturable: never synchronise with the host, so ``step()`` can be captured in a CUDA
            graph (fused backend only; see the README for the warm-up and capture).
        memory_W_dtype: storage dtype of the per-coordinate memory matrices (``state[p]
            ["memory_W"]``, 64 of the 74 state values per coordinate at f=8): ``None`` (the state
            dtype) or ``torch.bfloat16``, which nearly halves a step's memory traffic (348 instead
            of 604 bytes per coordinate). Computation stays in the state dtype; the new memory is
            rounded to nearest-even on store. Opt-in: it changes results (see the README).
        carry_memory: ``True`` (as published) carries each coordinate's memory from step to step;
            ``False`` is the *memoryless* MGG of the ablation: every step starts from the learned
            memory (``W1``, ``b1``), so only the moments carry history.
        threads: threads of the fused CPU step (``None``: one for small groups, more for large
            ones; a thread on a busy core takes less of the work, so the step does not collapse
            when another process holds a core).

    ``state[p]`` holds ``step``, ``exp_avg``, ``exp_avg_sq``, ``memory_W`` and ``memory_b``.
    Internally a group's state sits in flat buffers and ``state[p]`` holds views of them; a
    ``state[p]`` whose entries are other tensors (replaced, loaded by a wrapper, a cleared state)
    is validated and packed again before the step, so it is what gets stepped. (Entries changed
    in place, also through ``.data``/``set_`` on a view, are seen where they stay views;
    re-pointing a view at other storage is not detected.)

    DTensor parameters (FSDP2's ``fully_shard``, tensor-parallel shards) are stepped by their
    local shards (empty ones included) and their ``state[p]`` entries are DTensors with the
    parameter's mesh and placements, ``memory_W``/``memory_b`` laid out ``[*p.shape, nh, f(, f)]``
    so that they shard like the parameter (see :mod:`mgg_fast.optim.packed_state`). The ranks of their
    meshes take each step's decisions together (one all-reduce of the non-finite flag): a
    non-finite shard skips the step everywhere, and a rank whose validation fails makes every
    rank raise before anything changes.

    Checkpoints: ``state_dict()`` loads with ``torch.load(weights_only=True)``, also through
    ``ZeroRedundancyOptimizer(optimizer_class=MGGOptimizer, mgg=...)`` (a group keeps the MGG's
    config, not the module: :meth:`_mgg_entry`). The step that
    ``torch.distributed.checkpoint.state_dict`` takes to create an empty state (zero gradients,
    ``lr`` 0) makes the state a first step starts from and steps nothing, so a checkpoint taken
    before the first step does not change training (:func:`_dcp_initialises_state`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        mgg: MGG,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        *,
        backend: str = "auto",
        nonfinite: str = "skip",
        capturable: bool = False,
        carry_memory: bool = True,
        threads: int | None = None,
        memory_W_dtype: torch.dtype | None = None,
    ):
        if not isinstance(mgg, MGG):
            raise TypeError(f"mgg must be an mgg_fast.MGG, got {type(mgg).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if capturable and nonfinite == "raise":
            raise ValueError("nonfinite='raise' needs a host synchronisation; it cannot be capturable")
        if capturable and backend == "reference":
            raise ValueError("capturable=True needs the fused backend ('auto' on CUDA or 'triton')")
        check_mgg(mgg)
        if memory_W_dtype not in (None, mgg.W1.dtype, torch.bfloat16):
            raise ValueError(
                f"memory_W_dtype must be None, the MGG's dtype ({mgg.W1.dtype}) or torch.bfloat16, "
                f"got {memory_W_dtype!r}"
            )
        self.mgg = mgg
        self.memory_W_dtype = memory_W_dtype
        self.backend = backend
        self.nonfinite = nonfinite
        self.capturable = capturable
        self.carry_memory = bool(carry_memory)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self._packs: list[PackedState | None] = []
        self._state_record: StateRecord | None = None  # what state held after the last checked step
        self._init_counters(torch.zeros((), dtype=torch.float32, device=mgg.W1.device))
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.register_state_dict_post_hook(MGGOptimizer._add_mgg_fast_entry, prepend=True)

    def _init_counters(self, skipped: Tensor) -> None:
        # float32 so the fused path adds the found-inf flag without a cast (exact to 2^24 skips)
        self._skipped = skipped
        self._found_inf = torch.zeros(1, dtype=torch.float32, device=skipped.device)
        self._one = torch.ones(1, dtype=torch.float32, device=skipped.device)
        self._graph_tensors: list[Tensor] = []  # pointer tables that captured CUDA graphs read

    # ---- groups ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated as a whole first: nothing is added if anything is wrong."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise TypeError("a group's params must be an ordered sequence of tensors (not a set)")
        group["params"] = params = list(params)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        if MGG_GROUP_KEY in group:
            group[MGG_GROUP_KEY] = self._mgg_entry(group[MGG_GROUP_KEY], saved=False)
        hyperparams(group)
        check_group_params(params)
        super().add_param_group(group)
        self._packs.append(None)

    def _mgg_entry(self, value: Any, *, saved: bool) -> dict[str, int]:
        """What a parameter group keeps under ``"mgg"``: the MGG's config, never the module.

        ``ZeroRedundancyOptimizer(params, optimizer_class=MGGOptimizer, mgg=mgg, ...)`` passes
        every constructor argument to its local optimizer inside the groups, and copies the local
        groups back into its own, which its ``state_dict()`` saves. Keeping the config there
        instead of the module makes that state dict load with ``torch.load(weights_only=True)``;
        the optimizer steps with ``self.mgg`` alone, so nothing else changes. A group may name
        this optimizer's MGG itself or its config (copied from another group); a ``saved`` group
        (a state dict) also an MGG of that config (a pickled optimizer's). Anything else is a
        ``ValueError``.
        """
        config = self.mgg.config
        if isinstance(value, MGG):
            if value is self.mgg or (saved and value.config == config):
                return dict(config)
            shown = f"another MGG {value.config}"
        elif isinstance(value, Mapping) and dict(value) == config:
            return dict(config)
        else:
            shown = repr(value)
        whose = "a saved parameter group's" if saved else "the parameter group's"
        raise ValueError(
            f"{whose} 'mgg' entry is {shown}, but this optimizer steps every group with its own MGG "
            f"{config}: a group cannot name another"
        )

    @property
    def num_skipped_steps(self) -> int:
        """Steps dropped because a gradient was not finite (reads the device counter)."""
        return int(self._skipped.item())

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One MGG step over every parameter that has a gradient; see the class docstring.

        Everything is validated before anything changes: a step that raises leaves parameters
        and state as they were."""
        initialising = closure is None and not self.state and _dcp_initialises_state(self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mgg = self.mgg
        check_mgg_dtype(mgg)
        device = mgg.W1.device
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        device_meshes = meshes(self.param_groups)  # DTensor parameters: the ranks decide together
        state_unchanged = self._state_unchanged()
        try:
            work = [
                w
                for gi in range(len(self.param_groups))
                if (w := self._prepare_group(gi, device, state_unchanged))
            ]
        except Exception:
            if device_meshes and not capturing:  # the other ranks wait for this rank's verdict
                max_over_ranks(torch.full((1,), REJECTED, device=device), device_meshes)
            raise
        if not work and not device_meshes:
            return loss
        if self._skipped.device != device:
            self._init_counters(self._skipped.to(device))
        creates_state = any(w.creates_state for w in work)
        # the host decides before anything changes where it must (or may: no capture)
        all_fused = all(w.backend == "triton" for w in work)
        host = not capturing and (
            self.nonfinite == "raise" or creates_state or bool(device_meshes) or not all_fused
        )
        if capturing and any(w.repack for w in work):
            raise RuntimeError(
                "the MGG step would create or re-pack optimizer state during CUDA-graph capture: "
                "take one step with the same parameters before capturing"
            )
        grads = [g for w in work for g in w.grads if g is not None]
        # without the host, the fused update checks the MGG weights it reads itself
        found_inf = self._nonfinite_flag(grads, with_mgg=host, with_memory_init=creates_state)
        if device_meshes:
            # a shard's NaN skips the step on every rank; a rank's failed validation stops all
            max_over_ranks(found_inf, device_meshes)
        verdict = float(found_inf.item()) if host else 0.0
        if verdict >= REJECTED:
            raise RuntimeError("another rank rejected this optimizer step (see its error); nothing changed")
        if not work:
            return loss
        if verdict and initialising:
            return loss  # no state from a non-finite MGG: the first real step skips (or raises)
        if verdict:
            if self.nonfinite == "raise":
                raise FloatingPointError("a gradient or MGG weight holds NaN/Inf; the step was not taken")
            self._skipped += 1
            return loss
        packs = [self._pack(w) for w in work]
        if initialising:  # the state a first step starts from (step 0, zero moments, W1/b1 memory)
            self._record_state(work, state_unchanged)
            return loss
        if not self.carry_memory:
            for pack in packs:
                pack.reset_memory(mgg.W1, mgg.b1[:, 0, :])
        last_fused = max((i for i, w in enumerate(work) if w.backend == "triton"), default=None)
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            for i, (w, pack) in enumerate(zip(work, packs, strict=True)):
                counts_skip = i == last_fused and not host  # the host path counted it already
                mgg_step(
                    w.locals, w.grads, pack, mgg, lr=w.lr, beta1=w.beta1, beta2=w.beta2, eps=w.eps,
                    backend=w.backend, found_inf=found_inf, skipped=self._skipped if counts_skip else None,
                    keep_alive=self._graph_tensors, threads=self.threads,
                )  # fmt: skip
        self._record_state(work, state_unchanged)
        return loss

    def _record_state(self, work: list[_GroupWork], state_unchanged: bool) -> None:
        """Record ``state`` as checked after a step that validated it (see :meth:`_state_unchanged`)."""
        if (not state_unchanged or any(w.repack for w in work)) and _covers_every_pack(work, self._packs):
            self._state_record = StateRecord.of(self.state)

    def _state_unchanged(self) -> bool:
        """Whether ``self.state`` is, entry for entry, what the last finished step left: every
        pack's views are then still in ``state[p]`` (checked by object identity of what the
        record keeps alive, never by address)."""
        record = self._state_record
        return record is not None and record.matches(self.state)

    def _prepare_group(self, gi: int, device: torch.device, state_unchanged: bool) -> _GroupWork | None:
        """Validate group ``gi`` for a step (hyper-parameters, gradients, state, backend) and
        return what the step needs; ``None`` if no parameter has a gradient. Changes nothing.

        The common step (``state`` as the last step left it, the same packed parameters, each
        with a dense gradient like it) is checked in a few C-level passes; anything else is
        validated parameter by parameter, and packed again from ``state[p]`` where needed."""
        group = self.param_groups[gi]
        params = group["params"]
        lr, beta1, beta2, eps = hyperparams(group)
        backend = resolve_backend(self.backend, self.mgg, device)
        if self.capturable and backend != "triton":
            raise ValueError("capturable=True needs CUDA parameters and the fused backend")
        pack = self._packs[gi] if gi < len(self._packs) else None
        if pack is not None:
            mgg = self.mgg
            if pack.exp_avg.dtype != mgg.W1.dtype:
                raise TypeError(f"optimizer state is {pack.exp_avg.dtype} but the MGG is now {mgg.W1.dtype}")
            if tuple(pack.memory_b.shape[-2:]) != (mgg.num_heads, mgg.head_dim):
                nh, f = pack.memory_b.shape[-2:]
                raise ValueError(
                    f"optimizer state was made for an MGG of {nh} head(s) of {f}, this one is {mgg.config}"
                )
        grads = list(map(_grad, params))
        if (
            state_unchanged
            and pack is not None
            and pack.exp_avg.device == device
            and pack.steps_all(params, grads, device)
        ):
            views = pack.views
            return _GroupWork(gi, lr, beta1, beta2, eps, params, params, grads, views, False, backend, False)
        if all(map(operator.is_, grads, repeat(None))):
            return None
        locals_ = params
        if any(map(is_dtensor, params)) or any(map(is_dtensor, grads)):
            grads = list(map(local_grad, params, grads))
            locals_ = list(map(local_tensor, params))
        states = list(map(self.state.get, params))
        members, member_locals, member_grads, entries = [], [], [], []
        for p, loc, g, st in zip(params, locals_, grads, states, strict=True):
            if g is not None:
                check_grad(loc, g, device)
            elif not st:
                continue
            members.append(p)
            member_locals.append(loc)
            member_grads.append(g)
            entries.append(st or None)
        repack = pack is None or not pack.holds(members, entries, self.mgg.W1.dtype)
        if repack:
            mgg = self.mgg
            for i, (p, entry) in enumerate(zip(members, entries, strict=True)):
                if entry is not None:
                    where = f"state of parameter {i} of group {gi}"
                    check_entry(where, p, entry, mgg.num_heads, mgg.head_dim, self._memory_dtype())
        creates = None in entries
        return _GroupWork(
            gi, lr, beta1, beta2, eps, members, member_locals, member_grads, entries, repack, backend, creates
        )

    def _memory_dtype(self) -> torch.dtype:
        return self.memory_W_dtype or self.mgg.W1.dtype

    def _pack(self, work: _GroupWork) -> PackedState:
        """The group's pack: the current one, or one made from ``state[p]`` and installed."""
        if not work.repack:
            return self._packs[work.index]
        mgg = self.mgg
        pack = PackedState.pack(
            work.members, work.entries, mgg.W1, mgg.b1[:, 0, :], mgg.W1.dtype, self._memory_dtype()
        )
        for p, view in zip(pack.params, pack.views, strict=True):
            self.state.setdefault(p, {}).update(view)
        while len(self._packs) <= work.index:
            self._packs.append(None)
        self._packs[work.index] = pack
        return pack

    def _nonfinite_flag(self, grads: list[Tensor], *, with_mgg: bool, with_memory_init: bool) -> Tensor:
        """The kept 1-element float flag, set to 1.0 if any gradient holds NaN/Inf, or with
        ``with_mgg`` an MGG weight the step reads (``with_memory_init``: also ``W1``/``b1``, which
        a step reads only to create state). One fused pass, no host synchronisation."""
        flag = self._found_inf
        flag.zero_()
        tensors = grads
        if with_mgg:
            mgg = self.mgg
            # the MGG's tensors as one copy: the check rewrites its inputs (times 1.0) in place
            mine = (*mgg.weights(), mgg.W1, mgg.b1) if with_memory_init else mgg.weights()
            tensors = [*grads, torch.cat(list(map(torch.flatten, mine)))]
        if torch.bfloat16 in set(map(_dtype, grads)):
            # CUDA's check has no bfloat16 kernel: those gradients go in as one float32 copy.
            tensors = [g for g in tensors if g.dtype != torch.bfloat16]
            tensors.append(torch.cat([g.reshape(-1) for g in grads if g.dtype == torch.bfloat16]).float())
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, self._one)
        return flag

    # ---- state dict, copies ------------------------------------------------------------------

    @staticmethod
    def _add_mgg_fast_entry(optimizer: MGGOptimizer, state_dict: dict[str, Any]) -> None:
        """The first state-dict post-hook: the skip counter and the MGG's config, so that later
        post-hooks see (and may rewrite) the whole state dict. The counter also goes into each
        saved parameter group (not the optimizer's own), where DCP keeps it."""
        skipped = optimizer.num_skipped_steps
        state_dict["mgg_fast"] = {
            "format": STATE_DICT_FORMAT,
            "skipped_steps": skipped,
            "mgg_config": optimizer.mgg.config,
        }
        for group in state_dict["param_groups"]:
            group[SKIPPED_GROUP_KEY] = skipped

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore moments, memory, step counts and hyper-parameters (torch's load pre- and
        post-hooks run as for any optimizer). Everything is validated before anything changes;
        tensors are cast to the state's dtype and device, never to the parameter's (a bfloat16
        parameter keeps float32 moments)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"an optimizer state dict is a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved_state, Mapping):
            raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups')")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(groups)} parameter groups, optimizer has {len(self.param_groups)}"
            )
        extra = state_dict.get("mgg_fast", {})
        if not isinstance(extra, Mapping):
            raise TypeError(f"the state dict's 'mgg_fast' entry must be a dict, got {type(extra).__name__}")
        skipped = saved_skip_count(extra, groups)
        if extra.get("mgg_config", self.mgg.config) != self.mgg.config:
            raise ValueError(
                f"state dict was made for MGG {extra['mgg_config']}, this one is {self.mgg.config}"
            )
        mgg = self.mgg
        new_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        packs: list[PackedState | None] = []
        for group, saved in zip(self.param_groups, groups, strict=True):
            ids = saved.get("params", []) if isinstance(saved, Mapping) else None
            if ids is None or len(ids) != len(group["params"]):
                raise ValueError("parameter group sizes of the state dict do not match the optimizer")
            hyperparams({k: saved.get(k, group[k]) for k in self.defaults})
            if MGG_GROUP_KEY in saved:
                self._mgg_entry(saved[MGG_GROUP_KEY], saved=True)
            members, entries = [], []
            for i, p in zip(ids, group["params"], strict=True):
                entry = saved_state.get(i)
                if entry:
                    if not isinstance(entry, Mapping):
                        raise TypeError(f"state of parameter {i} must be a dict, got {type(entry).__name__}")
                    check_entry(
                        f"state of parameter {i}", p, entry, mgg.num_heads, mgg.head_dim, self._memory_dtype()
                    )
                    members.append(p)
                    entries.append(entry)
            if not members:
                packs.append(None)
                continue
            pack = PackedState.pack(
                members, entries, mgg.W1, mgg.b1[:, 0, :], mgg.W1.dtype, self._memory_dtype()
            )
            for p, entry, view in zip(members, entries, pack.views, strict=True):
                other = {k: _to_device(v, p.device) for k, v in entry.items() if k not in STATE_KEYS}
                new_state[p] = {**other, **view}
            packs.append(pack)
        # validated: commit
        for group, saved in zip(self.param_groups, groups, strict=True):
            for key, value in saved.items():
                if key == MGG_GROUP_KEY:
                    group[key] = dict(self.mgg.config)
                elif key not in ("params", SKIPPED_GROUP_KEY):
                    group[key] = value
        self.state = new_state
        self._packs = packs
        self._state_record = None
        self._skipped.fill_(skipped)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: torch's state plus the MGG and the settings
        (the flat buffers are made again from ``state`` on the first step)."""
        return {
            **super().__getstate__(),
            "mgg": self.mgg,
            "backend": self.backend,
            "nonfinite": self.nonfinite,
            "capturable": self.capturable,
            "carry_memory": self.carry_memory,
            "threads": self.threads,
            "memory_W_dtype": self.memory_W_dtype,
            "skipped": self._skipped,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.setdefault("carry_memory", True)
        state.setdefault("threads", None)
        skipped = state.pop("skipped", None)
        super().__setstate__(state)
        if skipped is not None:  # a copy or an unpickled optimizer (torch keeps no hooks)
            self._packs = [None] * len(self.param_groups)
            self._state_record = None
            self._init_counters(skipped)
            self.register_state_dict_post_hook(MGGOptimizer._add_mgg_fast_entry, prepend=True)


def _dcp_initialises_state(groups: list[dict[str, Any]]) -> bool:
    """Whether this step is the one ``torch.distributed.checkpoint.state_dict`` takes to make an
    empty optimizer state (its ``_init_optim_state``, run by ``get_optimizer_state_dict`` and
    ``set_optimizer_state_dict``: zero gradients, every ``lr`` set to 0).

    For Adam that step only counts; for the MGG it would run the memory step, which does not
    depend on ``lr``, so saving a checkpoint before the first step would change training. Such
    a step instead makes the state a first step starts from and steps nothing. It is recognised
    by its caller (that function's code object, a few frames up: torch's step wrappers lie
    between), never by the values alone, which a real step may share; the ``lr`` check is a
    second guard. A torch without that function is never matched (the step then runs)."""
    init = getattr(sys.modules.get(_DCP_STATE_DICT), "_init_optim_state", None)
    code = getattr(inspect.unwrap(init), "__code__", None) if callable(init) else None
    if code is None or any(real(g.get("lr")) != 0.0 for g in groups):
        return False
    frame = sys._getframe(2)  # the caller of step()
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _covers_every_pack(work: list[_GroupWork], packs: list[PackedState | None]) -> bool:
    """Whether this step checked every group that has a pack (so each pack's views are in
    ``state``): only then may the state be recorded as checked."""
    checked = {w.index for w in work}
    return all(i in checked for i, pack in enumerate(packs) if pack is not None)


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
