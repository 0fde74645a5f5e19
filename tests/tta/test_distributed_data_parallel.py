"""Data-parallel MGTTA and meta-training on 2 gloo processes (127.0.0.1): each rank takes its
half of every batch; the result must be what one process gets on the whole batches.

One pair of spawned processes runs every scenario (a process start costs seconds); each rank
computes the single-process run itself (no communication) and saves both for the tests below.
"""

import pytest
import torch
from helpers import F32, F32_METAGRAD, random_mgg
from torch import nn
from torch.testing import assert_close

from mgg_fast import MGTTA, fit_source_stats, train_mgg
from mgg_fast.testing import run_local_processes
from mgg_fast.tta.meta_training import MetaTrainer

WORLD, HALF = 2, 4


def tiny_cnn() -> nn.Module:
    """GroupNorm only (per-sample statistics), pooled 4-D stage features for the FOA loss."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.GroupNorm(2, 6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def whole_batch(step: int) -> torch.Tensor:
    return torch.randn(WORLD * HALF, 3, 8, 8, generator=torch.Generator().manual_seed(step))


def part(step: int, rank: int) -> torch.Tensor:
    return whole_batch(step)[rank * HALF : (rank + 1) * HALF]


def source_stats():
    source = 3 * torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(99)) + 2
    return fit_source_stats(tiny_cnn(), [source])  # far from the test batches: the FOA term matters


def adapter(data_parallel: bool, optimizer: str = "mgg", loss: str = "foa", whole: bool = False) -> MGTTA:
    return MGTTA(
        tiny_cnn(),
        optimizer,
        mgg=random_mgg(seed=3) if optimizer == "mgg" else None,
        lr=0.05,
        loss=loss,
        source_stats=source_stats() if loss == "foa" else None,
        backend="reference",
        data_parallel=data_parallel,
        whole_batches=whole,
    )


def adapted(a: MGTTA) -> list[torch.Tensor]:
    return [p.detach().clone() for g in a.optimizer.param_groups for p in g["params"]]


def _mgtta_scenario(rank) -> dict:
    single, dp = adapter(False), adapter(True)
    initial = adapted(dp)
    for s in range(3):
        single(whole_batch(s))
        dp(part(s, rank))
    out = {"single": adapted(single), "dp": adapted(dp), "initial": initial}
    dp.reset()
    out["after_reset"] = adapted(dp)
    single.reset()
    single(whole_batch(5))
    dp(part(5, rank))
    out["single_after_reset"], out["dp_after_reset"] = adapted(single), adapted(dp)
    try:
        dp(part(6, rank)[: 3 + rank])  # 3 samples on rank 0, 4 on rank 1
        out["uneven"] = None
    except ValueError as err:
        out["uneven"] = str(err)
    out["uneven/unchanged"] = all(map(torch.equal, out["dp_after_reset"], adapted(dp)))
    return out


# whole batches of every size: even, uneven over the 2 ranks (5 = 3 + 2), fewer than the ranks
WHOLE_SIZES = {"foa": (8, 5, 3), "entropy": (8, 5, 1)}


def _whole_batch_scenario() -> dict:
    """Tent, Adam and MGG with ``whole_batches``: every rank passes the whole batch."""
    out = {}
    for optimizer in ("sgd", "adam", "mgg"):
        for loss, sizes in WHOLE_SIZES.items():
            single, dp = adapter(False, optimizer, loss), adapter(True, optimizer, loss, whole=True)
            batches = [whole_batch(s)[:n] for s, n in enumerate(sizes)]
            out[optimizer, loss] = {
                "single_logits": [single(x) for x in batches],
                "dp_logits": [dp(x) for x in batches],
                "single": adapted(single),
                "dp": adapted(dp),
            }
    try:  # one image for the FOA batch std: the same error on every rank, no rank left waiting
        adapter(True, "sgd", "foa", whole=True)(whole_batch(0)[:1])
        out["foa/one image"] = None
    except ValueError as err:
        out["foa/one image"] = str(err)
    return out


def _meta_scenario(rank) -> dict:
    stats = source_stats()

    def train(batches, data_parallel):
        mgg = random_mgg(seed=3)
        return train_mgg(
            tiny_cnn(),
            batches,
            mgg=mgg,
            mgg_lr=1e-2,
            adapt_lr=0.05,
            loss="foa",
            source_stats=stats,
            progress=False,
            data_parallel=data_parallel,
        )

    def meta_grads(data_parallel):
        kw = {"mgg_lr": 1e-2, "adapt_lr": 0.05, "loss": "foa", "source_stats": stats}
        with MetaTrainer(tiny_cnn(), random_mgg(seed=3), data_parallel=data_parallel, **kw) as trainer:
            batches = [part(s, rank) if data_parallel else whole_batch(s) for s in range(3)]
            return [trainer.step(x)["mgg_grads"] for x in batches]

    single = train([whole_batch(s) for s in range(3)], False)
    dp = train([part(s, rank) for s in range(3)], True)
    untrained = random_mgg(seed=3)
    return {
        "single_grads": meta_grads(False),
        "dp_grads": meta_grads(True),
        "single": {k: v.detach() for k, v in single.state_dict().items()},
        "dp": {k: v.detach() for k, v in dp.state_dict().items()},
        "untrained": {k: v.detach() for k, v in untrained.state_dict().items()},
    }


def _worker(rank, _world_size, _out):
    return {"mgtta": _mgtta_scenario(rank), "whole": _whole_batch_scenario(), "meta": _meta_scenario(rank)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_local_processes(_worker, tmp_path_factory.mktemp("data_parallel"), nprocs=WORLD)


def test_data_parallel_mgtta_matches_one_process_on_the_whole_batch(results):
    for r in results:
        m = r["mgtta"]
        for a, b, c in zip(m["dp"], m["single"], m["initial"], strict=True):
            assert_close(a, b, **F32)
            assert not torch.equal(a, c)  # it adapted
    for a, b in zip(results[0]["mgtta"]["dp"], results[1]["mgtta"]["dp"], strict=True):
        assert torch.equal(a, b)  # the same on every rank


def test_data_parallel_mgtta_reset_and_uneven_batches(results):
    for r in results:
        m = r["mgtta"]
        assert all(map(torch.equal, m["after_reset"], m["initial"]))
        for a, b in zip(m["dp_after_reset"], m["single_after_reset"], strict=True):
            assert_close(a, b, **F32)
        assert m["uneven"].startswith(
            "data-parallel batches must have the same size on every rank, got [3, 4]"
        )
        assert m["uneven/unchanged"]


def test_whole_batches_tent_adam_mgg_match_one_process_for_any_batch_size(results):
    for r in results:
        for key in [(o, loss) for o in ("sgd", "adam", "mgg") for loss in WHOLE_SIZES]:
            w = r["whole"][key]
            for dp, single in zip(w["dp_logits"], w["single_logits"], strict=True):
                assert dp.shape == single.shape  # the whole batch's logits, gathered
                assert_close(dp, single, **F32, msg=str(key))
            for a, b in zip(w["dp"], w["single"], strict=True):
                assert_close(a, b, **F32, msg=str(key))
        assert r["whole"]["foa/one image"].startswith("loss='foa' needs batches of at least 2 samples")
    for key, w in results[0]["whole"].items():
        if isinstance(w, dict):
            assert all(map(torch.equal, w["dp"], results[1]["whole"][key]["dp"])), key  # same on every rank


def test_whole_batches_needs_data_parallel():
    with pytest.raises(ValueError, match="whole_batches=True is a setting of data_parallel=True"):
        adapter(False, whole=True)


def test_data_parallel_meta_training_matches_one_process_on_the_union(results):
    for r in results:
        m = r["meta"]
        for k, v in m["single"].items():
            assert_close(m["dp"][k], v, **F32_METAGRAD, msg=k)
        assert any(not torch.equal(v, m["untrained"][k]) for k, v in m["single"].items())  # it trained
        for step, (dp, single) in enumerate(zip(m["dp_grads"], m["single_grads"], strict=True)):
            assert dp.keys() == single.keys()
            assert (step == 0) == all(g is None for g in single.values())  # step 1: no MGG output yet
            for k, g in single.items():
                assert (g is None) == (dp[k] is None), (step, k)
                if g is not None:
                    assert_close(dp[k], g, **F32_METAGRAD, msg=f"{step} {k}")
    for k, v in results[0]["meta"]["dp"].items():
        assert torch.equal(v, results[1]["meta"]["dp"][k]), k


def _benchmark_worker(rank, _world_size, out):
    """The bundled benchmark (``adapt --data bundled``) data-parallel, then in one process; the
    logits of every batch any runner predicted (tuning and evaluation) are recorded."""
    import mgg_fast.evaluation.bundled.benchmark as shift_benchmark
    from mgg_fast.evaluation.protocol import Runner

    cfg = shift_benchmark.BenchmarkConfig(
        methods=("noadapt", "tent", "adam", "sar", "eata", "mgg"),
        archs=("vit",),  # LayerNorm: a rank's part is normalised as in the whole batch
        corruptions=("gaussian_noise",),
        val_corruptions=("saturate",),
        n_test=11,  # batches of 4, 4, 3: the last one splits 2 + 1
        n_tune=4,
        batch_size=4,
        n_stats=16,
        lr_grid={
            "tent": (1e-3, 1.0),
            "adam": (1e-3, 2.5e-2),
            "mgg": (2.5e-2,),
            "sar": (1e-3,),
            "eata": (1e-3,),
        },
        source_epochs=1,
        n_train=32,
        backend="reference",
    )
    predict = Runner.__call__
    runs = {}
    for data_parallel in (True, False):  # the second run reads the cache that rank 0 wrote
        logits = []

        def recording(runner, x, y=None, logits=logits):
            out = predict(runner, x, y)
            logits.append(out)
            return out

        Runner.__call__ = recording
        try:
            result = shift_benchmark.run_benchmark(
                cfg,
                cache_dir=out / "cache",
                mgg=random_mgg(seed=3),
                progress=False,
                data_parallel=data_parallel,
            )
        finally:
            Runner.__call__ = predict
        methods = result["archs"]["vit"]["seeds"][0]["methods"]
        runs[data_parallel] = {
            "logits": logits,
            "methods": {
                m: {s: (r["lr"][s], r[s]["per_corruption"]) for s in ("episodic", "continual")}
                for m, r in methods.items()
            },
        }
    return runs


def test_bundled_benchmark_data_parallel_matches_one_process(tmp_path):
    for runs in run_local_processes(_benchmark_worker, tmp_path, nprocs=WORLD):
        assert runs[True]["methods"] == runs[False]["methods"]
        assert list(runs[True]["methods"]) == ["noadapt", "tent", "adam", "sar", "eata", "mgg"]
        assert len(runs[True]["logits"]) == len(runs[False]["logits"]) > 30
        for dp, single in zip(runs[True]["logits"], runs[False]["logits"], strict=True):
            assert_close(dp, single, **F32)
    assert list((tmp_path / "cache").rglob("*.tmp")) == []
