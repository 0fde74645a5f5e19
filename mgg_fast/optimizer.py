"""MGGOptimizer: the published MGTTA step as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

from mgg_fast.flat_state import STATE_KEYS, FlatState
from mgg_fast.mgg import MGG
from mgg_fast.reference import MGGWeights, bias_corrections, memory_layer, moment_features_

BACKENDS = ("auto", "triton", "reference", "compiled")
NONFINITE_POLICIES = ("skip", "raise")
STATE_DICT_FORMAT = "mgg_fast.optimizer/v1"
STATE_DTYPES = (torch.float32, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def triton_usable(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA, or any device under the interpreter)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_supported(mgg: MGG) -> bool:
    """Whether the fused kernels handle this MGG (float32, head dim 8/16/32, hidden size <= 64);
    ``backend="auto"`` falls back to the reference otherwise."""
    from mgg_fast.kernels.memory_layer import MAX_HIDDEN, SUPPORTED_HEAD_DIMS

    sizes_ok = mgg.head_dim in SUPPORTED_HEAD_DIMS and mgg.hidden_size <= MAX_HIDDEN
    return mgg.W1.dtype == torch.float32 and sizes_ok


REPEAT_CACHE_SIZE = 4  # gradient addresses may cycle through a few sets (zero_grad(set_to_none=True))
_data_ptr = torch.Tensor.data_ptr  # unbound C methods: the per-step address check calls them often
_is_contiguous = torch.Tensor.is_contiguous


@functools.cache
def _kernels():
    """``mgg_fast.kernels``, imported on first use (it imports Triton)."""
    import mgg_fast.kernels

    return mgg_fast.kernels


@dataclass(slots=True, eq=False)
class _FusedStepRecord:
    """An all-fused step, as :meth:`MGGOptimizer._repeat` launches it again."""

    signature: list[int]  # parameter and gradient addresses (MGGOptimizer._signature)
    settings: tuple  # MGGOptimizer._settings()
    weights: Sequence[Tensor]  # the MGG tensors the kernels read (identity checked)
    weight_ptrs: list[int]
    prologue: Any  # mgg_fast.kernels.step_prologue.ProloguePlan
    groups: list[tuple[int, Any]]  # (group index, mgg_fast.kernels.GroupWork without its work list)
    # (group index, or None for the prologue; its Relaunch bound to `hypers`) per launch; empty
    # where the JIT hands back no compiled kernel (the interpreter): _launch_fused() again
    compiled: list[tuple[int | None, Any]]
    hypers: list[tuple]  # per entry of groups: the (lr, betas, eps) its launches were bound to


class MGGOptimizer(torch.optim.Optimizer):
    """Learned optimizer: Adam-like moments feed an MGG whose output is the update.

    Per step and parameter group: ``m, v`` moments (with the published ``t + 1`` bias
    correction), features ``[m̃, g̃]``, one MGG memory step with the carried per-coordinate
    memory, then ``p -= lr * update``. The group's parameters are concatenated in order.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        mgg: the (trained) MGG; its dtype (float32/float64) is the dtype of the state.
        lr, betas, eps: as published (``adapt_lr``, ``beta1``/``beta2``, the 1e-8 in m̃/g̃).
        backend: ``"auto"`` (fused kernels on CUDA when :func:`fused_supported`, reference
            elsewhere), ``"triton"``, ``"reference"``, or ``"compiled"``: the reference math
            through ``torch.compile`` (about 4x faster on CPU; the first step compiles for tens
            of seconds and needs a C++ compiler).
        nonfinite: ``"skip"`` (default) drops a step whose gradients hold NaN/Inf, leaving
            everything unchanged and counting it in :attr:`num_skipped_steps`; ``"raise"``
            raises ``FloatingPointError`` instead.
        capturable: keep the step count on the device and never synchronise with the host, so
            ``step()`` can be captured in a CUDA graph (fused backend only).
        memory_W_dtype: storage dtype of the per-coordinate memory matrices (``state[p]
            ["memory_W"]``, 64 of the 74 state values per coordinate at f=8): ``None`` (the state
            dtype) or ``torch.bfloat16``, which nearly halves a step's memory traffic (348 instead
            of 604 bytes per coordinate). Computation stays in the state dtype; the new memory is
            rounded to nearest-even on store. Opt-in: it changes results (see the README).

    A fused step whose parameters, gradients and MGG tensors sit where one of the last four
    fused steps found them skips validation and relaunches that step's compiled kernels (the
    repeat path); anything else takes the full step, which validates everything first.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        mgg: MGG,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        *,
        backend: str = "auto",
        nonfinite: str = "skip",
        capturable: bool = False,
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
        if capturable and backend in ("reference", "compiled"):
            raise ValueError("capturable=True needs the fused backend ('auto' on CUDA or 'triton')")
        if mgg.W1.dtype not in STATE_DTYPES:
            raise TypeError(
                f"the MGG must be float32 or float64 (it holds the state dtype), got {mgg.W1.dtype}"
            )
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
        self._flat: list[FlatState | None] = []
        # float32 so the fused path adds the found-inf flag without a cast (exact to 2^24 skips)
        self._skipped = torch.zeros((), dtype=torch.float32)
        self._flag = torch.zeros(1)  # host-path found-inf flag, kept: no per-step allocation
        self._one = torch.ones(1)
        self._guard = None  # mgg_fast.kernels.StepGuard of the fused path, made on its first step
        # recent all-fused steps, most recent first: what _repeat() launches again
        self._repeats: list[_FusedStepRecord] = []
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    # ---- groups and state ----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._repeats.clear()
        group = self.param_groups[-1]
        _check_hyperparams(group)
        for p in group["params"]:
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"MGGOptimizer supports {PARAM_DTYPES} parameters, got {p.dtype}")
        if len({p.device for p in group["params"]}) > 1:
            raise ValueError("all parameters of one group must be on the same device")
        self._flat.append(None)

    @property
    def num_skipped_steps(self) -> int:
        """Steps dropped because a gradient was not finite (reads the device counter)."""
        return int(self._skipped.item())

    def _fresh_state(self, params: list[Tensor]) -> FlatState:
        """Initial state of a group: zero moments, memory tiled from the MGG's ``W1``/``b1``."""
        mgg = self.mgg
        return FlatState.zeros(params, mgg.W1, mgg.b1[:, 0, :], mgg.W1.dtype, self.memory_W_dtype)

    def _flat_state(self, gi: int) -> FlatState:
        flat = self._flat[gi]
        if flat is None:
            flat = self._fresh_state(self.param_groups[gi]["params"])
            self._install(gi, flat)
        return flat

    def _install(self, gi: int, flat: FlatState) -> None:
        self._flat[gi] = flat
        for i, p in enumerate(flat.params):
            self.state[p] = flat.views(i)

    # ---- the step ----------------------------------------------------------------------------

    def _step_with_closure(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        signature = self._signature()
        if not self._repeat(signature):
            device = self.mgg.W1.device  # kernels launch on the current CUDA device: make it this one
            on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with torch.no_grad(), on_device:
                self._step(signature)
        return loss

    # torch's step-hook and profiler wrapper, for when hooks or the profiler need it
    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step_with_closure)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One MGG step over every parameter that has a gradient; see the class docstring.

        Step hooks (this optimizer's and the global ones) and the profiler's record are honoured;
        without any, torch's wrapper that provides them (microseconds per step) is skipped."""
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _torch_optimizer._global_optimizer_pre_hooks
            or _torch_optimizer._global_optimizer_post_hooks
            or torch._C._autograd._profiler_enabled()
        ):
            return self._hooked_step(closure)
        return self._step_with_closure(closure)

    step.hooked = True  # torch.optim.Optimizer wraps an unmarked step(); this one wraps itself

    def _signature(self) -> list[int]:
        """Per group: its parameters' addresses, then their gradients' (0: none, -1: not contiguous)."""
        out: list[int] = []
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params]
            out += map(_data_ptr, params)
            out += [0 if g is None else _data_ptr(g) if _is_contiguous(g) else -1 for g in grads]
        return out

    def _repeat(self, signature: list[int]) -> bool:
        """Launch the kernels of a recent fused step with this signature again if nothing they
        depend on has changed: the same parameter and gradient addresses (so the tables and the
        validation still hold), the same MGG tensors at the same addresses and the same settings.
        Hyper-parameters are read anew. Few microseconds of Python."""
        record = next((r for r in self._repeats if r.signature == signature), None)
        if record is None or record.settings != self._settings():
            return False
        weights = self.mgg.weights()
        if not all(map(operator.is_, weights, record.weights)):
            return False
        if list(map(_data_ptr, weights)) != record.weight_ptrs:
            return False
        skipped = self._skipped
        if skipped.is_cuda and (
            torch.cuda.current_device() != skipped.device.index or torch.cuda.is_current_stream_capturing()
        ):
            return False  # the full path selects the device and pins the tables a graph holds
        if not record.compiled:  # no compiled kernels to launch directly: through the JIT
            self._launch_fused(record.groups, record.prologue)
        else:
            hypers = [self._hyper_values(gi) for gi, _ in record.groups]
            if hypers != record.hypers:
                self._rebind(record, hypers)
            for _, launch in record.compiled:
                launch()
        if self._repeats[0] is not record:
            self._repeats.remove(record)
            self._repeats.insert(0, record)
        return True

    def _rebind(self, record: _FusedStepRecord, hypers: list[tuple]) -> None:
        """Bind the record's update launches to new hyper-parameters."""
        by_group = dict(zip((gi for gi, _ in record.groups), hypers, strict=True))
        compiled = []
        for gi, r in record.compiled:
            if gi is not None:
                lr, (beta1, beta2), eps = by_group[gi]
                (r,) = _kernels().rebind_update([r], lr=lr, beta1=beta1, beta2=beta2, eps=eps)
            compiled.append((gi, r))
        record.compiled, record.hypers = compiled, hypers

    def _launch_fused(self, groups: list[tuple[int, Any]], prologue: Any) -> list[tuple[int | None, Any]]:
        """Launch the fused step of prepared groups: the step prologue then each group's update,
        or a single launch (one group of one dtype, where ``use_single_launch``). Returns (group
        index, or None for the prologue; its Relaunch or None) per launch."""
        kernels, guard, skipped = _kernels(), self._guard, self._skipped
        (first_gi, first), *_ = groups
        if len(groups) == 1 and len(first.launches) == 1 and kernels.use_single_launch(skipped.device):
            hyper = self._hyper(first_gi)
            return [
                (first_gi, kernels.single_launch_step(first, self.mgg, guard, prologue, skipped, **hyper))
            ]
        # One launch checks every fused gradient, decides the whole step, counts a skip and
        # advances the step counts, all on the device: no host synchronisation.
        launched: list[tuple[int | None, Any]] = [(None, guard.launch(prologue, skipped, pdl=first.pdl))]
        for gi, group in groups:
            updates = kernels.fused_group_update(
                group, self.mgg, **self._hyper(gi), found_inf=guard.found_inf
            )
            launched += [(gi, r) for r in updates]
        return launched

    def _settings(self) -> tuple:
        """What a fused step's kernels were chosen for (compared before a repeat)."""
        single = _kernels().use_single_launch(self._skipped.device)
        return (self.mgg, self.backend, self.nonfinite, self.capturable, single)

    def _hyper_values(self, gi: int) -> tuple:
        group = self.param_groups[gi]
        return group["lr"], tuple(group["betas"]), group["eps"]

    def _hyper(self, gi: int) -> dict[str, float]:
        lr, (beta1, beta2), eps = self._hyper_values(gi)
        return {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps}

    def _step(self, signature: list[int]) -> None:
        """The full step: validate everything, then update (fused and/or reference groups)."""
        self._repeats = [r for r in self._repeats if r.signature != signature]
        work = self._collect()  # validates everything before anything changes
        if not work:
            return
        fused = [self._use_triton(self.param_groups[gi]["params"][0].device) for gi, _ in work]
        if self.nonfinite == "raise" or not all(fused):  # decided on the host (synchronises)
            grads = [g for _, gs in work for g in gs if g is not None]
            if bool(self._nonfinite_flag(grads).item()):
                if self.nonfinite == "raise":
                    raise FloatingPointError("non-finite gradient: the MGG step was not taken")
                self._skipped += 1
                return
        prepared = {}
        if any(fused):
            kernels = _kernels()
            for (gi, grads), use_fused in zip(work, fused, strict=True):
                if use_fused:  # validated, tables looked up: still nothing changed
                    flat = self._flat_state(gi)
                    prepared[gi] = kernels.prepare_group(flat, grads, self.mgg, capturable=self.capturable)
            device = self._skipped.device
            if self._guard is None or self._guard.device != device:
                self._guard = kernels.StepGuard(device)
            prologue = self._guard.plan(list(prepared.values()), capturable=self.capturable)
            launched = self._launch_fused(list(prepared.items()), prologue)
        for gi, grads in work:
            if gi not in prepared:
                compiled = self.backend == "compiled"
                hyper = self._hyper(gi)
                reference_group_step(self._flat_state(gi), grads, self.mgg, **hyper, compiled=compiled)
        contiguous = -1 not in signature and not any(g.copies for g in prepared.values())
        if all(fused) and self.nonfinite == "skip" and contiguous:  # no copies: tables stay valid
            weights = next(iter(prepared.values())).weights
            # no gradient tensors kept: the allocator may hand their addresses out again
            groups = [(gi, g._replace(work=[])) for gi, g in prepared.items()]
            direct = all(r is not None for _, r in launched)
            record = _FusedStepRecord(
                signature,
                self._settings(),
                weights,
                list(map(_data_ptr, weights)),
                prologue,
                groups,
                launched if direct else [],
                [self._hyper_values(gi) for gi, _ in groups],
            )
            self._repeats = [record, *self._repeats[: REPEAT_CACHE_SIZE - 1]]

    def _nonfinite_flag(self, grads: list[Tensor]) -> Tensor:
        """The kept 1-element float flag, set to 1.0 if any gradient holds NaN/Inf (no host sync)."""
        self._flag.zero_()
        # CUDA's check has no bfloat16 kernel: those gradients go in as one float32 copy.
        bf16 = [g.reshape(-1) for g in grads if g.dtype == torch.bfloat16]
        if bf16:
            grads = [g for g in grads if g.dtype != torch.bfloat16] + [torch.cat(bf16).float()]
        # One fused pass over all gradients; "unscaling" by 1.0 leaves their values as they are.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._flag, self._one)
        return self._flag

    def _use_triton(self, device: torch.device) -> bool:
        if self.backend in ("reference", "compiled"):
            return False
        if self.backend == "triton":
            if not triton_usable(device):
                raise RuntimeError(
                    f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); parameters are on {device}"
                )
            return True
        return device.type == "cuda" and fused_supported(self.mgg)

    def _collect(self) -> list[tuple[int, list[Tensor | None]]]:
        """Per group with any gradient: its gradients aligned with its params (None = skip)."""
        mgg_device, mgg_dtype = self.mgg.W1.device, self.mgg.W1.dtype
        if mgg_dtype not in STATE_DTYPES:
            raise TypeError(f"the MGG dtype must be float32 or float64, got {mgg_dtype}")
        work = []
        for gi, group in enumerate(self.param_groups):
            grads = []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    _check_grad(p, g)
                    if p.device != mgg_device:
                        raise ValueError(f"parameter on {p.device} but the MGG is on {mgg_device}")
                grads.append(g)
            if any(g is not None for g in grads):
                flat = self._flat[gi]
                if flat is not None and flat.exp_avg.device != group["params"][0].device:
                    raise ValueError("optimizer state and parameters are on different devices")
                if flat is not None and flat.exp_avg.dtype != mgg_dtype:
                    raise TypeError(f"optimizer state is {flat.exp_avg.dtype} but the MGG is now {mgg_dtype}")
                if flat is not None and [p.numel() for p in group["params"]] != flat.numels:
                    raise ValueError(
                        "a parameter changed size since its optimizer state was created "
                        f"({flat.numels} -> {[p.numel() for p in group['params']]} elements)"
                    )
                if (
                    self.capturable
                    and group["params"][0].device.type != "cuda"
                    and not triton_usable(group["params"][0].device)
                ):
                    raise ValueError("capturable=True needs CUDA parameters")
                work.append((gi, grads))
        if self._skipped.device != mgg_device:
            self._skipped, self._flag, self._one = (
                t.to(mgg_device) for t in (self._skipped, self._flag, self._one)
            )
        return work

    # ---- state dict ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["mgg_fast"] = {
            "format": STATE_DICT_FORMAT,
            "skipped_steps": self.num_skipped_steps,
            "mgg_config": self.mgg.config,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore moments, memory, step counts and hyper-parameters; validated before any change."""
        groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved_state, dict):
            raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups')")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(groups)} parameter groups, optimizer has {len(self.param_groups)}"
            )
        extra = state_dict.get("mgg_fast", {})
        if extra.get("mgg_config", self.mgg.config) != self.mgg.config:
            raise ValueError(
                f"state dict was made for MGG {extra['mgg_config']}, this one is {self.mgg.config}"
            )
        new_flats: list[FlatState | None] = []
        for group, saved in zip(self.param_groups, groups, strict=True):
            ids = saved.get("params", [])
            if len(ids) != len(group["params"]):
                raise ValueError("parameter group sizes of the state dict do not match the optimizer")
            entries = [saved_state.get(i) for i in ids]
            if all(e is None for e in entries):
                new_flats.append(None)
                continue
            flat = self._fresh_state(group["params"])
            for i, entry in enumerate(entries):
                if entry is None:
                    continue
                views = flat.views(i)
                for key in STATE_KEYS:
                    if key not in entry:
                        raise ValueError(f"state of parameter {ids[i]} lacks {key!r}")
                    value = torch.as_tensor(entry[key])
                    if value.shape != views[key].shape:
                        raise ValueError(
                            f"state {key!r} of parameter {ids[i]} has shape {list(value.shape)}, "
                            f"expected {list(views[key].shape)}"
                        )
                    views[key].copy_(value)
            new_flats.append(flat)
        # validated: commit
        self._repeats.clear()
        for group, saved in zip(self.param_groups, groups, strict=True):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        self.state.clear()
        for gi, flat in enumerate(new_flats):
            self._flat[gi] = None
            if flat is not None:
                self._install(gi, flat)
        self._skipped.fill_(int(extra.get("skipped_steps", 0)))


def _check_hyperparams(group: dict[str, Any]) -> None:
    lr, betas, eps = group["lr"], group["betas"], group["eps"]
    if not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas {betas!r}: each must be in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps {eps!r}")


def _check_grad(p: Tensor, g: Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError("MGGOptimizer does not support sparse gradients")
    if g.shape != p.shape:
        raise ValueError(f"gradient shape {list(g.shape)} does not match parameter shape {list(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"gradient on {g.device} but parameter on {p.device}")
    if g.dtype != p.dtype:
        raise TypeError(f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype}")


def reference_group_step(
    flat: FlatState,
    grads: list[Tensor | None],
    mgg: MGG,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    compiled: bool = False,
) -> None:
    """One MGG optimizer step of a group in plain PyTorch (the ground truth for the kernels)."""
    active = [i for i, g in enumerate(grads) if g is not None]
    numels = [flat.numels[i] for i in active]
    dtype = flat.exp_avg.dtype
    g = torch.cat([grads[i].reshape(-1) for i in active]).to(dtype)
    flat.steps[active] += 1
    steps = flat.steps[active].tolist()
    corrections = [bias_corrections(s, beta1, beta2) for s in steps]
    # tensors, not floats, so that a compiled step does not recompile as the step count grows
    if len(set(steps)) == 1:
        bc1, bc2 = (torch.tensor(c, dtype=dtype, device=g.device) for c in corrections[0])
    else:
        reps = torch.tensor(numels, device=g.device)
        bc1, bc2 = (
            torch.tensor(c, dtype=dtype, device=g.device).repeat_interleave(reps)
            for c in zip(*corrections, strict=True)
        )
    buffers = (flat.exp_avg, flat.exp_avg_sq, flat.memory_W, flat.memory_b)
    if len(active) == len(flat.params):
        coords = None
        m, v, W, b = buffers
    else:
        offsets = flat.offsets
        coords = torch.cat(
            [torch.arange(offsets[i], offsets[i] + flat.numels[i], device=g.device) for i in active]
        )
        m, v, W, b = (buf[coords] for buf in buffers)
    W_stored, W = W, W.to(dtype)  # a narrower memory_W is computed in the state dtype
    step_math = _compiled_step_math() if compiled else _step_math
    out = step_math(g, m, v, W, b, bc1, bc2, beta1, beta2, eps, mgg.weights())
    if W is not W_stored:
        W_stored.copy_(W)  # rounds to nearest-even
    if coords is not None:
        for buf, val in zip(buffers, (m, v, W_stored, b), strict=True):
            buf.index_copy_(0, coords, val)
    params = [flat.params[i] for i in active]
    new = torch.cat([p.reshape(-1).to(dtype) for p in params]) - out * lr
    torch._foreach_copy_(params, [c.view(p.shape) for c, p in zip(new.split(numels), params, strict=True)])


def _step_math(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    W: Tensor,
    b: Tensor,
    bc1: Tensor,
    bc2: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weights: MGGWeights,
) -> Tensor:
    """Moments, features and one memory step (``m, v, W, b`` updated in place); the MGG output."""
    x = moment_features_(g, m, v, bc1, bc2, beta1, beta2, eps)
    return memory_layer(x, W, b, weights, inplace=True)[0]


@functools.cache
def _compiled_step_math() -> Callable[..., Tensor]:
    """:func:`_step_math` through ``torch.compile`` (compiled once per process, dynamic sizes)."""
    return torch.compile(_step_math, dynamic=True)
