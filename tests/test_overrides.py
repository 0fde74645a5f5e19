"""The launch choices tests and benchmarks force (kernels/overrides.py): innermost wins, restored on exit."""

import pytest
import torch
from mgg_fast.kernels import forced_single_launch, use_single_launch
from mgg_fast.kernels.memory_layer import forced_config, launch_config
from mgg_fast.kernels.overrides import Override
from mgg_fast.kernels.step_prologue import forced_pdl, use_pdl


def test_override_nests_and_restores_after_an_error():
    choice = Override()
    assert choice.value is None
    with choice.forced(1):
        with pytest.raises(KeyError), choice.forced(2):
            assert choice.value == 2
            raise KeyError
        assert choice.value == 1
    assert choice.value is None


def test_forced_launch_choices():
    cpu = torch.device("cpu")  # under the interpreter (tests/conftest.py) the kernels run here
    default = launch_config(1, 8)
    with forced_config(16, 4):
        assert launch_config(1, 8) == (16, 4)
    assert launch_config(1, 8) == default
    with pytest.raises(ValueError, match="power of two"):
        forced_config(12, 1)
    assert not use_single_launch(cpu)
    with forced_single_launch(True):
        assert use_single_launch(cpu)
        with forced_single_launch(False):
            assert not use_single_launch(cpu)
    with forced_pdl(False):
        assert not use_pdl(cpu)
