"""Meta-training (train_mgg / MetaTrainer) against the published chain, and MGG checkpoints."""

import copy
import os

import pytest
import torch
from helpers import F64, mgg_from_parity
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.testing import assert_close

from mgg_fast import MGG, fit_source_stats, train_mgg
from mgg_fast.tta.meta_training import MetaTrainer

PREFIX = "seq_modeling_block."


class InnerProductModel(nn.Module):
    """Stand-in of the parity chain: 4 norm params of shape [48]; forward(g) = Σ_i <p_i, g_i>."""

    def __init__(self, params_init):
        super().__init__()
        self.ln0 = nn.LayerNorm(48, dtype=torch.float64)
        self.ln1 = nn.LayerNorm(48, dtype=torch.float64)
        with torch.no_grad():
            for p, init in zip(self.parameters(), params_init, strict=True):
                p.copy_(init)

    def forward(self, g):
        params = (self.ln0.weight, self.ln0.bias, self.ln1.weight, self.ln1.bias)
        return sum((p * gi).sum() for p, gi in zip(params, g, strict=True))


def test_metagrad_chain_matches_published(metagrad_vectors):
    case = metagrad_vectors["cases"]["trainmgg_chain"]
    assert case["param_shapes"] == [[48]] * 4
    mgg = mgg_from_parity(metagrad_vectors, torch.float64)
    before = copy.deepcopy(mgg.state_dict())
    model = InnerProductModel(case["params_init"])
    trainer = MetaTrainer(
        model,
        mgg,
        mgg_lr=0.0,  # the published chain was recorded with a meta-optimizer that never updates
        adapt_lr=case["adapt_lr"],
        loss=lambda out: out,
        betas=(case["beta1"], case["beta2"]),
    )
    seen = [trainer.step(torch.stack(g)) for g in case["grads"]]
    trainer.close()
    # step 1: the parameters are the model's own, no MGG output is upstream of them
    assert all(g is None for g in seen[0]["mgg_grads"].values())
    for record, step in zip(case["records"], seen[1:], strict=True):
        grads = step["mgg_grads"]
        for name, ref in record["grads"].items():
            short = name.removeprefix(PREFIX)
            if name in record["grads_none"]:
                assert grads[short] is None, f"step {record['step']}: {short} must get no gradient"
            else:
                assert_close(grads[short], ref, **F64, msg=lambda m, s=short: f"{s}: {m}")
    for k, v in mgg.state_dict().items():
        assert torch.equal(v, before[k])


def test_step_changes_adapted_params_only_functionally(metagrad_vectors):
    """The model's own parameters are never written; the trainer's p_t move by -adapt_lr * u."""
    case = metagrad_vectors["cases"]["trainmgg_chain"]
    mgg = mgg_from_parity(metagrad_vectors, torch.float64)
    model = InnerProductModel(case["params_init"])
    with MetaTrainer(model, mgg, mgg_lr=0.0, adapt_lr=0.5, loss=lambda out: out) as trainer:
        trainer.step(torch.stack(case["grads"][0]))
        p2 = torch.cat([p.detach() for p in trainer.params.values()])
        init = torch.cat(case["params_init"])
        # MGG outputs are tanh'ed: each coordinate moves by at most adapt_lr, and they do move
        assert 0 < (p2 - init).abs().max() <= 0.5
        assert all(p.grad_fn is not None for p in trainer.params.values())
        trainer.reset()
        assert trainer.state is None and trainer.num_steps == 0
        assert torch.equal(torch.cat([p.detach() for p in trainer.params.values()]), init)
    assert torch.equal(torch.cat([p.detach() for p in model.parameters()]), init)


def _tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def vit_setup():
    model = _tiny_vit()
    g = torch.Generator().manual_seed(1)
    source = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    shifted = [(1.5 * torch.randn(8, 3, 32, 32, generator=g) + 0.5, torch.zeros(8)) for _ in range(3)]
    return model, fit_source_stats(model, source), shifted


def test_train_mgg_changes_mgg_and_leaves_model(vit_setup):
    model, stats, batches = vit_setup
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags_before = [p.requires_grad for p in model.parameters()]
    model.eval()
    torch.manual_seed(5)
    start = MGG()
    trained = train_mgg(model, batches, mgg=copy.deepcopy(start), source_stats=stats, progress=False)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert len(changed) == len(start.state_dict())  # every MGG parameter gets meta-gradients
    assert all(torch.isfinite(v).all() for v in trained.state_dict().values())
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k]), k


def test_train_mgg_losses_finite_and_seeded(vit_setup):
    model, stats, batches = vit_setup
    with MetaTrainer(model, MGG(), loss="foa", source_stats=stats, adapt_lr=1e-2) as trainer:
        losses = [trainer.step(b)["loss"] for b in batches]
    assert all(torch.isfinite(torch.tensor(losses)))
    a = train_mgg(model, batches, loss="entropy", seed=3, progress=False)
    b = train_mgg(model, batches, loss="entropy", seed=3, progress=False)
    c = train_mgg(model, batches, loss="entropy", seed=4, progress=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.W1, c.W1)


def test_validate_keeps_best(vit_setup):
    model, stats, batches = vit_setup
    scores = iter([1.0, 3.0, 2.0])
    snapshots = []

    def validate(mgg):
        snapshots.append(copy.deepcopy(mgg.state_dict()))
        with torch.no_grad():  # a validation that disturbs the model: train_mgg must undo it
            for p in model.parameters():
                p.add_(1.0)
        return next(scores)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = train_mgg(model, batches, epochs=3, source_stats=stats, validate=validate, progress=False)
    assert len(snapshots) == 3
    assert all(torch.equal(v, snapshots[1][k]) for k, v in best.state_dict().items())
    assert not torch.equal(snapshots[1]["W1"], snapshots[2]["W1"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_train_mgg_errors(vit_setup):
    model, _, batches = vit_setup
    with pytest.raises(ValueError, match="source statistics"):
        train_mgg(model, batches, loss="foa", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        train_mgg(model, iter(batches), epochs=2, loss="entropy", progress=False)
    with pytest.raises(ValueError, match="no LayerNorm/BatchNorm/GroupNorm"):
        train_mgg(nn.Sequential(nn.Linear(4, 2)), [torch.randn(2, 4)], loss="entropy", progress=False)


def test_one_batch_per_epoch_is_refused(vit_setup):
    """An epoch's first batch gives the MGG no meta-gradient (no MGG output precedes its loss), so
    with one batch per epoch the MGG would come back bitwise untrained: refused, in every mode."""
    model, stats, batches = vit_setup
    for kw in ({}, {"shuffle": True}, {"unroll": 2}, {"reset_params": False, "epochs": 2}):
        with pytest.raises(ValueError, match=r"epoch 1 has 1 batch.*no meta-gradient.*at least 2 batches"):
            train_mgg(model, batches[:1], source_stats=stats, progress=False, **kw)
    two = train_mgg(model, batches[:2], source_stats=stats, progress=False)
    assert not torch.equal(two.W1, MGG().W1)  # two batches: the MGG learns


def test_progress_is_one_bar_over_all_epochs(vit_setup, capsys):
    model, stats, batches = vit_setup
    history = []
    train_mgg(model, batches, epochs=2, source_stats=stats, history=history, progress=True)
    err = capsys.readouterr().err
    assert "meta-train MGG" in err and "6/6" in err and "epoch=2/2" in err  # 3 batches x 2 epochs
    assert "meta-train 1/2" not in err  # no bar per epoch
    assert [h["epoch"] for h in history] == [1, 2]


# ---- MGG checkpoints --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    mgg = MGG(16, 2).double()
    mgg.save(tmp_path / "m.pt")
    loaded = MGG.load(tmp_path / "m.pt")
    assert loaded.config == {"hidden_size": 16, "num_heads": 2} and loaded.W1.dtype == torch.float64
    for k, v in mgg.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert os.listdir(tmp_path) == ["m.pt"]


def test_save_is_atomic(tmp_path, monkeypatch):
    MGG().save(tmp_path / "m.pt")
    good = (tmp_path / "m.pt").read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        MGG(16).save(tmp_path / "m.pt")
    with pytest.raises(OSError, match="disk full"):
        MGG().save(tmp_path / "new.pt")
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary leftovers, no partial new file
    assert (tmp_path / "m.pt").read_bytes() == good


def test_load_rejects_bad_files(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable MGG checkpoint"):
        MGG.load(tmp_path / "corrupt.pt")
    sd = MGG(8).state_dict()
    torch.save(
        {"format": "mgg_fast.mgg/v1", "config": {"hidden_size": 16, "num_heads": 1}, "state_dict": sd},
        tmp_path / "mismatch.pt",
    )
    with pytest.raises(ValueError, match="does not match its config"):
        MGG.load(tmp_path / "mismatch.pt")
    torch.save(
        {"format": "mgg_fast.mgg/v1", "config": {}, "state_dict": sd, "x": InnerProductModel},
        tmp_path / "p.pt",
    )
    with pytest.raises(ValueError, match="not a readable"):  # weights_only refuses arbitrary objects
        MGG.load(tmp_path / "p.pt")
    torch.save({"weights": sd}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mgg_fast MGG checkpoint"):
        MGG.load(tmp_path / "other.pt")


def test_meta_training_on_batchnorm_cnn():
    """BatchNorm + GroupNorm model through the functional path: batch statistics, pooled features."""
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.GroupNorm(2, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    running = cnn[1].running_mean.clone()
    xs = [torch.randn(6, 3, 16, 16) for _ in range(3)]
    stats = fit_source_stats(cnn, xs[:1])
    with MetaTrainer(cnn, MGG(), source_stats=stats, adapt_lr=1e-2) as trainer:
        assert cnn[1].running_mean is None  # batch statistics while meta-training
        out = [trainer.step(x) for x in xs]
    assert all(g is not None for g in out[1]["mgg_grads"].values())  # first MGG call: W1/b1 too
    assert out[2]["mgg_grads"]["W1"] is None and out[2]["mgg_grads"]["q_proj.weight"] is not None
    assert torch.equal(cnn[1].running_mean, running) and not cnn.training


def test_meta_training_learns_to_lower_the_adaptation_loss(vit_setup):
    """Later epochs replay the same adaptation run with a meta-trained MGG: lower losses after step 1."""
    model, stats, batches = vit_setup
    torch.manual_seed(0)
    with MetaTrainer(model, MGG(), source_stats=stats, adapt_lr=1e-2, mgg_lr=1e-2) as trainer:
        epochs = []
        for _ in range(3):
            trainer.reset()
            epochs.append([trainer.step(b)["loss"] for b in batches])
    assert epochs[0][0] == epochs[1][0] == epochs[2][0]  # the reset: same params at step 1
    assert sum(epochs[2][1:]) < sum(epochs[1][1:]) < sum(epochs[0][1:])


# ---- K-step truncated unrolls -------------------------------------------------------------------


def _window_grads(model, mgg, batches, unroll, loss, **kw):
    """The MGG gradients of the first window closed by a trainer with ``unroll`` (mgg_lr 0)."""
    with MetaTrainer(model, mgg, mgg_lr=0.0, adapt_lr=0.3, loss=loss, unroll=unroll, **kw) as trainer:
        out = [trainer.step(b) for b in batches]
    assert [o["meta_step"] for o in out] == [(i + 1) % unroll == 0 for i in range(len(batches))]
    return out[unroll - 1]["mgg_grads"], sum(o["loss"] for o in out[:unroll])


def test_unrolled_metagradient_matches_finite_differences(metagrad_vectors):
    """Linear loss Σ<p_t, g_t>: its gradient g_t does not depend on p, so the detached-gradient
    unroll is the exact derivative of the K-step meta-loss; central differences over a random
    direction in MGG-parameter space check the path through the parameters and the memory."""
    case = metagrad_vectors["cases"]["trainmgg_chain"]
    mgg = mgg_from_parity(metagrad_vectors, torch.float64)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 48, generator=gen, dtype=torch.float64) for _ in range(4)]
    model = InnerProductModel(case["params_init"])
    grads, _ = _window_grads(model, copy.deepcopy(mgg), batches, 4, lambda out: out)
    assert all(g is not None for g in grads.values())  # W1/b1 reach the last loss through the memory
    direction = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in grads.items()}
    analytic = sum((grads[k] * direction[k]).sum() for k in grads)

    def meta_loss(eps):
        shifted = copy.deepcopy(mgg)
        with torch.no_grad():
            for name, p in shifted.named_parameters():
                p.add_(eps * direction[name])
        return _window_grads(model, shifted, batches, 4, lambda out: out)[1]

    eps = 1e-5
    numeric = (meta_loss(eps) - meta_loss(-eps)) / (2 * eps)
    assert float(analytic) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def _independent_unroll(model, mgg, batches, loss_fn, adapt_lr, betas=(0.9, 0.99), eps=1e-8):
    """A plain re-statement of K-step unrolled meta-training (K = len(batches)): functional model,
    moments and published bias corrections written out, memory carried with its graph."""
    from torch.func import functional_call

    from mgg_fast.core.reference import memory_layer
    from mgg_fast.tta.norm_params import configure_for_adaptation, select_norm_params

    config = configure_for_adaptation(model)
    names = [n for n, _ in select_norm_params(model)]
    params = [p.detach().clone().requires_grad_(True) for _, p in select_norm_params(model)]
    n = sum(p.numel() for p in params)
    m = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    W = mgg.W1.unsqueeze(0).expand(n, -1, -1, -1)
    b = mgg.b1[:, 0, :].unsqueeze(0).expand(n, -1, -1)
    total = 0.0
    for t, x in enumerate(batches, start=1):
        loss = loss_fn(functional_call(model, dict(zip(names, params, strict=True)), (x,)))
        total = total + loss
        g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(loss, params, retain_graph=True)])
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        denom = (v / (1 - betas[1] ** (t + 1))).sqrt() + eps
        features = torch.stack((m / (1 - betas[0] ** (t + 1)) / denom, g / denom), dim=-1)
        u, W, b = memory_layer(features, W, b, mgg.weights())
        flat = torch.cat([p.reshape(-1) for p in params]) - adapt_lr * u
        shapes = [p.shape for p in params]
        params = [c.view(s) for c, s in zip(flat.split([p.numel() for p in params]), shapes, strict=True)]
    config.restore()
    mgg_params = dict(mgg.named_parameters())
    grads = torch.autograd.grad(total, list(mgg_params.values()), allow_unused=True)
    return dict(zip(mgg_params, grads, strict=True)), [p.detach() for p in params]


class _TinyNormNet(nn.Module):
    """A nonlinear float64 model with LayerNorm and BatchNorm params: entropy is not linear in them."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12, dtype=torch.float64)
        self.ln = nn.LayerNorm(12, dtype=torch.float64)
        self.bn = nn.BatchNorm1d(12, dtype=torch.float64)
        self.fc2 = nn.Linear(12, 5, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.ln(self.fc1(x)))))


@pytest.mark.parametrize("unroll", [1, 3])
def test_unrolled_metagradient_matches_an_independent_autograd_unroll(metagrad_vectors, unroll):
    from mgg_fast.tta.losses import softmax_entropy

    torch.manual_seed(0)
    model = _TinyNormNet().eval()
    mgg = mgg_from_parity(metagrad_vectors, torch.float64)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(unroll)]
    entropy = lambda out: softmax_entropy(out).mean()
    expected, p_next = _independent_unroll(model, copy.deepcopy(mgg), batches, entropy, adapt_lr=0.3)
    with MetaTrainer(model, mgg, mgg_lr=0.0, adapt_lr=0.3, loss=entropy, unroll=unroll) as trainer:
        out = [trainer.step(x) for x in batches]
        got = out[-1]["mgg_grads"]
        assert_close(torch.cat([p.reshape(-1) for p in trainer.params.values()]), torch.cat(p_next), **F64)
    for name, ref in expected.items():
        if ref is None:
            assert got[name] is None, name
        else:
            assert_close(got[name], ref, **F64, msg=lambda m, s=name: f"{s}: {m}")
    assert expected["W1"] is not None if unroll > 1 else expected["W1"] is None


def test_flush_closes_a_partial_window_and_reset_can_keep_params(vit_setup):
    model, stats, batches = vit_setup
    with MetaTrainer(model, MGG(), source_stats=stats, adapt_lr=1e-2, unroll=4) as trainer:
        out = [trainer.step(b) for b in batches]  # 3 batches: the window stays open
        assert not any(o["meta_step"] for o in out)
        before = copy.deepcopy(trainer.mgg.state_dict())
        grads = trainer.flush()
        assert grads is not None and grads["q_proj.weight"] is not None
        assert not torch.equal(trainer.mgg.state_dict()["q_proj.weight"], before["q_proj.weight"])
        assert trainer.flush() is None
        drifted = torch.cat([p.detach().reshape(-1) for p in trainer.params.values()])
        trainer.reset(params=False)
        assert trainer.num_steps == 0 and trainer.state is None and not trainer.exp_avg.any()
        assert torch.equal(torch.cat([p.reshape(-1) for p in trainer.params.values()]), drifted)
        trainer.reset()
        initial = torch.cat([p.detach().reshape(-1) for _, p in sorted(trainer._initial.items())])
        assert torch.equal(torch.cat([p.reshape(-1) for _, p in sorted(trainer.params.items())]), initial)
    with pytest.raises(ValueError, match="unroll must be an int >= 1"):
        MetaTrainer(model, MGG(), source_stats=stats, unroll=0)


def test_flat_validation_keeps_the_latest_of_equal_epochs(vit_setup):
    """A flat validation curve (as the short published validation gave) keeps the most trained
    MGG, not epoch 1; a real improvement is still the one kept."""
    model, stats, batches = vit_setup
    snapshots = []

    def scored(values):
        values = iter(values)

        def validate(mgg):
            snapshots.append(copy.deepcopy(mgg.state_dict()))
            return next(values)

        return validate

    flat = train_mgg(
        model, batches, epochs=3, source_stats=stats, validate=scored([0.7, 0.7, 0.7]), progress=False
    )
    assert all(torch.equal(v, snapshots[2][k]) for k, v in flat.state_dict().items())
    snapshots.clear()
    peak = train_mgg(
        model, batches, epochs=3, source_stats=stats, validate=scored([0.7, 0.8, 0.75]), progress=False
    )
    assert all(torch.equal(v, snapshots[1][k]) for k, v in peak.state_dict().items())


def test_patience_stops_when_the_meta_loss_stops_improving(vit_setup):
    model, stats, batches = vit_setup
    history: list = []
    train_mgg(
        model, batches, epochs=30, source_stats=stats, patience=2, history=history, progress=False, mgg_lr=0.0
    )
    # mgg_lr 0: the MGG never changes, so every epoch's meta-loss equals the first: 2 more, then stop
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["meta_updates"] for h in history] == [3, 6, 9]  # one per batch at K = 1
    full: list = []
    train_mgg(model, batches, epochs=4, source_stats=stats, unroll=3, history=full, progress=False)
    assert [h["meta_updates"] for h in full] == [1, 2, 3, 4]  # one window of 3 batches an epoch


# ---- bad arguments and failed calls change nothing ----------------------------------------------


def _small_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(5, 4, generator=g) for _ in range(2)]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module, snapshot):
    return module.state_dict().keys() == snapshot.keys() and all(
        torch.equal(v, snapshot[k]) for k, v in module.state_dict().items()
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"epochs": 1.5}, TypeError, "epochs must be an int, got float 1.5"),
        ({"epochs": True}, TypeError, "epochs must be an int, got bool"),
        ({"mgg_lr": "1e-2"}, TypeError, "mgg_lr must be a number, got str"),
        ({"mgg_lr": float("nan")}, ValueError, "mgg_lr must be a finite number >= 0, got nan"),
        ({"adapt_lr": -1e-3}, ValueError, "adapt_lr must be a finite number >= 0"),
        ({"adapt_lr": float("inf")}, ValueError, "adapt_lr must be a finite number >= 0"),
        ({"betas": (1.5, 0.9)}, ValueError, r"betas must be a pair of numbers in \[0, 1\)"),
        ({"betas": 0.9}, TypeError, r"betas must be a pair of numbers in \[0, 1\), got float"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
        ({"seed": 2**64}, ValueError, "seed must be an int <= "),
        ({"hidden_size": True}, TypeError, "hidden_size must be an int, got bool"),
        ({"hidden_size": 2**40}, ValueError, "hidden_size must be <= 1024"),
        ({"num_heads": 3}, ValueError, r"hidden_size \(8\) must be a positive multiple of num_heads \(3\)"),
        ({"unroll": True}, TypeError, "unroll must be an int, got bool"),
        ({"unroll": 2.0}, TypeError, "unroll must be an int, got float"),
    ],
)
def test_train_mgg_names_a_bad_numeric_argument_and_changes_nothing(kwargs, error, fragment):
    model, batches = _small_setup()
    mgg, model_before = MGG(), _snapshot(model)
    mgg_before, history = _snapshot(mgg), [{"epoch": 0}]
    with pytest.raises(error, match=fragment):
        train_mgg(model, batches, mgg=mgg, loss="entropy", progress=False, history=history, **kwargs)
    assert _same(mgg, mgg_before) and _same(model, model_before)
    assert history == [{"epoch": 0}]
    assert all(p.grad is None for p in mgg.parameters())


def test_metatrainer_names_a_bad_numeric_argument():
    model, _ = _small_setup()
    with pytest.raises(TypeError, match="eps must be a number, got str"):
        MetaTrainer(model, MGG(), loss="entropy", eps="1e-8")
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number >= 0, got -0.5"):
        MetaTrainer(model, MGG(), loss="entropy", betas=(0.9, -0.5))
    assert all(p.requires_grad for p in model.parameters()) and model.training  # not configured


@pytest.mark.parametrize("how", ["validate raises", "second epoch has no batches", "non-finite loss"])
def test_a_train_mgg_that_fails_part_way_puts_the_given_mgg_and_history_back(how):
    """train_mgg trains a given MGG in place: when it fails after some meta-steps, the MGG (its
    weights and gradients) and ``history`` are as they were before the call."""
    model, batches = _small_setup()
    mgg, model_before = MGG(), _snapshot(model)
    mgg_before, history = _snapshot(mgg), []
    kwargs = {"epochs": 2}
    if how == "validate raises":
        calls = []

        def validate(_mgg):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("the validation set went away")
            return 0.5

        kwargs["validate"] = validate
        expected = (RuntimeError, "the validation set went away")
    elif how == "second epoch has no batches":
        batches = iter(batches)
        expected = (ValueError, "epoch 2.* got no batches")
    else:
        batches = [batches[0], batches[1], torch.full((5, 4), float("nan"))]
        expected = (FloatingPointError, "meta-training loss is nan at step 3")
    with pytest.raises(expected[0], match=expected[1]):
        train_mgg(model, batches, mgg=mgg, loss="entropy", progress=False, history=history, **kwargs)
    assert _same(mgg, mgg_before) and _same(model, model_before)
    assert all(p.grad is None for p in mgg.parameters())
    assert history == []
