from pathlib import Path

import pytest

from psm_model.config import Config, ConfigError
from psm_model.config_yaml import flag_overrides, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_derived_values():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.branch_widths == (32, 64, 128, 256)
    assert cfg.model.heatmap_size == (192, 144)  # 384x288 at stride 2


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.input_size[0] % 32 == 0


def test_shipped_paper_configs():
    psm = load_config(CONFIGS / "psm_w48_384x288.yaml").model
    assert (psm.fusion, psm.heatmap_stride, psm.branch_widths) == ("psm", 2, (48, 96, 192, 384))
    assert psm.heatmap_size == (192, 144)
    hr = load_config(CONFIGS / "hrnet_w32_256x192.yaml").model
    assert (hr.fusion, hr.heatmap_stride, hr.heatmap_size) == ("hrnet", 4, (64, 48))


def test_overrides_are_typed():
    cfg = load_config(
        CONFIGS / "hrnet_w32_256x192.yaml",
        ["train.lr=5e-4", "model.fusion=psm", "model.widths=[16,32,48,64]", "train.lr_steps=[3]"],
    )
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)  # "5e-4" is a string to PyYAML
    assert cfg.model.fusion == "psm"
    assert cfg.model.branch_widths == (16, 32, 48, 64)
    assert cfg.train.lr_steps == (3,)
    assert cfg.model.input_size == (256, 192)  # untouched values come from the file


def test_int_given_for_float_is_accepted():
    assert load_config(None, ["data.sigma=3"]).data.sigma == 3.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model:\n  widht: 32\n", "model.widht: unknown key"),
        ("modle:\n  width: 32\n", "modle: unknown section"),
        ("model:\n  width: wide\n", "model.width: expected an integer, got 'wide'"),
        ("model:\n  width: 32.5\n", "model.width: expected an integer"),
        ("model:\n  fusion: pms\n", "model.fusion: 'pms' is not one of ('hrnet', 'psm')"),
        ("model:\n  heatmap_stride: 3\n", "model.heatmap_stride: 3 is not one of (2, 4)"),
        (
            "model:\n  input_size: [250, 192]\n",
            "model.input_size: (250, 192) must be positive multiples of 32",
        ),
        ("model:\n  input_size: [256]\n", "model.input_size: expected 2 values, got 1"),
        ("model:\n  widths: [8, 16]\n", "model.widths: expected 4 branch widths, got 2"),
        ("data:\n  sigma: -1\n", "data.sigma: must be positive"),
        ("data:\n  channels_last: yes please\n", "data.channels_last: expected true or false"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("model: [1, 2]\n", "model: expected a mapping"),
        ("model: {width: 32\n", "not valid YAML"),
    ],
)
def test_bad_files_name_file_and_key(tmp_path, text, expected):
    _refused_naming_file_and_key(tmp_path, text, expected)


def _refused_naming_file_and_key(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr", "expected section.key=value"),
        ("lr=1", "expected section.key=value"),
        ("train.learning_rate=1", "train.learning_rate: unknown key"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ],
)
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    "text, expected",
    [
        # NaN passes `x <= 0`: every one of these was accepted before
        ("train:\n  lr: .nan\n", "train.lr: must be a finite number, got nan"),
        ("data:\n  sigma: .inf\n", "data.sigma: must be a finite number, got inf"),
        ("eval:\n  oks_nms_threshold: .nan\n", "eval.oks_nms_threshold: must be a finite number"),
        ("eval:\n  oks_nms_threshold: 1.5\n", "eval.oks_nms_threshold: must be within [0.0, 1.0]"),
        ("data:\n  box_padding: -1\n", "data.box_padding: must be positive, got -1.0"),
        ("data:\n  max_image_pixels: -5\n", "data.max_image_pixels: must be positive, got -5"),
        ("data:\n  rotation: -10\n", "data.rotation: must be within [0.0, 180.0]"),
        ("train:\n  keep_checkpoints: 0\n", "train.keep_checkpoints: must be positive, got 0"),
        ("train:\n  grad_clip: -1\n", "train.grad_clip: must be >= 0"),
        ("train:\n  lr_factor: 0\n", "train.lr_factor: must be positive"),
        ("train:\n  val_every: -1\n", "train.val_every: must be >= 0"),
        ("train:\n  lr_steps: [-3]\n", "train.lr_steps: epochs must be >= 0"),
        ("train:\n  nonfinite_loss: ignore\n", "train.nonfinite_loss: 'ignore' is not one of"),
        ("infer:\n  part_images: 0\n", "infer.part_images: must be positive"),
        ("data:\n  cpus_per_task: 0\n", "data.cpus_per_task: must be positive"),
        ("data:\n  chunk_images: 0\n", "data.chunk_images: must be positive"),
        # a run name is one folder under train.storage_path, nothing that climbs out of it
        ("train:\n  name: ../../escaped\n", "train.name: '../../escaped' must be one folder"),
        ("train:\n  name: a/b\n", "train.name: 'a/b' must be one folder"),
        ("train:\n  name: .hidden\n", "train.name: '.hidden' must be one folder"),
        ('train:\n  name: "it\'s"\n', 'train.name: "it\'s" must be one folder'),
        # the data side reads COCO's 17 keypoints: another head size is refused up front
        ("model:\n  num_joints: 5\n", "model.num_joints: 5, but the data (COCO person keypoints)"),
    ],
)
def test_out_of_range_values_name_file_and_key(tmp_path, text, expected):
    _refused_naming_file_and_key(tmp_path, text, expected)


def test_a_run_name_of_one_folder_is_accepted():
    assert load_config(None, ["train.name=psm-w32_lr=1e-3.v2"]).train.name == "psm-w32_lr=1e-3.v2"


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=inf", "data.sigma=-inf"])
def test_non_finite_overrides_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config("nope.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "psm_w48_384x288.yaml", ["train.amp=bf16"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.flat()["model.width"] == 48 and cfg.flat()["train.amp"] == "bf16"


def test_a_nested_section_reads_from_yaml_and_overrides_and_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("infer:\n  boxes: detector\n  detector:\n    model: a.onnx\n    nms_iou: 0.5\n")
    cfg = load_config(path, ["infer.detector.model=b.onnx", "infer.detector.mean=[1, 2, 3]"])
    det = cfg.infer.detector
    assert (det.model, det.nms_iou, det.mean, det.std) == ("b.onnx", 0.5, (1.0, 2.0, 3.0), None)
    assert cfg.flat()["infer.detector.model"] == "b.onnx"
    (tmp_path / "again.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("infer.detector.nms=1", "infer.detector.nms: unknown key"),
        ("infer.detector.nms_iou=0", "infer.detector.score_threshold, nms_iou: need"),
        ("infer.detector=x", "infer.detector: expected a mapping, got 'x'"),
        ("infer.boxes=yolo", "infer.boxes: 'yolo' is not one of"),
        ("eval.pose_runtime=tensorrt", "eval.pose_runtime: 'tensorrt' is not one of"),
    ],
)
def test_bad_nested_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_moved_data_pipeline_keys_still_load_with_a_warning_naming_the_new_key(tmp_path, caplog):
    # configs (and checkpoints' config.yaml) written before the Ray Data resources moved to data.*
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  data_cpus: 0.5\n  data_chunk_images: 64\n  channels_last: true\n")
    with caplog.at_level("WARNING", logger="psm_model.config_yaml"):
        cfg = load_config(path, ["train.data_cpus=0.25"])
    assert (cfg.data.cpus_per_task, cfg.data.chunk_images, cfg.data.channels_last) == (
        0.25,
        64,
        True,
    )
    for old, new in (
        ("train.data_cpus", "data.cpus_per_task"),
        ("train.data_chunk_images", "data.chunk_images"),
        ("train.channels_last", "data.channels_last"),
    ):
        assert f"{old} is now {new}" in caplog.text
    assert cfg == parse_config(cfg.to_yaml())  # saved with the new keys only
    assert "data_cpus" not in cfg.to_yaml()


def test_a_moved_key_given_with_its_new_key_is_refused():
    with pytest.raises(
        ConfigError, match="train.data_cpus: moved to data.cpus_per_task, which is set"
    ):
        load_config(None, ["data.cpus_per_task=1", "train.data_cpus=2"])


def test_cli_flags_are_aliases_of_one_key_per_job():
    assert flag_overrides("eval", dets="d.json") == ['eval.detections="d.json"']
    assert flag_overrides("infer", dets="d.json", output=None) == [
        "infer.boxes=file",
        'infer.detections="d.json"',
    ]
    assert flag_overrides("eval", dets=None) == []
    # flags come after the user's overrides and win; a path that YAML would read as a number or
    # cut at a comment stays the text given
    flags = flag_overrides("infer", dets="123", output="out #1.json")
    cfg = load_config(None, ["infer.boxes=gt", "infer.output=x.json", *flags])
    assert (cfg.infer.boxes, cfg.infer.detections, cfg.infer.output) == (
        "file",
        "123",
        "out #1.json",
    )
    assert load_config(None, flag_overrides("eval", dets="a.json")).eval.detections == "a.json"


def test_what_the_jobs_ask_of_a_key_is_said_on_its_field():
    """Which keys a resumed run may change and which a sweep sets per trial are tags on the
    fields (`tagged`), read back by `keys_tagged`; these are the lists they replaced."""
    from psm_model.config_fields import FREE_ON_RESUME, SWEEP_OWNED, keys_tagged

    assert keys_tagged(Config(), FREE_ON_RESUME) == {
        "train.max_failures",
        "train.keep_checkpoints",
        "train.cpus_per_worker",
        "data.cpus_per_task",
        "train.mlflow_uri",
        "train.registered_model",
        "train.nonfinite_loss",
        "train.max_skipped_steps",
        "train.resume_changes",
        "eval.workers",
        "eval.cpus_per_worker",
        "eval.batch_size",
        "eval.visualize",
    }
    assert keys_tagged(Config(), SWEEP_OWNED) == {
        "train.name",
        "train.storage_path",
        "train.mlflow_uri",
        "train.experiment",
        "train.registered_model",
        "train.val_every",
    }
    cfg = Config()  # a tag changes nothing else: the defaults are the plain values
    assert (cfg.train.max_failures, cfg.train.name, cfg.eval.visualize) == (2, "", 4)
