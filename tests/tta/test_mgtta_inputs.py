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


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def test_drop_in_returns_outputs_and_loss_like_mgtta(tmp_path):
    """Built from the published files (checkpoint and train_info.pt), the drop-in gives what
    MGTTA gives, as the official ``(outputs, loss)`` pair."""
    from mgg_fast import fit_source_stats
    from mgg_fast.core.mgg import PUBLISHED_PREFIX
    from mgg_fast.tta.losses import SourceStats
    from mgg_fast.tta.mgtta import MGTTADropIn

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 3, 32, 32, generator=g) for _ in range(3)]
    stats = fit_source_stats(tiny_vit(), xs[:2])
    torch.save((stats.std, stats.mean), tmp_path / "train_info.pt")  # the published (std, mean) pair
    torch.manual_seed(2)
    mgg = MGG()
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {PUBLISHED_PREFIX + k: v for k, v in mgg.state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "mgg_ckpt.pth")

    drop_in = MGTTADropIn(
        tiny_vit(), str(tmp_path / "mgg_ckpt.pth"), 1e-2, source_stats=tmp_path / "train_info.pt"
    )
    reference = MGTTA(
        tiny_vit(),
        mgg=mgg,
        lr=1e-2,
        loss="foa",
        source_stats=SourceStats.load(tmp_path / "train_info.pt", tiny_vit()),
    )
    for x in xs:
        outputs, loss = drop_in(x)
        expected = reference(x)
        assert not outputs.requires_grad and loss.dim() == 0 and not loss.requires_grad
        torch.testing.assert_close(outputs, expected, rtol=0, atol=0)
        torch.testing.assert_close(loss, reference.last_loss, rtol=0, atol=0)
    assert drop_in.adapter.num_updates == 3
    changed = [p.detach().clone() for p in drop_in.model.parameters()]
    drop_in.reset()
    assert any(not torch.equal(a, b) for a, b in zip(changed, drop_in.model.parameters(), strict=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(tiny_vit().state_dict().values(), drop_in.model.state_dict().values(), strict=True)
    )


def test_readme_drop_in_example_runs(tmp_path, monkeypatch):
    """The README's harness snippet, with the published files it names built here."""
    import re
    from pathlib import Path

    from mgg_fast import fit_source_stats
    from mgg_fast.core.mgg import PUBLISHED_PREFIX

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "MGTTADropIn(" in b)
    g = torch.Generator().manual_seed(3)
    stats = fit_source_stats(tiny_vit(), [torch.randn(6, 3, 32, 32, generator=g)])
    torch.save((stats.std, stats.mean), tmp_path / "train_info.pt")
    sd = {PUBLISHED_PREFIX + k: v for k, v in MGG().state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "mgg_ckpt.pth")
    monkeypatch.chdir(tmp_path)
    scope = {"net": tiny_vit(), "images": torch.randn(6, 3, 32, 32, generator=g)}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["outputs"].shape == (6, 10) and scope["loss"].dim() == 0
    assert scope["adapt_model"].adapter.num_updates == 0  # reset() at the end
    assert scope["adapt_model"].adapter.total_updates == 1


def _configuration(model):
    return model.training, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        ([99], r"class_mask holds class index 99, but the model's head has 10 classes \(indices 0 to 9\)"),
        ([2, 10], "class_mask holds class index 10, but the model's head has 10 classes"),
        (torch.ones(12, dtype=torch.bool), "class_mask is a boolean mask over 12 classes, but the"),
        ([-1], "class_mask holds the negative class index -1"),
        ([3, 3], "class_mask lists a class twice"),
    ],
)
def test_a_class_mask_that_does_not_fit_a_timm_head_is_refused_at_construction(mask, fragment):
    """timm models give their head's width (num_classes): the mask is checked against it before
    the model is configured."""
    model = tiny_vit().eval()
    configuration = _configuration(model)
    with pytest.raises(ValueError, match=fragment):
        MGTTA(model, optimizer="sgd", loss="entropy", class_mask=mask)
    assert _configuration(model) == configuration


@pytest.mark.parametrize("episodic", [False, True])
@pytest.mark.parametrize("optimizer", ["mgg", "sgd"])
def test_a_class_mask_beyond_a_plain_head_is_named_at_the_first_batch(optimizer, episodic):
    """A model without ``num_classes``: the mask is checked against the logits of the first
    batch, before the loss, so that call changes nothing."""
    adapter = MGTTA(
        tiny_model(), optimizer=optimizer, mgg=MGG(), loss="entropy", class_mask=[0, 99], episodic=episodic
    )
    before = [p.detach().clone() for p in adapter.model.parameters()]
    state = str(adapter.optimizer.state_dict())
    for _ in range(2):
        with pytest.raises(ValueError, match="class_mask holds class index 99, but the model's head has 3"):
            adapter(torch.randn(5, 4))
    assert adapter.num_updates == 0 and adapter.total_updates == 0 and adapter.last_loss is None
    assert all(p.grad is None for p in adapter.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.model.parameters(), strict=True))
    assert str(adapter.optimizer.state_dict()) == state
    fitting = MGTTA(tiny_model(), optimizer=optimizer, mgg=MGG(), loss="entropy", class_mask=[0, 2])
    assert fitting(torch.randn(5, 4)).shape == (5, 2)


@pytest.mark.parametrize("optimizer", ["mgg", "sgd", "adam"])
@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"lr": "1e-3"}, TypeError, "lr must be a number, got str"),
        ({"lr": True}, TypeError, "lr must be a number, got bool"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number >= 0, got nan"),
        ({"lr": -1e-3}, ValueError, "lr must be a finite number >= 0, got -0.001"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas must be a pair of numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ({"betas": (0.9,)}, TypeError, r"betas must be a pair of numbers in \[0, 1\), got tuple"),
        ({"betas": (0.9, "0.99")}, TypeError, r"betas\[1\] must be a number, got str"),
    ],
)
def test_mgtta_names_a_bad_numeric_argument_and_changes_nothing(optimizer, kwargs, error, fragment):
    model = tiny_model().eval()
    configuration = _configuration(model)
    with pytest.raises(error, match=fragment):
        MGTTA(model, optimizer=optimizer, mgg=MGG(), loss="entropy", **kwargs)
    assert _configuration(model) == configuration
