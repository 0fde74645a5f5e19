"""Test setup. The Triton interpreter must be chosen before any kernel is defined, so without a
GPU this file turns it on first (CI sets TRITON_INTERPRET=1 itself as well)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def forward_vectors() -> dict:
    return load_parity("mgg_forward_H8_nh1_s0.pt")


@pytest.fixture(scope="session")
def step_vectors() -> dict:
    return load_parity("mgtta_step_H8_nh1_s1.pt")


@pytest.fixture(scope="session")
def metagrad_vectors() -> dict:
    return load_parity("mgg_metagrad_H8_nh1_s2.pt")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes a minute or more on 2 CPU cores")
