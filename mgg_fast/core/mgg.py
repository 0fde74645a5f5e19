"""The MGG module: learned parameters under the published names, the memory state, save/load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mgg_fast.core.arguments import whole_number
from mgg_fast.core.files import load_weights, save_atomic
from mgg_fast.core.reference import MGGWeights, memory_layer

PUBLISHED_PREFIX = "seq_modeling_block."
CHECKPOINT_FORMAT = "mgg_fast.mgg/v1"
# The largest hidden size an MGG may have. Every coordinate carries hidden_size² / num_heads
# memory values (the published MGG: 8 × 8); far beyond this bound a size is a mistake, and it
# must fail as one before the allocator is asked for it.
MAX_HIDDEN_SIZE = 1024


# (submodule or None for the MGG itself, parameter name) of each MGGWeights field, in order
_WEIGHTS = (
    ("q_proj", "weight"),
    ("k_proj", "weight"),
    ("v_proj", "weight"),
    ("o_proj", "weight"),
    ("post_norm", "weight"),
    ("post_norm", "bias"),
    (None, "ttt_norm_weight"),
    (None, "ttt_norm_bias"),
    (None, "learnable_ttt_lr_weight"),
    (None, "learnable_ttt_lr_bias"),
    (None, "learnable_token_idx"),
)


def check_sizes(hidden_size: Any, num_heads: Any) -> tuple[int, int]:
    """``(hidden_size, num_heads)`` as ints, checked before anything is allocated: whole numbers
    (not bools), ``1 <= hidden_size <= MAX_HIDDEN_SIZE``, ``num_heads >= 1`` dividing it."""
    hidden_size = whole_number("hidden_size", hidden_size, 1)
    num_heads = whole_number("num_heads", num_heads, 1)
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(
            f"hidden_size must be <= {MAX_HIDDEN_SIZE}, got {hidden_size}: every coordinate would carry "
            "hidden_size² / num_heads memory values (the published MGG has hidden_size 8)"
        )
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})"
        )
    return hidden_size, num_heads


class MGGState(NamedTuple):
    """Per-coordinate fast-weight memory carried between MGG calls."""

    W1: Tensor  # [N, nh, f, f]
    b1: Tensor  # [N, nh, f]


class MGG(nn.Module):
    """Meta Gradient Generator: a TTT-Linear gradient memory layer applied per coordinate.

    ``updates, state = mgg(features, state)`` maps ``[m̃, g̃]`` features ``[N, 2]`` to updates
    ``[N]`` (in (-1, 1)) and the new per-coordinate memory. Parameter names match the published
    checkpoint without its ``seq_modeling_block.`` prefix.
    """

    def __init__(self, hidden_size: int = 8, num_heads: int = 1):
        super().__init__()
        hidden_size, num_heads = check_sizes(hidden_size, num_heads)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = f = hidden_size // num_heads
        nh, h = num_heads, hidden_size
        # Initialisation as published: default nn.Linear projections, N(0, 0.02) W1 and eta gate,
        # zero b1 / eta bias / token offset, identity layer norms. empty().normal_() draws what
        # torch.normal does but, unlike it, honours a `with torch.device(...)` default device.
        self.q_proj = nn.Linear(2, h, bias=False)
        self.k_proj = nn.Linear(2, h, bias=False)
        self.v_proj = nn.Linear(2, h, bias=False)
        self.o_proj = nn.Linear(h, 1, bias=False)
        self.post_norm = nn.LayerNorm(h, eps=1e-6)
        self.W1 = nn.Parameter(torch.empty(nh, f, f).normal_(0.0, 0.02))
        self.b1 = nn.Parameter(torch.zeros(nh, 1, f))
        self.ttt_norm_weight = nn.Parameter(torch.ones(nh, f))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(nh, f))
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(nh, 1, 2).normal_(0.0, 0.02))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(nh, 1))
        self.learnable_token_idx = nn.Parameter(torch.zeros(1))

    @property
    def config(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads}

    def weights(self) -> MGGWeights:
        """The learned tensors one step reads, in the reference's calling convention.

        Read from the modules' parameter dicts (what attribute access returns, minus
        ``nn.Module.__getattr__``'s cost: this runs on every optimizer step)."""
        modules, own = self._modules, self._parameters
        return MGGWeights(
            *(own[name] if sub is None else modules[sub]._parameters[name] for sub, name in _WEIGHTS)
        )

    def initial_state(self, n: int) -> MGGState:
        """A detached copy of the learned memory for ``n`` coordinates (what a first call uses)."""
        with torch.no_grad():
            W = self.W1.detach().unsqueeze(0).expand(n, -1, -1, -1).clone()
            b = self.b1.detach()[:, 0, :].unsqueeze(0).expand(n, -1, -1).clone()
        return MGGState(W, b)

    def forward(self, features: Tensor, state: MGGState | None = None) -> tuple[Tensor, MGGState]:
        """Run one memory step on every coordinate; the returned state is detached.

        Without ``state`` the learned ``W1``/``b1`` are tiled (gradients reach them); with a
        state, the carried memory is used, detached.
        """
        x = self._check_features(features)
        n = x.shape[0]
        if state is None:
            W = self.W1.unsqueeze(0).expand(n, -1, -1, -1)
            b = self.b1[:, 0, :].unsqueeze(0).expand(n, -1, -1)
        else:
            W, b = self._check_state(state, n, x)
            W, b = W.detach(), b.detach()
        out, W_new, b_new = memory_layer(x, W, b, self.weights())
        return out, MGGState(W_new.detach(), b_new.detach())

    def _check_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() == 3 and features.shape[1] == 1:
            features = features[:, 0, :]
        if features.dim() != 2 or features.shape[1] != 2:
            raise ValueError(f"features must have shape [N, 2] or [N, 1, 2], got {list(features.shape)}")
        ref = self.W1
        if features.device != ref.device or features.dtype != ref.dtype:
            raise ValueError(
                f"features are {features.dtype} on {features.device} but the MGG is "
                f"{ref.dtype} on {ref.device}"
            )
        return features

    def _check_state(self, state: MGGState, n: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if not (
            isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(t, Tensor) for t in state)
        ):
            held = (
                f"a {len(state)}-element {type(state).__name__} of {[type(t).__name__ for t in state]}"
                if isinstance(state, (tuple, list))
                else f"a {type(state).__name__}"
            )
            raise TypeError(
                "state must be the (W, b) pair of tensors (an MGGState) that the previous call "
                f"returned, or None for a first call; got {held}"
            )
        W, b = state
        nh, f = self.num_heads, self.head_dim
        if b.dim() == 4 and b.shape[2] == 1:  # published layout [N, nh, 1, f]
            b = b[:, :, 0, :]
        if tuple(W.shape) != (n, nh, f, f) or tuple(b.shape) != (n, nh, f):
            raise ValueError(
                f"state shapes {list(W.shape)}, {list(b.shape)} do not match "
                f"[{n}, {nh}, {f}, {f}] and [{n}, {nh}, {f}]"
            )
        for t in (W, b):
            if t.device != x.device or t.dtype != x.dtype:
                raise ValueError(f"state is {t.dtype} on {t.device}, features {x.dtype} on {x.device}")
        return W, b

    # ---- checkpoints -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Accepts our own names and the published ones (``seq_modeling_block.`` prefix)."""
        stripped = {
            (k[len(PUBLISHED_PREFIX) :] if k.startswith(PUBLISHED_PREFIX) else k): v
            for k, v in state_dict.items()
        }
        return super().load_state_dict(stripped, strict=strict, assign=assign)

    def save(self, path: str | os.PathLike) -> None:
        """Write config + weights atomically (temporary file in the same folder, then rename)."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        save_atomic(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MGG:
        """Load an MGG saved by :meth:`save`, or a checkpoint of the published code.

        The published format is ``{"model_state_dict": <TTTMGG state_dict>}`` with keys prefixed
        ``seq_modeling_block.``; its hidden size and head count are read from the tensor shapes.
        Loading uses ``weights_only=True``. Every shape is checked against the tensors before
        anything is allocated, and every weight must be finite (an MGG holding NaN/Inf would only
        fail later, in the optimizer, far from the file), so a bad file is a ``ValueError``
        naming it (``FileNotFoundError`` when there is no file)."""
        path = Path(path)
        payload = load_weights(path, "MGG checkpoint", map_location)
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            sd, config = payload.get("state_dict"), payload.get("config")
        elif isinstance(payload, dict) and "model_state_dict" in payload:
            sd, config = payload["model_state_dict"], None
        else:
            raise ValueError(
                f"{path} is not an mgg_fast MGG checkpoint (format {CHECKPOINT_FORMAT!r}) nor a "
                'published one ({"model_state_dict": ...})'
            )
        sd = _checked_tensors(sd, path)
        hidden_size, num_heads = _sizes_of(sd, path)
        try:
            check_sizes(hidden_size, num_heads)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        nonfinite = [name for name, t in sd.items() if not bool(torch.isfinite(t).all())]
        if nonfinite:
            raise ValueError(f"{path}: the MGG's {nonfinite[0]} holds NaN or Inf values")
        if config is not None:
            try:
                declared = (int(config["hidden_size"]), int(config["num_heads"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path} has an invalid MGG config {config!r}: {exc}") from exc
            if declared != (hidden_size, num_heads):
                raise ValueError(
                    f"{path} does not match its config {config}: its tensors have hidden_size "
                    f"{hidden_size}, num_heads {num_heads}"
                )
        mgg = cls(hidden_size, num_heads).to(next(iter(sd.values())).dtype)
        mgg.load_state_dict(sd)
        return mgg


def expected_shapes(hidden_size: int, num_heads: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of an MGG state dict (our names, without the published prefix)."""
    h, nh, f = hidden_size, num_heads, hidden_size // num_heads
    return {
        "q_proj.weight": (h, 2),
        "k_proj.weight": (h, 2),
        "v_proj.weight": (h, 2),
        "o_proj.weight": (1, h),
        "post_norm.weight": (h,),
        "post_norm.bias": (h,),
        "W1": (nh, f, f),
        "b1": (nh, 1, f),
        "ttt_norm_weight": (nh, f),
        "ttt_norm_bias": (nh, f),
        "learnable_ttt_lr_weight": (nh, 1, 2),
        "learnable_ttt_lr_bias": (nh, 1),
        "learnable_token_idx": (1,),
    }


def _checked_tensors(sd: Any, path: Path) -> dict[str, Tensor]:
    """The state dict with the published prefix stripped, checked to hold tensors of one float dtype."""
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: its state_dict is a {type(sd).__name__}, not a dict of tensors")
    out = {(k[len(PUBLISHED_PREFIX) :] if k.startswith(PUBLISHED_PREFIX) else k): v for k, v in sd.items()}
    bad = {k: type(v).__name__ for k, v in out.items() if not isinstance(v, Tensor)}
    if bad or not out:
        raise ValueError(f"{path}: its state_dict must map names to tensors, got {bad or 'nothing'}")
    dtypes = [v.dtype for v in out.values()]
    common = max(set(dtypes), key=dtypes.count)
    odd = [k for k, v in out.items() if not v.is_floating_point()] or [
        k for k, v in out.items() if v.dtype != common
    ]
    if odd:
        raise ValueError(
            f"{path}: {odd[0]} is {out[odd[0]].dtype}; an MGG's tensors share one floating dtype "
            f"(found {sorted({str(d) for d in dtypes})})"
        )
    return out


def _sizes_of(sd: dict[str, Tensor], path: Path) -> tuple[int, int]:
    """``(hidden_size, num_heads)`` read from the shapes of ``q_proj.weight`` and ``W1``, after
    checking every tensor's shape and that no name is missing or unexpected."""
    missing = sorted(set(expected_shapes(1, 1)) - set(sd))
    unexpected = sorted(set(sd) - set(expected_shapes(1, 1)))
    if missing or unexpected:
        raise ValueError(
            f"{path} is not an MGG state dict: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    hidden_size, num_heads = sd["q_proj.weight"].shape[0], sd["W1"].shape[0]
    if sd["W1"].dim() != 3 or num_heads < 1 or hidden_size != num_heads * sd["W1"].shape[-1]:
        raise ValueError(
            f"{path}: W1 {list(sd['W1'].shape)} and q_proj.weight {list(sd['q_proj.weight'].shape)} "
            "do not describe an MGG (W1 must be [heads, f, f] with heads * f = hidden size)"
        )
    wrong = [
        f"{name} {list(sd[name].shape)} (expected {list(shape)})"
        for name, shape in expected_shapes(hidden_size, num_heads).items()
        if tuple(sd[name].shape) != shape
    ]
    if wrong:
        raise ValueError(
            f"{path}: tensor shapes do not fit hidden_size {hidden_size}, {num_heads} head(s): "
            + ", ".join(wrong[:4])
        )
    return hidden_size, num_heads
