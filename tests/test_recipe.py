"""The specs the jobs build from the config once (psm_model/recipe.py): each reads its own keys,
the recipe's codec is the config's, and they travel to actors and replicas (pickle)."""

import pickle
import subprocess
import sys

from pipelines.coco import load_split
from pipelines.validate import val_records
from psm_model.codec import HeatmapCodec
from psm_model.config_yaml import load_config
from psm_model.recipe import CropSpec, EvalRecipe, PoseActors, Rescoring, ValSet

OVERRIDES = [
    "model.input_size=[128,96]",
    "model.heatmap_stride=4",
    "data.sigma=3.0",
    "data.box_padding=1.5",
    "data.max_image_pixels=1000000",
    "data.channels_last=true",
    "data.cpus_per_task=0.5",
    "data.chunk_images=7",
    "eval.flip_test=false",
    "eval.decode=dark",
    "eval.keypoint_score_threshold=0.3",
    "eval.oks_nms_threshold=0.8",
    "eval.box_score_threshold=0.1",
    "eval.batch_size=5",
    "eval.workers=3",
    "eval.cpus_per_worker=2.0",
    "eval.detections=dets.json",
    "eval.visualize=2",
]


def test_the_recipe_reads_each_key_of_the_config_and_pickles():
    cfg = load_config(None, OVERRIDES)
    recipe = EvalRecipe.of(cfg)
    assert recipe.model == cfg.model
    assert recipe.crop == CropSpec((128, 96), 1.5, 1_000_000) == CropSpec.of(cfg)
    assert recipe.codec == HeatmapCodec.from_config(cfg) == HeatmapCodec((32, 24), 4, 3.0)
    assert (recipe.flip_test, recipe.decode, recipe.channels_last) == (False, "dark", True)
    assert recipe.rescoring == Rescoring(0.3, 0.8) == Rescoring.of(cfg)
    assert (recipe.box_score_threshold, recipe.batch_size) == (0.1, 5)
    assert PoseActors.of(cfg, "onnxruntime") == PoseActors(3, 2.0, 0.5, "onnxruntime")
    assert ValSet.of(cfg) == ValSet(
        "data/synthetic",
        "val2017",
        "annotations/person_keypoints_val2017.json",
        "dets.json",
        7,
        2,
    )
    for spec in (recipe, PoseActors.of(cfg, "torch"), ValSet.of(cfg)):
        assert pickle.loads(pickle.dumps(spec)) == spec  # Ray's constructor kwargs, Serve's bind


def test_the_val_records_are_the_val_split(synthetic_root):
    cfg = load_config(None, [f"data.root={synthetic_root}", "model.input_size=[128,96]"])
    records = val_records(ValSet.of(cfg), CropSpec.of(cfg))
    expected = load_split(cfg, "val")[0]
    assert [(r.image_id, r.path) for r in records] == [(r.image_id, r.path) for r in expected]
    got = [(p.ann_id, p.center.tolist(), p.scale.tolist()) for r in records for p in r.persons]
    want = [(p.ann_id, p.center.tolist(), p.scale.tolist()) for r in expected for p in r.persons]
    assert got == want and len(got) > 0


def test_the_specs_a_detector_actor_unpickles_import_no_torch():
    code = (
        "import pickle, sys; from psm_model.config_yaml import load_config; "
        "from psm_model.recipe import CropSpec, Rescoring; cfg = load_config(None, []); "
        "pickle.loads(pickle.dumps((CropSpec.of(cfg), Rescoring.of(cfg), cfg.infer.detector))); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
