"""`psm make-data synthetic OUT`: a synthetic COCO-format keypoint dataset of drawn people;
`psm make-data coco-size OUT --from ROOT`: a COCO root's train annotations repeated to COCO's
size, for load and memory tests."""

from __future__ import annotations

import argparse
import sys

from jobs import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Writes OUT/train2017, OUT/val2017 (JPEG images of drawn people: several per "
        "image, varied poses, sizes, backgrounds, occlusion) and "
        "OUT/annotations/person_keypoints_{train,val}2017.json with the exact keypoints."
    )
    p.add_argument("out", help="output COCO root")
    p.add_argument("--images", type=int, default=200, help="images in both splits together")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val2017")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pipelines.synthetic import make_synthetic_coco

    counts = make_synthetic_coco(args.out, args.images, args.seed, args.val_fraction)
    for split, c in counts.items():
        print(f"{args.out}/{split}: {c['images']} images, {c['persons']} persons")
    print(f"annotations: {args.out}/annotations/person_keypoints_{{train,val}}2017.json")


def add_coco_size_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Writes OUT/annotations/person_keypoints_train2017.json: ROOT's train annotations "
        "repeated (new image and annotation ids, the same file names) to --images images, "
        "COCO 2017 train's count by default; OUT's other entries link to ROOT's, so every "
        "image exists. For measuring load_split and a training job's memory at COCO size."
    )
    p.add_argument("out", help="output COCO root")
    p.add_argument("--from", dest="source", required=True, help="a COCO root to repeat")
    p.add_argument("--images", type=int, default=None, help="images (default: COCO's 118,287)")
    p.set_defaults(func=run_coco_size)


def run_coco_size(args: argparse.Namespace) -> None:
    from pipelines.synthetic import COCO_TRAIN_IMAGES, make_coco_size

    counts = make_coco_size(args.source, args.out, args.images or COCO_TRAIN_IMAGES)
    print(f"{args.out}/annotations/person_keypoints_train2017.json: {counts['images']} images, "
          f"{counts['annotations']} annotations")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.make_data ARGS` is `psm make-data synthetic ARGS`."""
    return command.job_main("jobs.make_data", "psm make-data synthetic", argv)


if __name__ == "__main__":
    sys.exit(main())
