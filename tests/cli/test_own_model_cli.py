"""``adapt``/``train``/``stats --model``: timm models from local checkpoints on generated ImageNet-C and
ImageFolder trees of tiny images, the published MGG and train_info.pt formats, resume, bad input."""

import json
import re
import shutil

import numpy as np
import pytest
import timm
import torch

import mgg_fast.evaluation.folders
import mgg_fast.evaluation.protocol
from mgg_fast import MGG, fit_source_stats
from mgg_fast.cli import main
from mgg_fast.core.mgg import PUBLISHED_PREFIX
from mgg_fast.tta.source_stats import STATS_FORMAT, SourceStats

CORRUPTIONS = ("gaussian_noise", "fog", "contrast")
CLASSES = ("ant", "bee", "cat", "dog")
FAST = "--device cpu --workers 0 --no-progress --batch-size 4"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny forwards run 10-20x slower with two threads on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(folder, n, rng, size=16):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data trees, a ViT checkpoint (.pth, under "model"), a ResNet one (.safetensors), the
    published MGG checkpoint and train_info.pt, all built here."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        for cls in CLASSES:
            write_images(root / "imagenet-c" / c / "5" / cls, 3, rng)
    (root / "imagenet-c" / "fog" / "3").mkdir()
    for cls in CLASSES:
        write_images(root / "folder" / cls, 3, rng)
    write_images(root / "flat", 6, rng)

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4)
    torch.save({"model": vit.state_dict(), "epoch": 3}, root / "vit.pth")
    resnet = timm.create_model("resnet18", num_classes=4)
    save_file(resnet.state_dict(), root / "resnet.safetensors")

    torch.manual_seed(1)
    mgg = MGG()
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(
        {"model_state_dict": {PUBLISHED_PREFIX + k: v for k, v in mgg.state_dict().items()}}, root / "mgg.pth"
    )
    stats = fit_source_stats(vit.eval(), [torch.randn(8, 3, 32, 32)])
    torch.save((stats.std, stats.mean), root / "train_info.pt")  # the published (std, mean) pair
    return root


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def accuracy_from_csv(path):
    rows = path.read_text().splitlines()[1:]
    hits = [row.split(",")[1] == row.split(",")[2] for row in rows]
    return sum(hits) / len(hits), len(rows)


# ---- end to end ----------------------------------------------------------------------------------


def cli(capsys, template, **paths):
    """``run_cli`` of a command written as one string: ``{name}`` tokens are the given paths."""
    return run_cli(capsys, *(token.format(**paths) for token in template.split()))


VIT_RUN = "adapt --model vit_tiny_patch16_224 --model-args img_size=32,num_classes=4 --checkpoint {w}/vit.pth"


def test_adapt_imagenet_c_with_the_published_files(capsys, world, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys,
        VIT_RUN + " --data {w}/imagenet-c --method noadapt,mgg --mgg {w}/mgg.pth --source-stats "
        "{w}/train_info.pt --lr 0.5 --out {out} " + FAST,
        w=world,
        out=out,
    )
    assert code == 0, err
    assert "imagenet-c, labeled" in stdout and "loss foa" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["streams"] == list(CORRUPTIONS)
    for method in ("noadapt", "mgg"):
        per = results["methods"][method]["per_corruption"]
        for c in CORRUPTIONS:  # the reported accuracy is the one of the written predictions
            acc, n = accuracy_from_csv(out / "predictions" / method / f"{c}.csv")
            assert n == 12 and per[c] == pytest.approx(acc)
        assert results["methods"][method]["mean"] == pytest.approx(np.mean(list(per.values())))
    pair = json.loads((out / "runs" / "mgg" / "fog.json").read_text())
    assert pair["updates"] == 3 and pair["images"] == 12
    assert json.loads((out / "runs" / "noadapt" / "fog.json").read_text())["updates"] == 0
    methods = results["methods"]
    assert methods["mgg"]["mean_confidence"] != methods["noadapt"]["mean_confidence"]  # it adapted
    md = (out / "results.md").read_text()
    assert "| gaussian_noise |" in md and "| mean |" in md
    assert (out / "accuracy_vs_updates.png").read_bytes()[:4] == b"\x89PNG"


def test_adapt_imagefolder_resnet_from_safetensors(capsys, world, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys,
        "adapt --model resnet18 --model-args num_classes=4 --checkpoint {w}/resnet.safetensors "
        "--input-size 32 --data {w}/folder --method tent,adam --lr 1e-3 2e-3 --source-data {w}/folder "
        "--source-images 8 --out {out} " + FAST,
        w=world,
        out=out,
    )
    assert code == 0, err
    assert "source statistics from 8 images" in stdout and "imagefolder, labeled" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lrs"] == {"tent": 1e-3, "adam": 2e-3}
    assert results["config"]["input_size"] == [3, 32, 32]
    assert labels_in(out / "predictions" / "tent" / "folder.csv") == {c: i for i, c in enumerate(CLASSES)}


def labels_in(csv_path):
    """``{class folder: label}`` of the images in a predictions file."""
    rows = csv_path.read_text().splitlines()[1:]
    return {row.split(",")[0].split("/")[-2]: int(row.split(",")[1]) for row in rows}


def test_adapt_unlabeled_folder_reports_confidence(capsys, world, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, VIT_RUN + " --data {w}/flat --method tent --out {out} " + FAST, w=world, out=out
    )
    assert code == 0, err
    assert "unlabeled" in stdout and "entropy" in stdout
    results = json.loads((out / "results.json").read_text())
    assert "per_corruption" not in results["methods"]["tent"]
    assert results["methods"]["tent"]["images"] == 6
    assert "mean confidence" in (out / "results.md").read_text()
    assert not (out / "accuracy_vs_updates.png").exists()
    (results_line,) = [line for line in stdout.splitlines() if line.startswith("Results:")]
    assert results_line.endswith("; no plot: the images are unlabeled (no accuracy to plot)")


def test_resume_after_an_interrupted_run(capsys, world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    command = VIT_RUN + " --data {w}/imagenet-c --method tent --out {out} " + FAST
    real = mgg_fast.evaluation.folders.run_pair
    ran = []

    def interrupted(setup, method, stream, **kw):
        if stream.name == "fog":
            raise KeyboardInterrupt
        ran.append(stream.name)
        return real(setup, method, stream, **kw)

    monkeypatch.setattr(mgg_fast.evaluation.folders, "run_pair", interrupted)
    code, _, err = cli(capsys, command, w=world, out=out)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in (out / "runs" / "tent").iterdir()) == ["gaussian_noise.json"]
    first = (out / "runs" / "tent" / "gaussian_noise.json").read_bytes()

    code, _, err = cli(capsys, command, w=world, out=out)  # no --resume: refused, nothing touched
    assert_one_line_error(code, err, "already holds a run", "--resume")
    code, _, err = cli(capsys, command + " --resume --lr 0.01", w=world, out=out)
    assert_one_line_error(code, err, "cannot resume", "lrs")

    monkeypatch.setattr(
        mgg_fast.evaluation.folders, "run_pair", lambda *a, **k: (ran.append(a[2].name), real(*a, **k))[1]
    )
    ran.clear()
    code, stdout, err = cli(capsys, command + " --resume", w=world, out=out)
    assert code == 0, err
    assert ran == ["fog", "contrast"] and "gaussian_noise: done before, kept" in stdout
    assert (out / "runs" / "tent" / "gaussian_noise.json").read_bytes() == first
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]["tent"]["per_corruption"]) == list(CORRUPTIONS)


def test_train_then_stats_then_adapt(capsys, world, tmp_path):
    vit = VIT_RUN.replace("adapt ", "")
    code, stdout, err = cli(
        capsys,
        "stats " + vit + " --data {w}/folder --images 8 --output {t}/stats.pt " + FAST,
        w=world,
        t=tmp_path,
    )
    assert code == 0, err
    assert "12 cls layers, 2304 features" in stdout
    saved = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert saved["format"] == STATS_FORMAT and saved["std"].shape == (12 * 192,) and saved["mode"] == "cls"
    assert saved["layers"][:2] == ["blocks.1.norm1", "blocks.2.norm1"] and saved["layers"][-1] == "norm"

    code, stdout, err = cli(
        capsys,
        "train " + vit + " --data {w}/imagenet-c --corruptions fog,contrast --images 8 --epochs 1 "
        "--source-stats {t}/stats.pt --output {t}/mgg.pt " + FAST,
        w=world,
        t=tmp_path,
    )
    assert code == 0, err
    assert "on 8 images" in stdout and "fog, contrast" in stdout and "loss foa" in stdout
    assert "meta-loss (mean over the epoch's batches)" in stdout
    assert not torch.equal(MGG.load(tmp_path / "mgg.pt").W1, MGG().W1)

    code, _, err = cli(
        capsys,
        VIT_RUN + " --data {w}/imagenet-c --corruptions fog --mgg {t}/mgg.pt --source-stats {t}/stats.pt "
        "--out {t}/out " + FAST,
        w=world,
        t=tmp_path,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "runs" / "mgg" / "fog.json").read_text())["updates"] == 3


def test_published_train_info_loads_as_source_stats(world):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4)
    stats = SourceStats.load(world / "train_info.pt", vit)
    assert stats.mode == "cls" and len(stats.layers) == 12 and stats.std.shape == (12 * 192,)
    shallow = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=6)
    with pytest.raises(
        ValueError, match=r"train_info\.pt holds 2304 values .* 6 blocks × width 192 give 1152"
    ):
        SourceStats.load(world / "train_info.pt", shallow)
    with pytest.raises(
        ValueError, match=r"train_info\.pt holds the published CLS-feature statistics of a ViT"
    ):
        SourceStats.load(world / "train_info.pt", timm.create_model("resnet18"))
    with pytest.raises(ValueError, match=r"published \(std, mean\) pair: load it with the model"):
        SourceStats.load(world / "train_info.pt")


@pytest.mark.parametrize(
    ("folders", "listing", "head", "expected"),
    [
        (
            ["n01443537", "n01440764", "n15075141"],
            None,
            1000,
            {"n01440764": 0, "n01443537": 1, "n15075141": 999},
        ),
        (["ant", "bee", "cat", "dog"], "dog\ncat\nbee\nant\n", 4, {"dog": 0, "cat": 1, "bee": 2, "ant": 3}),
        (["0", "2", "10"], None, 11, {"0": 0, "2": 2, "10": 10}),
    ],
)
def test_labels_from_wnids_classes_txt_and_numbers(capsys, tmp_path, folders, listing, head, expected):
    rng = np.random.default_rng(2)
    for name in folders:
        write_images(tmp_path / "data" / name, 2, rng)
    if listing:
        (tmp_path / "data" / "classes.txt").write_text(listing)
    code, _, err = cli(
        capsys,
        f"adapt --model resnet18 --model-args num_classes={head} --input-size 32 --data {{t}}/data "
        "--method noadapt --out {t}/out " + FAST,
        t=tmp_path,
    )
    assert code == 0, err
    assert labels_in(tmp_path / "out" / "predictions" / "noadapt" / "data.csv") == expected


def test_episodic_predicts_every_batch_with_the_source_model(capsys, world, tmp_path):
    """Episodic: each batch is predicted right after a reset, so an adapting method (even at a
    large lr) predicts exactly what NoAdapt does; continual, the same lr changes the predictions."""

    def predictions(method, flags=""):
        out = tmp_path / f"{method}{flags}"
        command = VIT_RUN + f" --data {{w}}/folder --method {method} --lr 1.0 --out {{out}} {flags} " + FAST
        code, _, err = cli(capsys, command, w=world, out=out)
        assert code == 0, err
        return (out / "predictions" / method / "folder.csv").read_text()

    source = predictions("noadapt")
    assert predictions("tent", "--episodic") == source
    assert predictions("tent") != source


def test_progress_bar_shows_the_running_accuracy(capsys, world, tmp_path, monkeypatch):
    """On a terminal; and no bar at all when stderr is not one (a log file, a pipe: here captured)."""
    import mgg_fast.cli.common

    command = VIT_RUN + " --data {w}/folder --method noadapt --out {out} --device cpu --workers 0"
    code, _, err = cli(capsys, command, w=world, out=tmp_path / "piped")
    assert code == 0, err
    assert "noadapt folder" not in err and "acc=" not in err
    monkeypatch.setattr(mgg_fast.cli.common, "stderr_is_terminal", lambda: True)
    code, _, err = cli(capsys, command, w=world, out=tmp_path / "out")
    assert code == 0, err
    assert "noadapt folder" in err and "acc=" in err


def test_corrupt_images_are_skipped_with_a_warning_and_a_count(capsys, world, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(world / "folder", root)
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    command = (
        VIT_RUN + " --data {root} --method tent --out {out} " + FAST + " --workers 2"
    )  # decoded in workers
    code, stdout, err = cli(capsys, command, w=world, root=root, out=tmp_path / "out")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped unreadable image")]
    assert len(warnings) == 2 and "broken.png" in err and "empty.jpg" in err
    assert "2 unreadable images skipped" in stdout
    pair = json.loads((tmp_path / "out" / "runs" / "tent" / "data.json").read_text())
    assert pair["skipped_images"] == 2 and pair["images"] == 12


def test_adapt_model_without_method_runs_the_baselines_and_mgg_when_given(capsys, world, tmp_path):
    """No --method: noadapt,tent,adam, and mgg as well when --mgg gives one (no error about a
    --method the user never typed)."""
    for extra, methods in (
        ("", ["noadapt", "tent", "adam"]),
        (" --mgg {w}/mgg.pth", ["noadapt", "tent", "adam", "mgg"]),
    ):
        out = tmp_path / f"out{len(methods)}"
        code, stdout, err = cli(
            capsys, VIT_RUN + " --data {w}/flat --out {out} " + FAST + extra, w=world, out=out
        )
        assert code == 0, err
        assert f"methods {', '.join(methods)}," in stdout
        assert list(json.loads((out / "results.json").read_text())["methods"]) == methods


def test_train_model_with_one_batch_per_epoch_is_refused(capsys, world, tmp_path, monkeypatch):
    """6 images at the default batch of 64 are one batch per epoch: the MGG would get no
    meta-gradient and be saved untrained, so nothing is trained or saved."""
    import mgg_fast.tta.meta_training

    monkeypatch.setattr(mgg_fast.tta.meta_training, "train_mgg", _must_not_run)
    vit = VIT_RUN.replace("adapt ", "train ")
    command = (
        vit + " --data {w}/flat --loss entropy --output {t}/mgg.pt --device cpu --workers 0 --no-progress"
    )
    code, _, err = cli(capsys, command, w=world, t=tmp_path)
    assert_one_line_error(
        code, err, "6 image(s) at --batch-size 64 make 1 meta-training batch", "use --batch-size 3 or less"
    )
    assert not (tmp_path / "mgg.pt").exists()


def test_train_model_reports_the_meta_loss_of_the_first_and_last_epoch(capsys, world, tmp_path):
    vit = VIT_RUN.replace("adapt ", "train ")
    command = vit + " --data {w}/flat --loss entropy --epochs 2 --output {t}/mgg.pt " + FAST
    code, stdout, err = cli(capsys, command, w=world, t=tmp_path)
    assert code == 0, err
    found = re.search(
        r"meta-loss \(mean over an epoch's batches\): epoch 1 (\S+), epoch 2 (\S+) \((\S+)\)", stdout
    )
    assert found, stdout
    first, last, change = map(float, found.groups())
    assert change == pytest.approx(last - first, abs=2e-4)


def _must_not_run(*args, **kwargs):
    raise AssertionError("meta-training started although the data cannot train the MGG")


# ---- the plot of accuracy against updates ------------------------------------------------------------


def captured_figures(monkeypatch):
    """The figures plot_curves draws, kept open (it closes each after writing the PNG)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def test_a_run_smaller_than_one_batch_writes_a_plot_that_says_why_it_has_no_curve(
    capsys, world, tmp_path, monkeypatch
):
    figures = captured_figures(monkeypatch)
    out = tmp_path / "out"
    command = VIT_RUN + " --data {w}/folder --method noadapt,tent --out {out} " + FAST
    code, stdout, err = cli(capsys, command.replace("--batch-size 4", "--batch-size 64"), w=world, out=out)
    assert code == 0, err
    assert (out / "accuracy_vs_updates.png").read_bytes()[:4] == b"\x89PNG"
    (results_line,) = [line for line in stdout.splitlines() if line.startswith("Results:")]
    assert "accuracy_vs_updates.png" in results_line
    assert "the plot has no curve: no stream fills a batch of 64 images" in results_line
    (fig,) = figures
    (ax,) = fig.axes
    assert not ax.get_lines() and any("no batch of the full size" in t.get_text() for t in ax.texts)


def test_an_unreadable_image_does_not_cut_the_curve(capsys, world, tmp_path):
    """13 files at batch 4 are the batches 4, 4, 5; one file cannot be read, so one batch holds
    an image fewer. Every batch still gives a point of the curve (it was cut at the short batch)."""
    from mgg_fast.evaluation.images import batch_indices, find_streams

    root = tmp_path / "data"
    shutil.copytree(world / "folder", root)
    (root / "ant" / "broken.png").write_bytes(b"\x89PNG not really")
    (stream,) = find_streams(root, "imagefolder", corruptions=None, severity=5, num_labels=4)
    broken = stream.files.index(root / "ant" / "broken.png")
    seed = next(s for s in range(50) if broken in batch_indices(len(stream), 4, s)[0])  # the first batch
    out = tmp_path / "out"
    command = VIT_RUN + f" --data {{root}} --method tent --out {{out}} --seed {seed} " + FAST
    code, _, err = cli(capsys, command, w=world, root=root, out=out)
    assert code == 0, err
    pair = json.loads((out / "runs" / "tent" / "data.json").read_text())
    assert [n for _, n in pair["batch_counts"]] == [3, 4, 5]
    assert len(json.loads((out / "results.json").read_text())["methods"]["tent"]["curve"]) == 3


# ---- bad input: one line, exit 2, nothing written --------------------------------------------------


def broken_tree(tmp_path, world, kind):
    """A copy of a data tree with one defect."""
    if kind == "mislabeled":
        root = tmp_path / "mislabeled"
        shutil.copytree(world / "folder", root)
        (root / "classes.txt").write_text("ant\nbee\ncat\n")  # no 'dog'
    elif kind == "too-many-classes":
        root = tmp_path / "many"
        shutil.copytree(world / "folder", root)
        write_images(root / "emu", 1, np.random.default_rng(1))
    else:
        root = tmp_path / "empty"
        (root / "ant").mkdir(parents=True)
    return root


MODELS = {
    "vit": VIT_RUN,
    "resnet-into-vit": VIT_RUN.replace("{w}/vit.pth", "{w}/resnet.safetensors"),
    "wrong-classes": VIT_RUN.replace("num_classes=4", "num_classes=10"),
    "shallow-vit": "adapt --model vit_tiny_patch16_224 --model-args img_size=32,num_classes=4,depth=6",
    "unknown": "adapt --model vit_tiny_patch16_244",
}


@pytest.mark.parametrize(
    ("model", "data", "extra", "fragments"),
    [
        (
            "unknown",
            "folder",
            "",
            ["timm has no model 'vit_tiny_patch16_244'", "closest: vit_tiny_patch16_224"],
        ),
        (
            "resnet-into-vit",
            "folder",
            "",
            ["safetensors does not fit vit_tiny", "missing cls_token", "unexpected bn1.bias"],
        ),
        (
            "wrong-classes",
            "folder",
            "",
            ["shape (file vs model) head.weight [4, 192] vs [10, 192]", "num_classes"],
        ),
        ("vit", "empty", "", ["no images"]),
        ("vit", "bundled", "", ["--model needs --data ROOT, a folder of your images"]),
        ("vit", "mislabeled", "", ["class folders ['dog'] are not listed in", "classes.txt"]),
        ("vit", "too-many-classes", "", ["class folder 'emu' gets label 4", "predicts 4 classes"]),
        ("vit", "imagenet-c", "--severity 3 --corruptions fog", ["no images", "fog/3"]),
        ("vit", "imagenet-c", "--severity 4", ["gaussian_noise has no severity 4 folder (found 5)"]),
        (
            "vit",
            "imagenet-c",
            "--corruptions snow",
            ["has no corruption folder 'snow' (found gaussian_noise"],
        ),
        (
            "vit",
            "folder",
            "--class-mask {t}/mask.txt",
            ["--class-mask", "has index 7, but the model's head has 4"],
        ),
        ("vit", "folder", "--method mgg", ["--method mgg needs --mgg FILE"]),
        ("vit", "folder", "--method mgg --mgg {t}/badmgg.pt", ["badmgg.pt: tensor shapes do not fit"]),
        ("vit", "folder", "--method sar", ["unknown method 'sar'"]),
        ("vit", "folder", "--loss foa", ["--loss foa needs --source-stats FILE or --source-data ROOT"]),
        ("vit", "folder", "--source-stats {t}/half_info.pt", ["half_info.pt holds 1152 values", "12 blocks"]),
        (
            "shallow-vit",
            "folder",
            "--source-stats {w}/train_info.pt",
            ["train_info.pt holds 2304", "6 blocks"],
        ),
        (
            "vit",
            "folder",
            "--input-size 64",
            ["cannot run on these images", "Input height (64)", "--input-size"],
        ),
    ],
)
def test_bad_input(capsys, world, tmp_path, model, data, extra, fragments):
    given = {"folder": world / "folder", "imagenet-c": world / "imagenet-c", "bundled": "bundled"}
    data_root = given[data] if data in given else broken_tree(tmp_path, world, data)
    (tmp_path / "mask.txt").write_text("0 1 7\n")
    bad = {PUBLISHED_PREFIX + k: v for k, v in MGG(16, 2).state_dict().items()}
    bad[PUBLISHED_PREFIX + "b1"] = torch.zeros(2, 1, 4)
    torch.save({"model_state_dict": bad}, tmp_path / "badmgg.pt")
    torch.save(tuple(torch.ones(2, 1152)), tmp_path / "half_info.pt")  # (std, mean) of 1152 values each
    out = tmp_path / "out"
    command = MODELS[model] + " --data {data} --out {out} --method tent " + extra + " " + FAST
    code, _, err = cli(capsys, command, w=world, t=tmp_path, data=data_root, out=out)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()  # nothing written


def test_out_of_memory_names_the_flag(capsys, world, tmp_path, monkeypatch):
    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mgg_fast.evaluation.protocol.Runner, "__call__", oom)
    out = tmp_path / "out"
    code, _, err = cli(
        capsys, VIT_RUN + " --data {w}/folder --method tent --out {out} " + FAST, w=world, out=out
    )
    assert_one_line_error(code, err, "out of memory", "Tried to allocate 2.00 GiB", "lower --batch-size")
    assert not (out / "runs" / "tent").exists()  # no half-written result


def test_pretrained_offline_is_one_line(capsys, world, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = cli(
        capsys,
        "stats --model resnet18 --pretrained --data {w}/folder --output {t}/s.pt " + FAST,
        w=world,
        t=tmp_path,
    )
    assert_one_line_error(code, err, "--pretrained could not download the weights of resnet18", "offline")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize(("n", "sizes"), [(9, [4, 5]), (8, [4, 4]), (1, [1]), (6, [4, 2])])
def test_batches_never_end_with_a_single_image(n, sizes):
    from mgg_fast.evaluation.images import batch_indices

    batches = batch_indices(n, 4, seed=0)
    assert [len(b) for b in batches] == sizes
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert batches == batch_indices(n, 4, seed=0) and (n < 4 or batches != batch_indices(n, 4, seed=1))


def test_a_folder_with_other_results_is_refused(capsys, world, tmp_path):
    (tmp_path / "results.json").write_text("{}")  # e.g. the demo's reports
    code, _, err = cli(
        capsys, VIT_RUN + " --data {w}/folder --method tent --out {t} " + FAST, w=world, t=tmp_path
    )
    assert_one_line_error(code, err, "holds other results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
