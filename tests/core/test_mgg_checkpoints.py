"""MGG checkpoints: our format and the published one, size checks before allocating, file modes."""

import os
import stat

import pytest
import torch

from mgg_fast import MGG
from mgg_fast.core.mgg import CHECKPOINT_FORMAT, PUBLISHED_PREFIX, expected_shapes


def ours(tmp_path, config, state_dict, name="m.pt"):
    path = tmp_path / name
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state_dict}, path)
    return path


def published(tmp_path, mgg, name="mgg_ckpt.pth"):
    """A file in the official layout: ``{"model_state_dict": <TTTMGG state_dict>}``, prefixed keys."""
    path = tmp_path / name
    sd = {PUBLISHED_PREFIX + k: v for k, v in mgg.state_dict().items()}
    torch.save({"model_state_dict": sd}, path)
    return path


def test_huge_hidden_size_is_refused_before_allocating(tmp_path, monkeypatch):
    path = ours(tmp_path, {"hidden_size": 1 << 20, "num_heads": 1}, MGG(8).state_dict())
    built = []
    original = MGG.__init__
    monkeypatch.setattr(MGG, "__init__", lambda self, *a, **k: (built.append(a), original(self, *a, **k)))
    with pytest.raises(ValueError, match=r"m\.pt.*does not match its config.*hidden_size 8"):
        MGG.load(path)
    assert built == []  # nothing was constructed (a 2^20 hidden size would allocate 4 TiB)


@pytest.mark.parametrize(
    ("state_dict", "fragment"),
    [
        ([1, 2, 3], "state_dict is a list"),
        ({**MGG(8).state_dict(), "W1": torch.zeros(1, 8, 8, dtype=torch.int64)}, "W1 is torch.int64"),
    ],
)
def test_bad_state_dicts_name_the_file(tmp_path, state_dict, fragment):
    path = ours(tmp_path, {"hidden_size": 8, "num_heads": 1}, state_dict, name="bad_ckpt.pt")
    with pytest.raises(ValueError, match=rf"bad_ckpt\.pt.*{fragment}"):
        MGG.load(path)


def test_save_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        MGG().save(tmp_path / "m.pt")
        os.umask(0o007)
        MGG().save(tmp_path / "g.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.pt").stat().st_mode) == 0o660


@pytest.mark.parametrize(("hidden_size", "num_heads"), [(8, 1), (16, 2), (768, 1)])
def test_published_checkpoint_loads_with_sizes_from_the_shapes(tmp_path, hidden_size, num_heads):
    torch.manual_seed(0)
    mgg = MGG(hidden_size, num_heads)
    loaded = MGG.load(published(tmp_path, mgg))
    assert loaded.config == {"hidden_size": hidden_size, "num_heads": num_heads}
    for k, v in mgg.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_published_checkpoint_reproduces_the_parity_vectors(tmp_path, forward_vectors):
    """The oracle's float64 weights, saved in the official layout, give the official outputs."""
    path = tmp_path / "mgg_ckpt.pth"
    torch.save({"model_state_dict": forward_vectors["state_dict"]}, path)  # prefixed names, as published
    mgg = MGG.load(path)
    assert (
        mgg.W1.dtype == torch.float64
        and mgg.config["hidden_size"] == forward_vectors["config"]["hidden_size"]
    )
    out, _ = mgg(forward_vectors["inputs"][0])
    torch.testing.assert_close(
        out.reshape(-1), forward_vectors["outputs_f64"][0].reshape(-1), rtol=1e-9, atol=1e-10
    )


def test_published_checkpoint_errors(tmp_path):
    sd = {PUBLISHED_PREFIX + k: v for k, v in MGG(16, 2).state_dict().items()}
    torch.save(
        {"model_state_dict": {**sd, PUBLISHED_PREFIX + "b1": torch.zeros(2, 1, 4)}}, tmp_path / "a.pth"
    )
    with pytest.raises(
        ValueError, match=r"a\.pth: tensor shapes do not fit hidden_size 16, 2 head.*b1 \[2, 1, 4\]"
    ):
        MGG.load(tmp_path / "a.pth")
    del sd[PUBLISHED_PREFIX + "o_proj.weight"]
    torch.save({"model_state_dict": sd}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"b\.pth is not an MGG state dict: missing \['o_proj.weight'\]"):
        MGG.load(tmp_path / "b.pth")
    torch.save({"model_state_dict": sd, "extra": stat.S_IMODE}, tmp_path / "c.pth")  # a pickled function
    with pytest.raises(ValueError, match=r"c\.pth is not a readable MGG checkpoint"):
        MGG.load(tmp_path / "c.pth")


@pytest.mark.parametrize("layout", ["ours", "published"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_file(tmp_path, layout, bad):
    mgg = MGG(16, 2)
    with torch.no_grad():
        mgg.learnable_ttt_lr_bias[1, 0] = bad
    if layout == "ours":
        mgg.save(tmp_path / "nan_ckpt.pt")
    else:
        sd = {PUBLISHED_PREFIX + k: v for k, v in mgg.state_dict().items()}
        torch.save({"model_state_dict": sd}, tmp_path / "nan_ckpt.pt")
    with pytest.raises(
        ValueError, match=r"nan_ckpt\.pt: the MGG's learnable_ttt_lr_bias holds NaN or Inf values"
    ):
        MGG.load(tmp_path / "nan_ckpt.pt")


def test_a_hidden_size_beyond_the_bound_is_refused_at_load_naming_the_file(tmp_path):
    """Consistent shapes and config, small tensors (1026 heads of 1), yet past the bound (1024)."""
    h = 1026
    shapes = expected_shapes(h, h)
    path = ours(tmp_path, {"hidden_size": h, "num_heads": h}, {k: torch.zeros(s) for k, s in shapes.items()})
    with pytest.raises(ValueError, match=rf"m\.pt: hidden_size must be <= 1024, got {h}"):
        MGG.load(path)
