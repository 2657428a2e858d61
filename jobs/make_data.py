"""`psm make-data synthetic OUT`: a synthetic COCO-format keypoint dataset of drawn people."""

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


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.make_data ARGS` is `psm make-data synthetic ARGS`."""
    return command.job_main("jobs.make_data", "psm make-data synthetic", argv)


if __name__ == "__main__":
    sys.exit(main())
