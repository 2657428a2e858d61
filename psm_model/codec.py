"""The heatmap codec of evaluation and inference: heatmap size, stride and sigma in one object,
built from the config once per job or replica (`psm_model.recipe.EvalRecipe`), for decoding and
the flip test (`psm_model.decode`), and for the targets of the oracle
(`psm_model.loss.render_targets`, which training calls with the same three config values).

Pixel convention, shared by targets, decoder and flip test: heatmap pixel u <-> input-crop pixel
u * stride (the target peak sits at int(x / stride + 0.5)), input pixel centres at integers;
`sigma` is in heatmap pixels (HRNet: 2 at 64x48, 3 at 96x72).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from psm_model.config import Config
from psm_model.decode import DecodeMethod, as_tensor, dark_kernel_size, decode_heatmaps, flip_back
from psm_model.loss import render_targets


@dataclass(frozen=True)
class HeatmapCodec:
    """Heatmap size, stride and sigma, for decoding, the flip test and the oracle's targets."""

    heatmap_size_hw: tuple[int, int]
    stride: int
    sigma: float

    @classmethod
    def from_config(cls, cfg: Config) -> HeatmapCodec:
        return cls(cfg.model.heatmap_size, cfg.model.heatmap_stride, cfg.data.sigma)

    def encode(
        self, keypoints: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return render_targets(keypoints, visible, self.heatmap_size_hw, self.stride, self.sigma)

    def decode(
        self,
        heatmaps: np.ndarray | torch.Tensor,
        centers: np.ndarray | torch.Tensor,
        scales: np.ndarray | torch.Tensor,
        method: DecodeMethod = "quarter",
    ) -> tuple[np.ndarray, np.ndarray]:
        if tuple(heatmaps.shape[-2:]) != tuple(self.heatmap_size_hw):
            raise ValueError(
                f"heatmaps: size {tuple(heatmaps.shape[-2:])} is not the codec's "
                f"{tuple(self.heatmap_size_hw)} (input size / stride {self.stride})"
            )
        kernel = dark_kernel_size(self.sigma)
        return decode_heatmaps(heatmaps, centers, scales, method=method, dark_kernel=kernel)

    def flip_average(self, heatmaps: torch.Tensor, heatmaps_flipped: torch.Tensor) -> torch.Tensor:
        """Flip test: mean of the crop's heatmaps and the aligned ones of its mirror."""
        return 0.5 * (as_tensor(heatmaps) + flip_back(heatmaps_flipped, self.stride))
