"""Test setup. The Triton interpreter must be chosen before any kernel is defined, so without a
GPU this file turns it on first (CI sets TRITON_INTERPRET=1 itself as well)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import load_parity


@pytest.fixture(scope="session")
def forward_vectors() -> dict:
    return load_parity("mgg_forward_H8_nh1_s0.pt")


@pytest.fixture(scope="session")
def step_vectors() -> dict:
    return load_parity("mgtta_step_H8_nh1_s1.pt")


@pytest.fixture(scope="session")
def metagrad_vectors() -> dict:
    return load_parity("mgg_metagrad_H8_nh1_s2.pt")
