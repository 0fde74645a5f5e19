"""The shipped models: they load, match their manifest, are the ones the demo's configuration
asks for, and the command that made them makes the same files again (at a small size)."""

import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("imagecorruptions")

from mgg_fast import MGG
from mgg_fast.core.files import sha256_file
from mgg_fast.evaluation.bundled import assets
from mgg_fast.evaluation.bundled.benchmark import prepare
from mgg_fast.evaluation.bundled.config import BenchmarkConfig, recipe_of
from mgg_fast.evaluation.bundled.source_models import SourceConfig, source_model


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MGG_FAST_CACHE", str(tmp_path / "cache"))


def test_shipped_files_match_their_manifest_and_load():
    files = assets.read_manifest()["files"]
    assert files, "no shipped assets"
    on_disk = {p.name for p in assets.ASSETS.iterdir() if p.name != assets.MANIFEST}
    assert on_disk == set(files), "files and manifest disagree"
    for name, entry in files.items():
        path = assets.ASSETS / name
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"], name
        assert "command" in entry and "machine" in entry and entry["machine"]["torch"]
        if entry["kind"] == "MGG":
            mgg = MGG.load(path)
            assert all(torch.isfinite(p).all() for p in mgg.parameters())
            assert entry["meta_history"][-1]["meta_updates"] > 0


def test_the_demo_uses_the_shipped_models(monkeypatch):
    """The default configuration finds a shipped source model and MGG for every architecture
    (seed 0), so the demo trains nothing; a configuration that differs trains its own."""
    cfg = BenchmarkConfig()
    for arch in cfg.archs:
        model = source_model(arch, seed=0, progress=False)
        assert model.bundled
        assert not source_model(arch, seed=0, progress=False, bundled=False, epochs=1, n_train=16).bundled

    def must_not_train(*args, **kwargs):
        raise AssertionError("the demo's configuration meta-trained an MGG instead of using a shipped one")

    import mgg_fast.evaluation.bundled.benchmark as benchmark

    monkeypatch.setattr(benchmark, "_meta_train", must_not_train)
    small = replace(cfg, archs=("resnet",), corruptions=("contrast",), n_test=8, n_tune=8)
    recipe = recipe_of("demo")
    prepared = prepare("resnet", 0, small, {recipe.method: recipe})
    trained = benchmark.meta_trained(prepared.ctx, recipe, cfg.loss, prepared.metas[recipe.method], 0)
    assert [t.bundled for t in trained] == [True] * len(cfg.grid("mgg"))


@pytest.mark.slow
def test_the_assets_command_makes_the_same_files_again(tmp_path):
    """``python -m mgg_fast assets`` at a small size, twice into two folders: byte-identical
    files, listed with their sha256; the shipped manifest names that command."""
    from mgg_fast.cli import main

    args = [
        "assets", "--archs", "resnet", "--source-epochs", "1", "--source-images", "64", "--n-meta", "32",
        "--batch-size", "8", "--meta-epochs", "2", "--corruptions", "contrast", "--no-progress",
    ]  # fmt: skip
    for run in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / run), "--cache-dir", str(tmp_path / f"cache-{run}")]) == 0
    a, b = (json.loads((tmp_path / run / assets.MANIFEST).read_text())["files"] for run in ("a", "b"))
    assert set(a) == set(b) and len(a) == 1 + len(BenchmarkConfig().grid("mgg"))
    for name in a:
        assert a[name]["sha256"] == b[name]["sha256"] == sha256_file(tmp_path / "a" / name), name
    shipped = assets.read_manifest()["files"]
    assert all(e["command"].startswith("python -m mgg_fast assets") for e in shipped.values())
    config = SourceConfig(arch="resnet", epochs=1, n_train=64, lr=3e-3)
    assert assets.source_name("resnet", config.key()) in a
