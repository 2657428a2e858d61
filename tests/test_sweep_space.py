"""Search-space files: parsed, applied to trial configs, and refused before any trial starts."""

from pathlib import Path

import pytest

from jobs.sweep_space import parse_space, yaml_value
from jobs.tune import _concurrency, _tune_space, _wait_for_resources
from psm_model.config import ConfigError
from psm_model.config_yaml import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def base():
    return load_config(CONFIGS / "tiny.yaml")


def test_demo_space_builds_every_grid_point():
    base = load_config(CONFIGS / "demo.yaml")
    space = parse_space((CONFIGS / "sweeps" / "demo.yaml").read_text(), base, "demo.yaml")
    assert space.swept_keys() == ["model.widths", "data.sigma"]
    tune_space = _tune_space(space)
    # lists travel as YAML text (Optuna takes scalars only) and come back as the config's tuple
    widths = tune_space["model.widths"]["grid_search"]
    assert widths == ["[16, 32, 48, 64]", "[24, 48, 72, 96]"]
    cfg = space.trial_config(base, {"model.widths": widths[1], "data.sigma": 2.5})
    assert cfg.model.branch_widths == (24, 48, 72, 96)
    assert cfg.data.sigma == 2.5
    assert cfg.train.epochs == 4 and cfg.train.num_workers == 1  # the space's overrides


def test_sigma_in_input_pixels_is_divided_by_each_trials_stride(base):
    text = """
searcher: grid
sigma_units: input
params:
  model.heatmap_stride: {grid: [2, 4]}
  data.sigma: {grid: [8.0]}
"""
    space = parse_space(text, base)
    s2 = space.trial_config(base, {"model.heatmap_stride": 2, "data.sigma": 8.0})
    s4 = space.trial_config(base, {"model.heatmap_stride": 4, "data.sigma": 8.0})
    assert (s2.data.sigma, s4.data.sigma) == (4.0, 2.0)  # the same 8-pixel spread in the crop


def test_ranges_and_samplers_map_to_tune(base):
    text = """
searcher: random
num_samples: 3
params:
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
  data.sigma: {uniform: [1.5, 3.0]}
  train.batch_size: {randint: [8, 16]}
  model.fusion: {choice: [hrnet, psm]}
"""
    space = parse_space(text, base)
    tune_space = _tune_space(space)
    assert tune_space["train.batch_size"].upper == 17  # both ends included
    assert tune_space["train.lr"].lower == 1e-4
    cfg = space.trial_config(base, {"train.lr": 3e-4, "model.fusion": "hrnet"})
    assert cfg.train.lr == 3e-4 and cfg.model.fusion == "hrnet"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params: {data.sigmaa: {grid: [2.0]}}", "params.data.sigmaa: value 2.0: .*unknown key"),
        ("params: {data.sigma: {grid: [2.0, -1.0]}}", "value -1.0: .*sigma: must be positive"),
        ("searcher: random\nparams: {data.sigma: {uniform: [-1.0, 2.0]}}", "-1.0: .*sigma: must"),
        ("params: {model.width: {grid: [16, 16.5]}}", "value 16.5: .*model.width: expected an int"),
        ("params: {model.width: {grid: [0, 16]}}", r"value 0: .*width\(s\): must be positive"),
        ("params: {model.widths: {grid: [[16, 32, 64]]}}", "expected 4 branch widths"),
        ("params: {model.input_size: {grid: [[100, 64]]}}", "multiples of 32"),
        ("params: {data.sigma: {gird: [2.0]}}", "'gird' is not one of"),
        ("params: {data.sigma: {choice: [2.0]}}", "searcher grid takes only grid"),
        ("searcher: optuna\nparams: {data.sigma: {grid: [2.0]}}", "use choice"),
        ("params: {train.lr: {loguniform: [0, 1]}}", "low must be positive"),
        ("params: {train.lr: {uniform: [3, 1]}}", "low 3 must be below high 1"),
        ("params: {train.name: {grid: [a]}}", "set by the sweep itself"),
        ("sercher: grid\nparams: {data.sigma: {grid: [2.0]}}", "sercher: unknown key"),
        ("params: {}", "params: expected a mapping"),
        ("asha: {grace_period: 6}\nparams: {data.sigma: {grid: [2.0]}}", "below train.epochs"),
        ("overrides: {train.epochs: -1}\nparams: {data.sigma: {grid: [2.0]}}", "overrides: "),
        ("params: [1, 2", "not valid YAML"),
    ],
)
def test_invalid_spaces_are_errors_naming_the_file_and_key(base, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_space(text, base, "space.yaml")
    assert str(err.value).startswith("space.yaml: ")


def test_sweeping_width_while_widths_are_fixed_is_an_error():
    base = load_config(CONFIGS / "demo.yaml")  # sets model.widths explicitly
    with pytest.raises(ConfigError, match="model.width: has no effect while model.widths"):
        parse_space("params: {model.width: {grid: [16, 32]}}", base, "s.yaml")
    # with the explicit widths cleared, the base width applies
    space = parse_space(
        "overrides: {model.widths: null}\nparams: {model.width: {grid: [16, 32]}}", base, "s.yaml"
    )
    cfg = space.trial_config(base, {"model.width": 32})
    assert cfg.model.branch_widths == (32, 64, 128, 256)


def test_concurrency_counts_driver_workers_and_a_data_task(base):
    space = parse_space(
        "overrides: {train.num_workers: 1, train.cpus_per_worker: 0.5, data.cpus_per_task: 0.4}\n"
        "params: {data.sigma: {grid: [2.0]}}",
        base,
    )
    cfg = space.trial_config(base, {"data.sigma": 2.0})
    assert _concurrency([cfg], {"CPU": 2.0}, 0) == 2  # 0.1 + 0.5 + 0.4 per trial
    assert _concurrency([cfg], {"CPU": 1.9}, 0) == 1
    with pytest.raises(ConfigError, match="a trial needs 1 CPUs"):
        _concurrency([cfg], {"CPU": 0.5}, 0)


def test_yaml_values_round_trip_as_override_text():
    assert yaml_value([16, 32, 48, 64]) == "[16, 32, 48, 64]"
    assert yaml_value(None) == "null"
    assert yaml_value(1.5) == "1.5"
    assert yaml_value(True) == "true"


def test_optuna_searcher_suggests_values_from_the_space(base):
    text = """
searcher: optuna
num_samples: 4
params:
  model.widths: {choice: [[8, 16, 32, 64], [16, 32, 64, 128]]}
  data.sigma: {uniform: [1.5, 3.0]}
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
"""
    from jobs.tune import _searcher

    space = parse_space(text, base)
    searcher = _searcher(space)
    assert searcher.set_search_properties("val_AP", "max", _tune_space(space))
    for i in range(3):
        suggested = searcher.suggest(f"t{i}")
        cfg = space.trial_config(base, suggested)  # every suggestion is a valid config
        assert cfg.model.branch_widths in ((8, 16, 32, 64), (16, 32, 64, 128))
        assert 1.5 <= cfg.data.sigma <= 3.0 and 1e-4 <= cfg.train.lr <= 1e-2


def test_the_gpu_space_resolves_sigma_per_stride():
    base = load_config(CONFIGS / "psm_w32_256x192.yaml")
    space = parse_space((CONFIGS / "sweeps" / "widths_sigma.yaml").read_text(), base, "ws.yaml")
    cfg = space.trial_config(base, {"model.width": 48, "data.sigma": 8.0})
    assert cfg.model.branch_widths == (48, 96, 192, 384) and cfg.model.heatmap_stride == 2
    assert cfg.data.sigma == 4.0 and cfg.train.use_gpu
    need = 0.1 + 2 * 4 + 1  # driver + 2 workers x 4 CPUs + a data task
    assert _concurrency([cfg], {"CPU": 64.0, "GPU": 8.0}, 0) == min(int(64 // need), 8 // 2)


def test_a_sweep_waits_for_the_autoscaler_to_add_gpu_nodes():
    base = load_config(CONFIGS / "psm_w32_256x192.yaml")
    space = parse_space((CONFIGS / "sweeps" / "widths_sigma.yaml").read_text(), base, "ws.yaml")
    cfg = space.trial_config(base, {"model.width": 48, "data.sigma": 8.0})
    # a fresh autoscaling cluster: the CPU head alone, then a GPU node joins
    seen = iter([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 98.0, "GPU": 8.0}])
    asked = []
    have = _wait_for_resources(
        [cfg],
        60,
        resources=lambda: next(seen),
        request=lambda bundles: asked.append(bundles),
        poll_s=0.01,
        trials=2,
    )
    assert have == {"CPU": 98.0, "GPU": 8.0}
    # two trials' bundles (max_concurrent_trials 2): each 2 GPU workers of 4 CPUs, and its
    # driver + data task; then withdrawn
    trial = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}, {"CPU": 1.1}]
    assert asked == [trial + trial, []]
    assert _concurrency([cfg], have, 0) == 4


def test_a_sweep_that_never_fits_fails_after_waiting(caplog):
    base = load_config(CONFIGS / "psm_w32_256x192.yaml")
    space = parse_space((CONFIGS / "sweeps" / "widths_sigma.yaml").read_text(), base, "ws.yaml")
    cfg = space.trial_config(base, {"model.width": 48, "data.sigma": 8.0})
    have = _wait_for_resources(
        [cfg], 0.05, resources=lambda: {"CPU": 2.0}, request=lambda bundles: None, poll_s=0.01
    )
    assert "no trial fits after waiting" in caplog.text
    with pytest.raises(ConfigError, match="a trial needs 9.1 CPUs and 2 GPUs"):
        _concurrency([cfg], have, 0)
