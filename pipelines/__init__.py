"""Data for PSM-Pose: COCO reading, the synthetic COCO generator and the Ray Data graphs."""
