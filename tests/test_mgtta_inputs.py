"""MGTTA's input checks (the empty batch) and the drop-in adapter for peers' harnesses."""

import pytest
import torch
from torch import nn

from mgg_fast import MGG, MGTTA


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


@pytest.mark.parametrize("optimizer", ["mgg", "sgd", "adam"])
def test_empty_batch_raises_and_changes_nothing(optimizer):
    adapter = MGTTA(tiny_model(), optimizer=optimizer, mgg=MGG(), loss="entropy")
    adapter(torch.randn(5, 4))
    before = [p.detach().clone() for p in adapter.model.parameters()]
    state = adapter.optimizer.state_dict()
    with pytest.raises(ValueError, match=r"empty batch \(shape \[0, 4\]\): nothing was adapted"):
        adapter(torch.empty(0, 4))
    assert adapter.num_updates == 1 and adapter.total_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.model.parameters(), strict=True))
    assert str(adapter.optimizer.state_dict()) == str(state)
    assert bool(torch.isfinite(adapter.last_loss))
