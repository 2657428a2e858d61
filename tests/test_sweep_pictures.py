"""jobs/sweep_pictures.py: trial labels, the heatmap's axes and cells, the pictures themselves."""

import math

import numpy as np
import pytest

from jobs import sweep_pictures as sp


def _row(run_id, widths, sigma, best, status="FINISHED", lr="0.001"):
    return {
        "run": run_id,
        "run_id": run_id,
        "status": status,
        "model.widths": widths,
        "data.sigma": sigma,
        "train.lr": lr,
        "best_AP": best,
    }


ROWS = [  # a 2x2 grid of widths x sigma (MLflow's text values), one trial stopped by ASHA
    _row("a", "[16, 32, 48, 64]", "1.5", 0.20),
    _row("b", "[16, 32, 48, 64]", "2.5", 0.10, status="KILLED (stopped early)"),
    _row("c", "[24, 48, 72, 96]", "1.5", 0.30),
    _row("d", "[24, 48, 72, 96]", "2.5", 0.25),
]


def test_a_trial_is_named_by_its_params_in_a_few_characters():
    assert sp.trial_label({"model.width": "48", "data.sigma": "2.5"}) == "w48 σ2.5"
    assert sp.trial_label({"model.widths": "[16, 32, 48, 64]"}) == "w16/32/48/64"
    assert sp.trial_label({"train.lr": 0.00123456, "train.batch_size": 8}) == (
        "lr 0.00123 batch_size=8"
    )


def test_the_heatmap_is_width_by_sigma_with_the_best_ap_of_each_cell():
    x, y = sp.heatmap_axes(ROWS, ["data.sigma", "model.widths", "train.lr"])
    assert (x, y) == ("model.widths", "data.sigma")
    xs, ys, grid, notes = sp.heatmap_grid(ROWS, x, y)
    assert xs == ["[16, 32, 48, 64]", "[24, 48, 72, 96]"] and ys == ["1.5", "2.5"]
    assert grid == [[0.20, 0.30], [0.10, 0.25]]
    assert notes == [["", ""], ["stopped", ""]]
    # two trials in one cell: the better one, counted
    xs, ys, grid, notes = sp.heatmap_grid([*ROWS, _row("e", "[24, 48, 72, 96]", "1.5", 0.4)], x, y)
    assert grid[0][1] == 0.4 and notes[0][1] == "best of 2"


def test_without_width_and_sigma_the_two_params_that_move_the_ap_most_are_the_axes():
    rows = [
        {"run_id": str(k), "a": str(a), "b": str(b), "c": "1", "best_AP": 0.1 * a + 0.01 * b}
        for k, (a, b) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)])
    ]
    assert sp.heatmap_axes(rows, ["b", "c", "a"]) == ("a", "b")
    assert sp.heatmap_axes(rows, ["b"]) == ("b", None)
    xs, ys, grid, _ = sp.heatmap_grid(rows, "b", None)
    assert ys == [""] and grid == [[pytest.approx(0.21), pytest.approx(0.22)]]  # best of each
    assert math.isnan(sp.heatmap_grid(rows[:1], "a", "b")[2][0][0]) is False


def test_the_pictures_are_drawn(tmp_path):
    curves = {"a": [(0, 0.1), (1, 0.2)], "b": [(0, 0.1)], "c": [(0, 0.2), (1, 0.3)], "d": []}
    written = sp.draw(ROWS, ["model.widths", "data.sigma"], curves, tmp_path)
    assert [p.name for p in written] == ["best_ap_heatmap.png", "val_ap_curves.png"]
    import matplotlib.image

    for path in written:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300 and np.ptp(image) > 0
