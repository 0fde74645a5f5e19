"""MGTTA adapter, baselines, norm-parameter selection and the FOA loss, on tiny CPU models."""

import copy
import warnings

import pytest
import torch
from timm.layers import BatchNormAct2d, LayerNorm2d
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mgg_fast import MGG, MGTTA, MGGOptimizer, fit_source_stats
from mgg_fast.tta.losses import foa_loss, softmax_entropy
from mgg_fast.tta.norm_params import configure_for_adaptation, select_norm_params

OPTIMIZERS = ["mgg", "sgd", "adam"]


def tiny_vit():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny_resnet():
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(8, 8, 16, 16), stem_width=8)


def plain_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


MODELS = {"vit": tiny_vit, "resnet": tiny_resnet, "cnn": plain_cnn}


def make(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # non-trivial norm params and running statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batches(n, seed=1, size=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=g) * 1.5 + 0.3 for _ in range(n)]


@pytest.fixture(scope="module")
def stats():
    return {name: fit_source_stats(make(name), batches(2, seed=0)) for name in MODELS}


@pytest.fixture(scope="module")
def trained_mgg():
    torch.manual_seed(7)
    mgg = MGG()
    with torch.no_grad():  # a non-default MGG, so its output is not near the initial one
        for p in mgg.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mgg


def adapter_for(name, optimizer, stats, mgg, **kw):
    model = make(name)
    kw.setdefault("loss", "foa")
    if kw["loss"] == "foa":
        kw.setdefault("source_stats", stats[name])
    return MGTTA(model, optimizer=optimizer, mgg=mgg if optimizer == "mgg" else None, lr=1e-2, **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_only_norm_params_change(name, optimizer, stats, trained_mgg):
    adapter = adapter_for(name, optimizer, stats, trained_mgg)
    norm_names = set(adapter.param_names)
    before = snapshot(adapter.model)
    mgg_before = snapshot(trained_mgg)
    for x in batches(2):
        logits = adapter(x)
        assert logits.shape == (6, 10) and not logits.requires_grad and torch.isfinite(logits).all()
    after = snapshot(adapter.model)
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= norm_names
    if optimizer == "mgg":  # every coordinate gets a nonzero MGG update
        assert changed == norm_names
        assert adapter.mgg is trained_mgg
    assert all(torch.equal(v, mgg_before[k]) for k, v in trained_mgg.state_dict().items())
    assert adapter.num_updates == 2 and torch.isfinite(adapter.last_loss)


@pytest.mark.parametrize("optimizer", [*OPTIMIZERS, "mgg_bf16_memory"])
def test_reset_restores_bitwise(optimizer, stats, trained_mgg):
    if optimizer == "mgg_bf16_memory":
        adapter = adapter_for("resnet", "mgg", stats, trained_mgg, memory_W_dtype=torch.bfloat16)
    else:
        adapter = adapter_for("resnet", optimizer, stats, trained_mgg)
    initial = snapshot(adapter.model)
    xs = batches(3)
    first = [adapter(x) for x in xs]
    assert adapter.optimizer.state  # moments (and MGG memory) exist now
    adapter.reset()
    assert all(torch.equal(v, initial[k]) for k, v in snapshot(adapter.model).items())
    assert not adapter.optimizer.state and adapter.num_updates == 0 and adapter.total_updates == 3
    second = [adapter(x) for x in xs]  # same moments, memory and step counts: same results bitwise
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[2])


def test_episodic_vs_continual(stats, trained_mgg):
    x = batches(1)[0]
    episodic = adapter_for("vit", "mgg", stats, trained_mgg, episodic=True)
    continual = adapter_for("vit", "mgg", stats, trained_mgg)
    e1, e2 = episodic(x), episodic(x)
    c1, c2 = continual(x), continual(x)
    assert torch.equal(e1, e2) and torch.equal(e1, c1)
    assert not torch.equal(c1, c2)
    assert episodic.num_updates == 1 and episodic.total_updates == 2 and continual.num_updates == 2
    # the episodic adapter's params are one step from the original, the continual one's two
    one_step = {k: v for k, v in snapshot(episodic.model).items() if k in episodic.param_names}
    continual.reset()
    continual(x)
    assert all(torch.equal(v, snapshot(continual.model)[k]) for k, v in one_step.items())


def test_class_mask(stats):
    x = batches(1)[0]
    mask = [1, 4, 7]
    reference = make("vit")
    configure_for_adaptation(reference)
    with torch.no_grad():
        full = reference(x)
    adapter = adapter_for("vit", "sgd", stats, None, class_mask=mask)
    logits = adapter(x)  # predicted before the update
    torch.testing.assert_close(logits, full[:, mask], rtol=0, atol=0)
    bool_mask = torch.zeros(10, dtype=torch.bool)
    bool_mask[mask] = True
    by_bool = adapter_for("vit", "sgd", stats, None, class_mask=bool_mask)
    assert torch.equal(by_bool(x), logits)
    # the loss only sees the kept classes: same update as entropy on the masked logits
    adapter.reset()
    adapter.forward_backward(x)
    configure_for_adaptation(reference)
    logits_ref = reference(x)[:, mask]
    stats_ref = stats["vit"]
    assert torch.isclose(adapter.last_loss, foa_loss(logits_ref, _cls_features(reference, x), stats_ref))
    with pytest.raises(ValueError, match="class_mask"):
        adapter_for("vit", "sgd", stats, None, class_mask=[])


def _cls_features(vit, x):
    """The published layers_cls_features, computed without hooks: the CLS token after each block,
    normalised by the next block's norm1 (the final norm after the last block)."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    feats = []
    for i, blk in enumerate(vit.blocks):
        h = blk(h)
        norm = vit.blocks[i + 1].norm1 if i + 1 < len(vit.blocks) else vit.norm
        feats.append(norm(h[:, 0]))
    return torch.cat(feats, dim=1)


@pytest.mark.parametrize("loss", ["entropy", "foa"])
def test_mgg_path_equals_optimizer_by_hand(loss, stats, trained_mgg):
    """On a model with 1-D norm params, MGTTA('mgg') is exactly MGGOptimizer driven by hand."""
    adapter = adapter_for("vit", "mgg", stats, trained_mgg, loss=loss, backend="reference")
    model = make("vit")
    configure_for_adaptation(model)
    params = [p for _, p in select_norm_params(model)]
    assert all(p.dim() == 1 for p in params)
    opt = MGGOptimizer(params, trained_mgg, lr=1e-2, backend="reference")
    for x in batches(3):
        out = adapter(x)
        logits = model(x)
        hand = (
            softmax_entropy(logits).mean()
            if loss == "entropy"
            else foa_loss(logits, _cls_features(model, x), stats["vit"])
        )
        opt.zero_grad()
        hand.backward()
        opt.step()
        torch.testing.assert_close(out, logits.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(select_norm_params(adapter.model), params, strict=True):
        if loss == "entropy":  # the very same operations: bitwise equal
            assert torch.equal(p, q), name
        else:  # features read by hooks vs recomputed: float32 rounding, amplified by g / sqrt(v)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    state = adapter.optimizer.state[select_norm_params(adapter.model)[0][1]]
    assert int(state["step"]) == 3


def test_nan_batch_changes_nothing(stats, trained_mgg):
    adapter = adapter_for("cnn", "mgg", stats, trained_mgg)
    x = batches(1)[0]
    adapter(x)
    before, opt_before = snapshot(adapter.model), copy.deepcopy(adapter.optimizer.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter(bad)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter(bad)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(adapter.model).items())
    opt_after = adapter.optimizer.state_dict()
    for pid, entry in opt_before["state"].items():
        assert all(torch.equal(v, opt_after["state"][pid][k]) for k, v in entry.items())
    assert adapter.num_updates == 1


def test_device_mismatch_raises_before_compute(stats):
    adapter = adapter_for("vit", "sgd", stats, None)
    before = snapshot(adapter.model)
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        adapter(torch.empty(6, 3, 32, 32, device="meta"))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        adapter(batches(1)[0].numpy())
    assert adapter.num_updates == 0
    assert all(torch.equal(v, before[k]) for k, v in snapshot(adapter.model).items())


def test_construction_errors(stats):
    with pytest.raises(ValueError, match="no LayerNorm/BatchNorm/GroupNorm"):
        MGTTA(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), optimizer="sgd", loss="entropy")
    with pytest.raises(ValueError, match="no LayerNorm/BatchNorm/GroupNorm"):
        MGTTA(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False)), loss="entropy")
    model = make("vit")
    model_before = snapshot(model)
    with pytest.raises(ValueError, match="needs source statistics"):
        MGTTA(model, optimizer="sgd", loss="foa")
    with pytest.raises(ValueError, match="source statistics from another model"):
        MGTTA(model, optimizer="sgd", source_stats=stats["resnet"])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        MGTTA(model, optimizer="rmsprop", loss="entropy")
    with pytest.raises(ValueError, match="loss must be one of"):
        MGTTA(model, optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="memory_W_dtype is a setting of the 'mgg' optimizer"):
        MGTTA(model, optimizer="adam", loss="entropy", memory_W_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="memory_W_dtype must be"):
        MGTTA(model, optimizer="mgg", mgg=MGG(), loss="entropy", memory_W_dtype=torch.float16)
    assert not model.training and all(p.requires_grad for p in model.parameters())  # untouched
    assert all(torch.equal(v, model_before[k]) for k, v in snapshot(model).items())
    if not torch.cuda.is_available():
        with (
            pytest.MonkeyPatch.context() as mp,
            pytest.raises(ValueError, match="backend='triton' needs a CUDA model"),
        ):
            mp.delenv("TRITON_INTERPRET", raising=False)
            MGTTA(model, optimizer="mgg", mgg=MGG(), loss="entropy", backend="triton")
    assert not model.training and all(p.requires_grad for p in model.parameters())
    with pytest.warns(UserWarning, match="untrained MGG"):
        MGTTA(model, optimizer="mgg", loss="entropy")


def test_restore_model_undoes_configuration(stats, trained_mgg):
    adapter = adapter_for("resnet", "mgg", stats, trained_mgg)
    model = adapter.model
    bn = model.bn1
    assert bn.training and bn.running_mean is None and not bn.track_running_stats
    assert not model.fc.weight.requires_grad and bn.weight.requires_grad
    adapter(batches(1)[0])
    restored = adapter.restore_model()
    assert restored is model and not model.training and bn.track_running_stats
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, snapshot(make("resnet"))[k]) for k, v in snapshot(model).items())
    with pytest.raises(RuntimeError, match="restore_model"):
        adapter(batches(1)[0])


@pytest.mark.parametrize("optimizer", ["sgd", "mgg"])
def test_dropout_stays_off_so_a_seed_gives_the_same_numbers(optimizer, trained_mgg):
    """Regression: the whole model was put in train mode, so a model with dropout (torchvision's
    MobileNetV2: p = 0.2) predicted and adapted with random masks and realnet's numbers changed
    from run to run. Norm layers adapt in train mode; dropout and drop-path stay in eval mode."""

    def run(rng_seed):
        torch.manual_seed(0)
        model = nn.Sequential(plain_cnn(), nn.Dropout(0.5), nn.Linear(10, 10))
        adapter = MGTTA(model, optimizer=optimizer, mgg=trained_mgg if optimizer == "mgg" else None,
                        lr=1e-2, loss="entropy")  # fmt: skip
        assert not model[1].training and model[0][1].training and model[0][4].training
        torch.manual_seed(rng_seed)  # the global RNG differs between the runs
        return [adapter(x) for x in batches(3)]

    for a, b in zip(run(1), run(2), strict=True):
        assert torch.equal(a, b)


def test_batchnorm_uses_test_batch_statistics():
    model = make("cnn")
    x = batches(1)[0]
    configure_for_adaptation(model)
    with torch.no_grad():
        alone, together = model(x[:2]), model(torch.cat([x[:2], 5 * x[2:]]))[:2]
    assert not torch.allclose(alone, together)  # the batch statistics, not running ones


def test_select_norm_params_timm_layers_and_order():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        BatchNormAct2d(4),
        LayerNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.BatchNorm1d(4, affine=False),
        nn.Flatten(),
        nn.LayerNorm(4 * 8 * 8),
    )
    names = [n for n, _ in select_norm_params(model)]
    assert names == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias", "6.weight", "6.bias"]
    shared = nn.LayerNorm(4)
    assert len(select_norm_params(nn.Sequential(shared, nn.ReLU(), shared))) == 2


@pytest.mark.parametrize(
    ("name", "layers", "dim"),
    [("vit", ("blocks.1.norm1", "norm"), 64), ("resnet", ("layer1", "layer2", "layer3", "layer4"), 48)],
)
def test_fit_source_stats_features(name, layers, dim, stats):
    s = stats[name]
    assert s.layers == layers and s.mean.shape == s.std.shape == (dim,)
    assert (s.std >= 0).all() and (s.std > 0).sum() > dim // 2  # ReLU may leave dead channels
    if name == "vit":
        model = make("vit")
        with torch.no_grad():
            feats = torch.cat([_cls_features(model, x) for x in batches(2, seed=0)])
        std, mean = torch.std_mean(feats, dim=0)
        torch.testing.assert_close(s.mean, mean)
        torch.testing.assert_close(s.std, std)


def test_fit_source_stats_fallback_and_errors():
    cnn = make("cnn")
    s = fit_source_stats(cnn, [(x, None) for x in batches(2)], max_batches=1)
    assert s.layers == ("0", "1", "2", "3", "4", "5", "6") and s.mode == "pooled"
    assert not cnn.training  # mode restored
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="loss='entropy'"):
        fit_source_stats(mlp, batches(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MGTTA(mlp, optimizer="adam", loss="entropy")(batches(1)[0]).shape == (6, 10)


def test_foa_loss_values(stats):
    s = stats["vit"]
    logits = torch.randn(4, 10)
    ent = softmax_entropy(logits).mean()
    # features whose batch std/mean equal the source ones: no discrepancy term
    z = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1) / torch.tensor([1.0, -1.0, 1.0, -1.0]).std()
    matching = s.mean + z * s.std
    torch.testing.assert_close(foa_loss(logits, matching, s), ent)
    shifted = matching + 2.0
    torch.testing.assert_close(foa_loss(logits, shifted, s), ent + 0.4 * 4.0 * s.mean.numel() / 64)
    with pytest.raises(ValueError, match="at least 2 samples"):
        foa_loss(logits[:1], matching[:1], s)
    with pytest.raises(ValueError, match="do not match source statistics"):
        foa_loss(logits, matching[:, :10], s)


def test_adapts_inside_no_grad_and_refuses_inference_mode(stats):
    xs = batches(2)
    plain = adapter_for("cnn", "adam", stats, None)
    expected = [plain(x) for x in xs]
    adapter = adapter_for("cnn", "adam", stats, None)
    with torch.no_grad():
        got = [adapter(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        adapter(xs[0])
    assert adapter.num_updates == 2


def test_wrapped_backbone_features():
    torch.manual_seed(0)
    wrapped = nn.Sequential(nn.Identity(), tiny_vit()).eval()
    s = fit_source_stats(wrapped, batches(1))
    assert s.layers == ("1.blocks.1.norm1", "1.norm") and s.mode == "cls"
    assert MGTTA(wrapped, optimizer="sgd", source_stats=s)(batches(1)[0]).shape == (6, 10)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_baselines_lower_the_entropy(optimizer, stats):
    x = batches(1)[0]
    adapter = adapter_for("vit", optimizer, stats, None, loss="entropy")
    losses = []
    for _ in range(4):
        adapter(x)
        losses.append(float(adapter.last_loss))
    assert losses[3] < losses[2] < losses[1] < losses[0]
