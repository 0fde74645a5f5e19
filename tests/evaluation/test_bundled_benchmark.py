"""The distribution-shift benchmark at a tiny size: data cache, source-model cache, protocol, reports."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("imagecorruptions")

import mgg_fast.evaluation.bundled.data as shift_data
from mgg_fast.core.files import sha256_file
from mgg_fast.evaluation.bundled.benchmark import BenchmarkConfig, run_benchmark
from mgg_fast.evaluation.bundled.config import DEMO_METHODS
from mgg_fast.evaluation.bundled.data import corrupted_split, load_image_folder, mnist_split
from mgg_fast.evaluation.bundled.report import write_reports
from mgg_fast.evaluation.bundled.source_models import source_model
from mgg_fast.evaluation.corruptions import check_corruption, corrupt_images, corruption_names
from mgg_fast.evaluation.protocol import summarize


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """Whatever a test does, the user's cache (~/.cache/mgg_fast) stays untouched."""
    monkeypatch.setenv("MGG_FAST_CACHE", str(tmp_path / "default-cache"))


TINY = {
    "corruptions": ("gaussian_noise", "contrast"),
    "val_corruptions": ("speckle_noise", "saturate"),
    "n_test": 8,
    "n_tune": 4,
    "n_meta": 8,
    "batch_size": 4,
    "n_stats": 16,
    "meta_epochs": 1,
    "lr_grid": {"tent": (1e-3,), "adam": (1e-3, 1e-2), "mgg": (1e-3,), "sar": (1e-3,), "eata": (1e-2,)},
    "source_epochs": 1,
    "n_train": 32,
    "backend": "reference",
}


@pytest.fixture
def count_generations(monkeypatch):
    calls = []
    original = shift_data.corrupt_images

    def counting(images, corruption, severity, seed=0):
        calls.append(corruption)
        return original(images, corruption, severity, seed)

    monkeypatch.setattr(shift_data, "corrupt_images", counting)
    return calls


def test_splits_are_disjoint_balanced_and_fixed():
    sets = {s: mnist_split(s) for s in ("train", "val", "test")}
    assert [len(v) for v in sets.values()] == [3500, 500, 1000]
    assert sets["test"].images.shape[1:] == (32, 32, 3) and sets["test"].images.dtype == np.uint8
    keys = {s: {im.tobytes() for im in v.images} for s, v in sets.items()}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert np.bincount(mnist_split("test", 20).labels, minlength=10).tolist() == [2] * 10
    np.testing.assert_array_equal(mnist_split("val", 10).labels, sets["val"].labels[:10])


def _cache_files(folder, stem):
    return folder / "data" / f"{stem}.npz", folder / "data" / f"{stem}.json"


def test_corrupted_cache_checksum_and_regeneration(tmp_path, count_generations):
    first = corrupted_split("test", "contrast", 5, 6, cache_dir=tmp_path)
    npz, manifest = _cache_files(tmp_path, "test-contrast-s5-n6-seed0")
    meta = json.loads(manifest.read_text())
    assert meta["sha256"] == sha256_file(npz)
    assert meta["params"]["n_images"] == 6 and meta["params"]["severity"] == 5
    assert count_generations == ["contrast"]

    again = corrupted_split("test", "contrast", 5, 6, cache_dir=tmp_path)  # cache hit
    assert count_generations == ["contrast"]
    np.testing.assert_array_equal(again.images, first.images)

    data = bytearray(npz.read_bytes())  # corrupt one byte of the cached file
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    repaired = corrupted_split("test", "contrast", 5, 6, cache_dir=tmp_path)
    assert len(count_generations) == 2
    np.testing.assert_array_equal(repaired.images, first.images)  # deterministic regeneration
    assert json.loads(manifest.read_text())["sha256"] == sha256_file(npz)

    json_meta = json.loads(manifest.read_text())  # a stale manifest (other parameters): regenerated
    json_meta["params"]["severity"] = 4
    manifest.write_text(json.dumps(json_meta))
    corrupted_split("test", "contrast", 5, 6, cache_dir=tmp_path)
    assert len(count_generations) == 3

    manifest.unlink()  # missing manifest
    corrupted_split("test", "contrast", 5, 6, cache_dir=tmp_path)
    npz.unlink()  # missing data file
    corrupted_split("test", "contrast", 5, 6, cache_dir=tmp_path)
    assert len(count_generations) == 5


def test_sets_of_other_sizes_and_seeds_do_not_overwrite_each_other(tmp_path, count_generations):
    """Regression (issue 16): the cache name lacked the image count, so the 32-image meta set and the
    96-image tuning set of a corruption replaced each other and were regenerated on every run."""
    for n, seed in ((6, 0), (7, 0), (6, 1)):
        corrupted_split("test", "contrast", 5, n, seed=seed, cache_dir=tmp_path)
    assert len(count_generations) == 3
    for n, seed in ((6, 0), (7, 0), (6, 1)):  # all three are cache hits now
        data = corrupted_split("test", "contrast", 5, n, seed=seed, cache_dir=tmp_path)
        assert len(data) == n
    assert len(count_generations) == 3
    assert len(list((tmp_path / "data").glob("test-contrast-*.npz"))) == 3


def test_corruptions_are_real_and_names_checked(tmp_path):
    clean = mnist_split("test", 4)
    noisy = corrupted_split("test", "gaussian_noise", 5, 4, cache_dir=tmp_path)
    np.testing.assert_array_equal(noisy.labels, clean.labels)
    assert np.abs(noisy.images.astype(int) - clean.images.astype(int)).mean() > 10
    with pytest.raises(ValueError, match="unknown corruption 'nope'"):
        check_corruption("nope")
    with pytest.raises(ValueError, match="severity"):
        corrupted_split("test", "contrast", 6, 4, cache_dir=tmp_path)


def test_corruptions_are_deterministic():
    images = mnist_split("test", 2).images
    names = [n for n in corruption_names("test") + corruption_names("validation") if n != "glass_blur"]
    for name in names:  # glass blur (seeded the same way as impulse noise) costs a 5 s numba compile
        np.testing.assert_array_equal(corrupt_images(images, name, 5, 3), corrupt_images(images, name, 5, 3))


def test_source_model_cache(tmp_path):
    first = source_model("resnet", epochs=1, n_train=32, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and 0.0 <= first.clean_accuracy <= 1.0
    again = source_model("resnet", epochs=1, n_train=32, cache_dir=tmp_path, progress=False)
    assert again.from_cache and again.clean_accuracy == first.clean_accuracy
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (path,) = (tmp_path / "models").glob("resnet-*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated: retrained
    assert not source_model("resnet", epochs=1, n_train=32, cache_dir=tmp_path, progress=False).from_cache


def test_summarize_definitions():
    counts = {"a": [(1, 4), (2, 4), (4, 4)], "b": [(0, 4), (4, 4), (3, 3)]}
    s = summarize(counts, batch_size=4)
    assert s["per_corruption"] == {"a": 7 / 12, "b": 7 / 11}
    assert s["mean"] == pytest.approx((7 / 12 + 7 / 11) / 2)
    assert s["curve"] == [0.125, 0.75, 1.0]  # the short last batch of "b" is left out
    assert s["acc_at"] == {"1": 0.75, "5": None, "10": None}


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    cfg = BenchmarkConfig(archs=("resnet",), n_seeds=2, **TINY)
    results = run_benchmark(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert results["config"]["corruptions"] == list(TINY["corruptions"])
    assert results["config"]["seeds"] == [0, 1]
    for r in results["archs"].values():
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        for run in r["seeds"]:
            assert set(run["methods"]) == set(DEMO_METHODS)  # every row of the default run
            assert (
                set(run["tuning"]["adam"]["episodic"])
                == set(run["tuning"]["adam"]["continual"])
                == {
                    "0.001",
                    "0.01",
                }
            )
            for setting in ("episodic", "continual"):
                assert run["methods"]["adam"]["lr"][setting] in (1e-3, 1e-2)
            assert run["methods"]["noadapt"]["lr"] == {"episodic": None, "continual": None}
            for m in run["methods"].values():
                for mode in ("episodic", "continual"):
                    per = m[mode]["per_corruption"]
                    assert list(per) == list(TINY["corruptions"])
                    assert m[mode]["mean"] == pytest.approx(np.mean(list(per.values())))
                    assert all(0.0 <= v <= 1.0 for v in per.values())
                assert len(m["episodic"]["curve"]) == 2  # 8 images in batches of 4
                assert m["episodic"]["acc_at"]["1"] == m["episodic"]["curve"][1]
                assert m["ms_per_batch"] > 0
                assert m["updates_to_tent"] is None or 0 <= m["updates_to_tent"] < 2
            assert run["methods"]["noadapt"]["step_ms_per_batch"] == 0
            # NoAdapt has no state: episodic and continual agree
            noadapt = run["methods"]["noadapt"]
            assert noadapt["episodic"]["per_corruption"] == noadapt["continual"]["per_corruption"]
        # the statistics over seeds are computed from the per-seed numbers
        summary = r["summary"]
        for method, entry in summary["methods"].items():
            for setting in ("episodic", "continual"):
                values = [run["methods"][method][setting]["mean"] for run in r["seeds"]]
                assert entry[setting]["values"] == values
                assert entry[setting]["mean"] == pytest.approx(np.mean(values))
        for base in ("tent", "adam"):
            d = summary["paired"][f"mgg-{base}"]["continual"]
            diffs = [
                run["methods"]["mgg"]["continual"]["mean"] - run["methods"][base]["continual"]["mean"]
                for run in r["seeds"]
            ]
            assert d["values"] == pytest.approx(diffs)
        for setting in ("episodic", "continual"):
            best = summary["paired"]["mgg-best"]["best"][setting]
            assert best in ("tent", "adam", "signum")
            means = {
                h: np.mean([run["methods"][h][setting]["mean"] for run in r["seeds"]])
                for h in ("tent", "adam", "signum")
            }
            assert means[best] == max(means.values())
            assert "mgg-mgg-memoryless" in summary["paired"]
        headline = summary["headline"]
        assert set(headline["room"]) == set(TINY["corruptions"]) and set(headline["kept"]) <= set(
            headline["room"]
        )

    paths = write_reports(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    md = paths["markdown"].read_text()
    for arch, r in results["archs"].items():
        assert f"## {arch}:" in md
        ep = r["summary"]["methods"]["mgg"]["episodic"]
        assert "| MGG | " in md and f"{100 * ep['mean']:.1f} ± {100 * ep['ci95']:.1f}" in md
        assert "| MGG − Tent (SGD) |" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["meta_training"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the MGGs' curves
    assert "| MGG (meta-training) | eval lr | meta-updates |" in md


def test_meta_training_table_and_plot(tmp_path):
    """Per MGG and eval lr over seeds: meta-updates and epochs run, the mean meta-loss of the first
    and last epoch, the epoch a validated recipe kept; the plot is drawn only where MGGs were trained."""
    from mgg_fast.evaluation.bundled.report import meta_training_rows, plot_meta_training

    nan = float("nan")

    def seed(key, losses, scores, kept):
        history = [
            {"epoch": e + 1, "mean_loss": loss, "meta_updates": 4 * (e + 1), "score": score}
            for e, (loss, score) in enumerate(zip(losses, scores, strict=True))
        ]
        tuning = {"tent": {"episodic": {"0.1": 0.5}}, key: {"meta_history": {"0.001": history}}}
        tuning[key]["selected_epoch"] = {"0.001": kept}
        return {"tuning": tuning}

    published = {"seeds": [seed("mgg-published", [2.0, 1.5, 1.5], [0.5, 0.6, 0.6], 3),
                           seed("mgg-published", [3.0, 2.5], [0.7, 0.6], 1)]}  # fmt: skip
    header, rows = meta_training_rows(published)
    assert header[-1] == "epoch kept"
    assert rows == [["MGG (published)", "0.001", "12/8", "3/2", "2.5000 → 2.0000", "3/1"]]
    demo = {"seeds": [seed("mgg", [1.0, 0.9], [nan, nan], None)]}
    assert meta_training_rows(demo)[1][0][-1] == "last"
    assert plot_meta_training({"archs": {"vit": demo, "resnet": published}}, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_meta_training({"archs": {"vit": {"seeds": [{"tuning": {}}]}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_mean_ci_is_the_t_interval_and_paired_differences_cancel_seed_effects():
    from scipy import stats

    from mgg_fast.evaluation.bundled.benchmark import aggregate
    from mgg_fast.evaluation.stats import mean_ci

    values = [0.5, 0.6, 0.7, 0.9]
    ci = mean_ci(values)
    assert ci["mean"] == pytest.approx(0.675) and ci["n"] == 4
    assert ci["ci95"] == pytest.approx(stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2)
    assert mean_ci([0.3])["ci95"] is None

    def run(seed, tent, mgg):  # seeds differ a lot, MGG − Tent is always +0.02
        per = lambda acc: {"mean": acc, "per_corruption": {"a": acc}, "curve": [acc, acc], "acc_at": {}}
        method = lambda acc: {
            "lr": {"episodic": 0.1, "continual": 0.1},
            "episodic": per(acc),
            "continual": per(acc),
            "updates_to_tent": 0,
            "ms_per_batch": 1.0,
            "step_ms_per_batch": 0.1,
        }
        return {
            "seed": seed,
            "source": {"clean_accuracy": 0.9},
            "methods": {"tent": method(tent), "mgg": method(mgg)},
        }

    summary = aggregate([run(0, 0.3, 0.32), run(1, 0.6, 0.62), run(2, 0.45, 0.47)])
    assert summary["methods"]["mgg"]["episodic"]["ci95"] > 0.1  # unpaired: wide
    paired = summary["paired"]["mgg-tent"]["episodic"]
    assert paired["mean"] == pytest.approx(0.02) and paired["ci95"] == pytest.approx(0.0, abs=1e-12)


def test_updates_to_reach():
    from mgg_fast.evaluation.protocol import final_accuracy, updates_to_reach

    assert updates_to_reach([0.1, 0.4, 0.3, 0.6], 0.35) == 1
    assert updates_to_reach([0.1, 0.2], 0.5) is None
    assert final_accuracy([0.0, 0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.3)


def test_config_rejects_bad_sizes_and_names():
    with pytest.raises(ValueError, match="n-test must be positive"):
        BenchmarkConfig(n_test=0).validate()
    with pytest.raises(ValueError, match="unknown corruption"):
        BenchmarkConfig(corruptions=("fogg",)).validate()
    with pytest.raises(ValueError, match="unknown architecture"):
        BenchmarkConfig(archs=("vgg",)).validate()
    with pytest.raises(ValueError, match="mgg-memory must be one of float32, bfloat16"):
        BenchmarkConfig(mgg_memory="fp8").validate()


def test_image_folder_flat_and_classes(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(flat / "a.png")
    Image.new("L", (28, 28), 200).save(flat / "b.jpg")
    (flat / "notes.txt").write_text("not an image")
    data = load_image_folder(flat)
    assert data.images.shape == (2, 32, 32, 3) and not data.labeled
    assert data.images[0, 0, 0].tolist() == [0, 0, 0] and data.images[0, 16, 16].tolist() == [255, 0, 0]

    classes = tmp_path / "classes"
    for label in ("3", "7"):
        (classes / label).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(classes / label / "x.png")
    assert load_image_folder(classes).labels.tolist() == [3, 7]

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        load_image_folder(flat / "a.png")


def test_given_mgg_is_tuned_not_retrained(tmp_path, monkeypatch):
    import mgg_fast.evaluation.bundled.benchmark as shift_benchmark
    from mgg_fast import MGG

    def no_meta_training(*args, **kwargs):
        raise AssertionError("a given MGG must not be meta-trained")

    monkeypatch.setattr(shift_benchmark, "train_mgg", no_meta_training)
    cfg = BenchmarkConfig(archs=("vit",), **{**TINY, "lr_grid": {**TINY["lr_grid"], "mgg": (1e-3, 1e-2)}})
    results = run_benchmark(cfg, cache_dir=tmp_path, mgg=MGG(), progress=False)
    (run,) = results["archs"]["vit"]["seeds"]
    assert results["given_mgg"] and set(run["tuning"]["mgg"]["continual"]) == {"0.001", "0.01"}
    assert all(run["methods"]["mgg"]["lr"][s] in (1e-3, 1e-2) for s in ("episodic", "continual"))


def test_merge_results_of_single_seed_runs(tmp_path):
    from mgg_fast.evaluation.bundled.summary import merge_results

    tiny = {**TINY, "lr_grid": {k: v[:1] for k, v in TINY["lr_grid"].items()}}
    parts = [
        run_benchmark(BenchmarkConfig(archs=("resnet",), seed=s, **tiny), cache_dir=tmp_path, progress=False)
        for s in (1, 0)
    ]
    merged = merge_results(parts)
    assert merged["config"]["seeds"] == [0, 1] and merged["merged_from"] == 2
    runs = merged["archs"]["resnet"]["seeds"]
    assert [r["seed"] for r in runs] == [0, 1] and runs[1] == parts[0]["archs"]["resnet"]["seeds"][0]
    tent = merged["archs"]["resnet"]["summary"]["methods"]["tent"]["episodic"]
    assert (
        tent["values"] == [r["methods"]["tent"]["episodic"]["mean"] for r in runs]
        and tent["ci95"] is not None
    )
    with pytest.raises(ValueError, match="repeated seeds"):
        merge_results([parts[0], parts[0]])
    other = json.loads(json.dumps(parts[1]))
    other["config"]["n_test"] = 4
    with pytest.raises(ValueError, match="differ in n_test"):
        merge_results([parts[0], other])


def test_grid_end_note_names_the_rows_that_chose_an_end_of_their_grid():
    """A learning rate at an end of the lrs tuned may be short of the best: the reports say which
    rows, settings and ends, and in how many seeds (the bundled data once chose the ends only)."""
    from mgg_fast.evaluation.bundled.report import grid_end_note

    def seed(adam_lr, tent_lr):
        tried = {"0.001": 0.5, "0.01": 0.6, "0.1": 0.6}
        return {
            "methods": {
                "noadapt": {"lr": {"episodic": None, "continual": None}},
                "adam": {"lr": {"episodic": adam_lr, "continual": 0.01}},
                "tent": {"lr": {"episodic": tent_lr, "continual": 0.01}},
            },
            "tuning": {"adam": {"episodic": tried, "continual": tried}, "tent": {"episodic": {"0.1": 0.4},
                       "continual": {"0.1": 0.4}}},
        }  # fmt: skip

    note = grid_end_note({"seeds": [seed(0.1, 0.1), seed(0.001, 0.1), seed(0.1, 0.1)]})
    assert note == (
        "Learning rates at an end of their grid (the best may lie beyond it): "
        "Adam episodic highest (2/3); Adam episodic lowest (1/3)."
    )  # Tent tuned a single lr: no end to speak of; continual chose inside the grid
    assert grid_end_note({"seeds": [seed(0.01, 0.1)]}) == ""


def test_published_recipe_configuration(tmp_path, monkeypatch):
    """The published recipe as the benchmark runs it: batch 2, 40 epochs over 128 images, train adapt
    lr 1e-4, eval lr 1e-3 in both settings, a shuffled loader, per-epoch validation keeping the best
    epoch, and norm params that drift across epochs (init_state resets only moments/memory/step)."""
    import mgg_fast.evaluation.bundled.benchmark as shift_benchmark
    from mgg_fast import MGG
    from mgg_fast.evaluation.bundled.benchmark import RECIPES, aggregate

    published = RECIPES["published"]
    assert (published.batch_size, published.epochs, published.n_meta) == (2, 40, 128)
    assert (published.adapt_lr, published.eval_lr, published.unroll) == (1e-4, 1e-3, 1)
    assert published.shuffle and published.validate and not published.reset_params
    assert published.method == "mgg-published" and RECIPES["demo"].method == "mgg"
    assert RECIPES["unroll"].unroll == 4 and RECIPES["unroll"].stream == "blocks"
    calls = []

    def fake_train(model, batches, **kwargs):
        calls.append((batches, kwargs))
        assert kwargs["validate"](MGG()) >= 0.0  # the per-epoch validation runs and scores
        return MGG()

    monkeypatch.setattr(shift_benchmark, "train_mgg", fake_train)
    cfg = BenchmarkConfig(archs=("resnet",), recipes=("published",), **{**TINY, "n_meta": 8})
    run = run_benchmark(cfg, cache_dir=tmp_path, progress=False)["archs"]["resnet"]["seeds"][0]
    ((batches, kwargs),) = calls
    assert len(batches) == 64 and {len(b) for b in batches} == {2}  # 128 images, batch 2
    assert kwargs["epochs"] == 40 and kwargs["adapt_lr"] == 1e-4 and kwargs["mgg_lr"] == 1e-2
    assert kwargs["shuffle"] and not kwargs["reset_params"] and kwargs["unroll"] == 1
    assert run["methods"]["mgg-published"]["lr"] == {"episodic": 1e-3, "continual": 1e-3}
    assert "mgg" not in run["methods"] and "mgg-published-tent" in aggregate([run])["paired"]


def test_curriculum_recipe_trains_each_window_in_turn_from_the_last_one(tmp_path, monkeypatch):
    """An unroll-length curriculum: one train_mgg per window, each with K times the epochs and the
    patience, the first from a fresh MGG and each later one from the MGG the previous kept; the
    history counts epochs and meta-updates across the stages and names each stage's K."""
    import mgg_fast.evaluation.bundled.benchmark as shift_benchmark
    from mgg_fast import MGG
    from mgg_fast.evaluation.bundled.benchmark import RECIPES

    assert RECIPES["episodes-curriculum"].unrolls == (1, 2, 4, 8) and RECIPES["demo"].unrolls == (1,)
    calls, made = [], []

    def fake_train(model, batches, *, mgg=None, history=None, **kwargs):
        calls.append((mgg, kwargs))
        history += [{"epoch": e, "mean_loss": 1.0, "score": math.nan, "meta_updates": 3 * e} for e in (1, 2)]
        made.append(MGG())
        return made[-1]

    monkeypatch.setattr(shift_benchmark, "train_mgg", fake_train)
    recipe = replace(RECIPES["episodes-curriculum"], unroll=(1, 2, 4))
    sizes = {**TINY, "meta_epochs": 5}
    cfg = BenchmarkConfig(archs=("resnet",), recipes=(recipe,), methods=("mgg",), **sizes)
    run = run_benchmark(cfg, cache_dir=tmp_path, progress=False)["archs"]["resnet"]["seeds"][0]
    n_lrs = len(cfg.grid("mgg"))
    assert len(calls) == 3 * n_lrs
    for stage, (given, kwargs) in enumerate(calls[:3]):
        k = (1, 2, 4)[stage]
        assert (kwargs["unroll"], kwargs["epochs"], kwargs["patience"]) == (k, 5 * k, cfg.meta_patience * k)
        assert given is (None if stage == 0 else made[stage - 1])
    history = next(iter(run["tuning"]["mgg-episodes-curriculum"]["meta_history"].values()))
    assert [(h["epoch"], h["meta_updates"], h["unroll"]) for h in history] == [
        (1, 3, 1), (2, 6, 1), (3, 9, 2), (4, 12, 2), (5, 15, 4), (6, 18, 4)
    ]  # fmt: skip


def test_curriculum_recipe_runs_for_real_at_tiny_size(tmp_path):
    """The curriculum through the real meta-training: K = 1 for one epoch (4 batches, 4
    meta-updates), then K = 2 for two epochs (2 meta-updates each), one history."""
    from mgg_fast.evaluation.bundled.benchmark import RECIPES

    recipe = replace(RECIPES["episodes-curriculum"], n_meta=16, unroll=(1, 2))
    cfg = BenchmarkConfig(archs=("resnet",), recipes=(recipe,), methods=("mgg",), **TINY)
    run = run_benchmark(cfg, cache_dir=tmp_path, progress=False)["archs"]["resnet"]["seeds"][0]
    (history,) = run["tuning"]["mgg-episodes-curriculum"]["meta_history"].values()
    stages = [(h["epoch"], h["meta_updates"], h["unroll"]) for h in history]
    assert stages == [(1, 4, 1), (2, 6, 2), (3, 8, 2)]
    assert all(math.isfinite(h["mean_loss"]) for h in history)


def test_recipe_note_says_how_many_epochs_each_recipe_may_run():
    """The report's recipe line: the published recipe runs its 40 epochs; the others stop with
    their meta-loss ("at most"), and K-step windows and curricula get K times the epochs."""
    from dataclasses import asdict

    from mgg_fast.evaluation.bundled.benchmark import RECIPES
    from mgg_fast.evaluation.bundled.report import _recipe_note

    names = ("published", "demo", "episodes-curriculum")
    cfg = {"recipes": json.loads(json.dumps([asdict(RECIPES[n]) for n in names])), "batch_size": 16,
           "meta_epochs": 40, "n_meta": 256}  # fmt: skip
    published, demo, curriculum = _recipe_note(cfg).split("; ")
    assert "batch 2, 40 epochs over 128 images" in published
    assert "batch 16, at most 40 epochs over 256 images (round-robin), K = 1," in demo
    assert "at most 40 × K epochs over 2048 images (blocks), K = 1→2→4→8," in curriculum


@pytest.mark.parametrize("unroll", [0, (), (1, 0), (2.0,)])
def test_recipe_windows_must_be_positive_ints(unroll):
    from mgg_fast.evaluation.bundled.benchmark import RECIPES

    cfg = BenchmarkConfig(recipes=(replace(RECIPES["episodes"], unroll=unroll),))
    with pytest.raises(ValueError, match="unroll must be a positive int or a tuple of them"):
        cfg.validate()


def test_meta_batches_streams():
    from dataclasses import replace

    from mgg_fast.evaluation.bundled.benchmark import RECIPES, meta_batches

    cfg = BenchmarkConfig(**{**TINY, "n_meta": 16})
    rr = meta_batches(cfg, shift_data.default_cache_dir(), "cpu")  # 8 images per corruption, batch 4
    blocks = meta_batches(
        cfg, shift_data.default_cache_dir(), "cpu", recipe=replace(RECIPES["demo"], stream="blocks")
    )
    assert len(rr) == len(blocks) == 4
    assert torch.equal(rr[0], blocks[0]) and torch.equal(rr[1], blocks[2])  # a, b, a, b vs a, a, b, b


def test_tuning_runs_on_validation_streams_like_the_test_streams(tmp_path, monkeypatch):
    import mgg_fast.evaluation.bundled.benchmark as benchmark

    seen = []
    original = benchmark.validation_scores

    def recording(runner, streams, batch_size, mixed=None):
        seen.append([len(x) for batches in streams.values() for x, _ in batches])
        return original(runner, streams, batch_size, mixed)

    monkeypatch.setattr(benchmark, "validation_scores", recording)
    cfg = BenchmarkConfig(
        archs=("resnet",), methods=("noadapt", "tent"), **{**TINY, "n_tune": None, "n_test": 12}
    )
    results = run_benchmark(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert seen and all(lengths == [4, 4, 4] * len(TINY["val_corruptions"]) for lengths in seen)
    written = write_reports(results, tmp_path / "report")
    header = (tmp_path / "report" / "results.md").read_text().split("\n\n")[2]
    assert "(12 val images each, as the test streams)" in header and "None" not in header, written


def test_headline_keeps_the_corruptions_with_room_and_pairs_on_them():
    from mgg_fast.evaluation.bundled.summary import aggregate

    def run(seed, acc):  # acc: method -> (corruption a, corruption b), the same in both settings
        def result(a, b):
            per = {"a": a, "b": b}
            setting = {"per_corruption": per, "mean": (a + b) / 2, "curve": [a], "acc_at": {}}
            return {"episodic": setting, "continual": setting, "updates_to_tent": None, "ms_per_batch": 1.0,
                    "step_ms_per_batch": 0.0, "lr": {"episodic": 0.1, "continual": 0.1}}  # fmt: skip

        return {
            "seed": seed,
            "source": {"clean_accuracy": 0.9},
            "methods": {m: result(*v) for m, v in acc.items()},
        }

    base = {"noadapt": (0.5, 0.9), "supervised": (0.7, 0.92), "tent": (0.6, 0.9), "adam": (0.55, 0.9)}
    runs = [
        run(0, {**base, "mgg": (0.62, 0.9), "mgg-memoryless": (0.58, 0.9)}),
        run(1, {**base, "mgg": (0.64, 0.9), "mgg-memoryless": (0.60, 0.9)}),
    ]
    head = aggregate(runs)["headline"]
    assert head["kept"] == ["a"]  # b: the oracle gains 2 points only
    assert head["methods"]["mgg"]["episodic"]["values"] == pytest.approx([0.62, 0.64])
    best = head["paired"]["mgg-best"]
    assert best["best"] == {"episodic": "tent", "continual": "tent"}
    assert best["episodic"]["values"] == pytest.approx([0.02, 0.04])
    assert head["paired"]["mgg-mgg-memoryless"]["continual"]["values"] == pytest.approx([0.04, 0.04])
