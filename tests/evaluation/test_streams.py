"""The stream builders of the regimes: long (re-corrupted) streams, the label-shifted order, the
mixed-domain stream, and validation streams as long as the test streams."""

import numpy as np
import pytest
import torch

pytest.importorskip("imagecorruptions")

from mgg_fast.evaluation.bundled.config import BenchmarkConfig
from mgg_fast.evaluation.bundled.data import corrupted_split, mnist_split
from mgg_fast.evaluation.images import ImageSet
from mgg_fast.evaluation.streams import label_shift_order, make_batches, mixed, reordered


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MGG_FAST_CACHE", str(tmp_path / "cache"))


def test_a_long_stream_repeats_the_split_with_new_noise():
    split = len(mnist_split("val"))
    long = corrupted_split("val", "gaussian_noise", 5, split + 10)
    assert len(long) == split + 10
    assert (long.labels[split:] == long.labels[:10]).all()  # the same digits again...
    assert not np.array_equal(long.images[split:], long.images[:10])  # ...under new noise
    clean = mnist_split("val", split + 10)
    assert np.array_equal(clean.images[split:], clean.images[:10])


def test_label_shift_order_is_a_permutation_in_runs_of_one_class():
    labels = np.repeat(np.arange(10), 12)
    order = label_shift_order(labels, run=4, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))
    shifted = labels[order]
    runs = [shifted[i : i + 4] for i in range(0, len(shifted), 4)]
    assert all(len(set(r.tolist())) == 1 for r in runs)  # 12 per class: whole runs of 4
    batches = [set(shifted[i : i + 8].tolist()) for i in range(0, len(shifted), 8)]
    assert max(len(b) for b in batches) <= 2 < 10  # a batch of 8 sees at most 2 classes, not 10
    assert not np.array_equal(label_shift_order(labels, 4, 1), order)  # seeded


def test_mixed_stream_holds_every_image_once():
    sets = [ImageSet(np.full((6, 2, 2, 3), k, np.uint8), np.arange(6), str(k)) for k in range(3)]
    mix = mixed(sets, seed=0)
    assert len(mix) == 18 and sorted(mix.images[:, 0, 0, 0].tolist()) == sorted([0, 1, 2] * 6)
    assert mix.images[:6, 0, 0, 0].tolist() != [0] * 6  # shuffled together
    batches = make_batches(
        reordered(mix, np.arange(18)[::-1]), 4, "cpu", lambda a: torch.from_numpy(a).float()
    )
    assert [len(x) for x, _ in batches] == [4, 4, 4, 4, 2]


def test_validation_streams_default_to_the_test_streams_length():
    """Defect: learning rates were tuned on 128 validation images per corruption (one or two
    updates at batch 64) whatever the test streams were."""
    assert BenchmarkConfig(n_test=300).tune_images() == 300
    assert BenchmarkConfig(n_test=300, n_tune=40).tune_images() == 40
    assert BenchmarkConfig.regime("long").tune_images() == BenchmarkConfig.regime("long").n_test
