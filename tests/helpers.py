"""Helpers shared by the tests: tolerances, the parity vectors, random MGGs."""

from pathlib import Path

import torch

from mgg_fast import MGG

PARITY_DIR = Path(__file__).parent / "data" / "parity"
F64 = {"rtol": 1e-9, "atol": 1e-10}
F32 = {"rtol": 1e-4, "atol": 1e-5}
F32_METAGRAD = {"rtol": 1e-3, "atol": 1e-4}


def load_parity(name: str) -> dict:
    return torch.load(PARITY_DIR / name, weights_only=True)


def mgg_from_parity(data: dict, dtype: torch.dtype) -> MGG:
    cfg = data["config"]
    mgg = MGG(cfg["hidden_size"], cfg["num_heads"]).to(dtype)
    mgg.load_state_dict(data["state_dict"])  # published names, with the prefix
    return mgg


def random_mgg(
    hidden: int = 8, heads: int = 1, seed: int = 0, *, scale: float = 0.1, dtype: torch.dtype = torch.float32
) -> MGG:
    """An MGG whose every parameter matters: the published init plus N(0, scale^2) noise (as the
    parity vectors were made), on the default device."""
    torch.manual_seed(seed)
    mgg = MGG(hidden, heads).to(dtype)
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(scale * torch.randn_like(p))
    return mgg
