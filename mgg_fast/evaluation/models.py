"""A user's model: any timm model by name, with local weights or timm's hub download, and its
own preprocessing.

* :func:`create_model` calls ``timm.create_model(name, **model_args)`` and then loads a local
  checkpoint (:func:`read_state_dict`) or the hub weights (``pretrained=True``). Every failure
  is a one-line ``ValueError``: an unknown name (with the closest timm names), a checkpoint that
  does not fit (the first missing / unexpected / mis-shaped keys), no network for
  ``pretrained``.
* :func:`preprocessing` is the model's own evaluation transform, from
  ``timm.data.resolve_data_config`` + ``create_transform``.
"""

from __future__ import annotations

import ast
import difflib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgg_fast.core.files import load_weights

# wrappers a training script puts around the state dict, tried in this order
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
SHOWN_KEYS = 5


def parse_model_args(text: str) -> dict[str, Any]:
    """``"img_size=32,num_classes=10"`` → ``{"img_size": 32, "num_classes": 10}`` (Python literals,
    else strings), the extra keyword arguments of ``timm.create_model``."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"expected KEY=VALUE pairs separated by commas, got {part!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _unknown_model(name: str) -> ValueError:
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models('*pattern*')"
    return ValueError(f"timm has no model {name!r}{hint}")


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """Without the Hugging Face hub's per-retry warnings (an offline download fails after a
    dozen of them); the one-line error that follows says what happened."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def create_model(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The timm model ``name`` (on CPU, eval mode) with weights from ``checkpoint`` or the hub.

    Without either, the weights are timm's random initialisation."""
    import timm

    if checkpoint is not None and pretrained:
        raise ValueError("give either a checkpoint or pretrained weights, not both")
    if not timm.is_model(name):
        raise _unknown_model(name)
    kwargs = dict(model_args or {})
    try:
        with _quiet_hub():
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ValueError(f"timm.create_model({name!r}) does not take {kwargs}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        cause = _root_cause(exc)
        raise ValueError(
            f"--pretrained could not download the weights of {name} (no network? "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
            "use --checkpoint with a local copy"
        ) from None
    if checkpoint is not None:
        load_into(model, read_state_dict(checkpoint), source=f"{checkpoint}", name=name)
    return model.eval()


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a local checkpoint: ``.safetensors``, or a torch file (``weights_only``) that
    holds a state dict itself or under ``state_dict`` / ``model`` / ``model_state_dict``. A
    ``module.`` prefix (DataParallel / DDP) is removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        sd = load_weights(path, "checkpoint")
    for key in STATE_DICT_KEYS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(
            f"{path} holds no state dict (a dict of tensors, itself or under {', '.join(STATE_DICT_KEYS)})"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def load_into(model: nn.Module, sd: Mapping[str, Tensor], *, source: str, name: str) -> None:
    """Load ``sd`` strictly into ``model``; a mismatch is one error listing the first bad keys.

    Checked before anything is copied, so the model is unchanged on error. A missing BatchNorm
    ``num_batches_tracked`` counter (absent from old torchvision files) is not an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in sd if k not in own)
    shapes = [
        f"{k} {list(sd[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {_listed(missing)}" if missing else "",
            f"unexpected {_listed(unexpected)}" if unexpected else "",
            f"shape (file vs model) {_listed(shapes)}" if shapes else "",
        ]
        hint = " (other classes or input size? pass --model-args num_classes=N,img_size=S)" if shapes else ""
        raise ValueError(f"{source} does not fit {name}: " + "; ".join(p for p in parts if p) + hint)
    model.load_state_dict(sd, strict=False)


def probe(model: nn.Module, images: Tensor, flags: str) -> None:
    """Run ``model`` once on a few ``images`` (no gradients) so that a model that cannot take them
    (input size, channels) fails before any result is written, as one line naming ``flags``."""
    try:
        with torch.no_grad():
            model(images)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:  # whatever the model's own checks raise (timm asserts the input size)
        text = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{type(model).__name__} cannot run on these images ({type(exc).__name__}: {text}); check {flags}"
        ) from None


def num_outputs(model: nn.Module) -> int:
    """How many classes the model's head predicts (timm's ``num_classes``)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ValueError(f"{type(model).__name__} has no classifier head (num_classes); give it one")


def preprocessing(model: nn.Module, input_size: int | None = None) -> tuple[Callable[[Any], Tensor], dict]:
    """``(transform, data_config)``: the model's evaluation transform (resize, crop, normalise).

    ``input_size`` overrides the crop size; otherwise a ViT built with another ``img_size`` than
    its pretrained config gets its own patch-embedding size (timm keeps 224 in the config)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if input_size is not None:
        config["input_size"] = (3, input_size, input_size)
    elif isinstance(fixed, tuple) and len(fixed) == 2 and tuple(config["input_size"][1:]) != fixed:
        config["input_size"] = (3, *fixed)
    return create_transform(**config), config
