"""The plot of accuracy against updates (rendered with matplotlib's Agg backend and inspected) and
the acc@k curve it draws."""

import pytest

pytest.importorskip("matplotlib")

from mgg_fast.evaluation.protocol import summarize
from mgg_fast.evaluation.report import plot_curves

METHODS = ("NoAdapt", "Tent (SGD)", "Adam", "MGG")


@pytest.fixture
def draw(tmp_path, monkeypatch):
    """``draw(panels, title)``: the figure plot_curves drew (kept open) after it wrote the PNG."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)

    def run(panels, title="title"):
        path = tmp_path / f"plot{len(figures)}.png"
        assert plot_curves(panels, path, title)
        assert path.read_bytes()[:4] == b"\x89PNG"
        figure = figures[-1]
        figure.canvas.draw()  # lay out: the extents below are the PNG's
        return figure

    return run


def curves(length, half=None):
    return {name: ([0.1 * (i + 1)] * length, half) for i, name in enumerate(METHODS)}


def test_ticks_are_whole_updates_and_the_axis_spans_the_points(draw):
    for length in (1, 2, 3, 12):
        (ax,) = draw({"panel": curves(length)}).axes
        assert ax.get_xlim() == (-0.5, length - 0.5)  # one point: -0.5..0.5, not -0.04..0.04
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_every_method_has_its_own_marker_and_line_style(draw):
    """Equal curves lie on each other: each method must still be told apart, and the marker of
    one must not hide another's (hollow markers of different sizes)."""
    same = {name: ([0.5, 0.6, 0.7], None) for name in METHODS}
    (ax,) = draw({"panel": same}).axes
    lines = ax.get_lines()
    styles = [(line.get_marker(), line.get_linestyle()) for line in lines]
    assert len(styles) == len(METHODS) and len(set(styles)) == len(styles)
    assert all(line.get_fillstyle() == "none" for line in lines)
    assert len({line.get_markersize() for line in lines}) == len(METHODS)


def test_the_legend_sits_below_the_axes(draw):
    figure = draw({"vit": curves(3), "resnet": curves(3)})
    (legend,) = figure.legends
    box = legend.get_window_extent()
    for ax in figure.axes:
        assert box.y1 <= ax.get_window_extent().y0, "the legend covers a panel"
    assert [t.get_text() for t in legend.get_texts()] == list(METHODS)


def test_the_title_mentions_bands_only_when_there_are_bands(draw):
    one_seed = draw({"panel": curves(3)}, "one seed")
    assert "bands" not in one_seed._suptitle.get_text()
    assert not one_seed.axes[0].collections  # nothing filled
    seeds = draw({"panel": curves(3, half=[0.01, 0.02, 0.03])}, "three seeds")
    assert "bands: 95% CI over seeds" in seeds._suptitle.get_text()
    assert len(seeds.axes[0].collections) == len(METHODS)


def test_a_panel_without_a_point_says_so(draw):
    (ax,) = draw({"panel": curves(0)}).axes
    assert not ax.get_lines()
    assert any("no batch of the full size" in text.get_text() for text in ax.texts)
    assert ax.get_ylim() == (0, 100)  # percent, as its label says


def test_a_short_batch_inside_a_stream_does_not_cut_the_curve():
    """A batch that lost an unreadable image still counts; a stream's short last batch does not,
    nor does a stream smaller than one batch; a last batch that took in a lone image counts."""
    counts = {
        "lost-one": [(2, 4), (1, 3), (4, 4), (1, 2)],  # batch 1 lost an image; a short rest
        "merged-rest": [(3, 4), (2, 4), (5, 5)],  # the last batch took in a lone image
        "small": [(1, 3)],  # smaller than one batch
    }
    result = summarize(counts, batch_size=4)
    assert result["curve"] == pytest.approx([(0.5 + 0.75) / 2, (1 / 3 + 0.5) / 2, (1.0 + 1.0) / 2])
    assert summarize({"small": [(1, 3)]}, batch_size=4)["curve"] == []


def test_the_lr_column_names_every_setting_in_words():
    """Regression: the mixed setting's lrs were headed ``mixe.`` (every name cut to 4 letters)."""
    from mgg_fast.evaluation.report import summary_header

    run = {"episodic": {}, "continual": {}, "mixed": {}}
    assert summary_header({"methods": {"tent": run}})[1] == "lr epis. / cont. / mixed"
