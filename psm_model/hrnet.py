"""HRNet pose network with two switches: upward fusion (`hrnet` | `psm`) and heatmap stride (4 | 2).

With fusion="hrnet", heatmap_stride=4 the module tree and state_dict keys are those of the official
pose_hrnet.py (conv1, layer1, transition1, stage2.0.branches.0.0.conv1, stage2.0.fuse_layers.0.1.0,
final_layer, ...), so official pose checkpoints load strictly (see weights.py). The PSM parts carry
names the official layout does not use (`fuse_layers.i.j.conv`, `head_up`, ...), so an official
ImageNet checkpoint can never be loaded into them by accident.
"""

from __future__ import annotations

import torch
from torch import nn

from psm_model.config import ModelConfig

BN_MOMENTUM = 0.1
STEM_WIDTH = 64  # stem and stage-1 input channels, fixed in HRNet
BLOCKS_PER_BRANCH = 4


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv_bn(
    cin: int, cout: int, kernel: int = 1, stride: int = 1, relu: bool = False
) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class PixelShuffleUp(nn.Module):
    """1x1 conv to cout*r^2 channels, BN, PixelShuffle(r): lands exactly on a (cout, rH, rW) map."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout * factor * factor, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout * factor * factor)
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.bn(self.conv(x)))  # (B, cout*r*r, H, W) -> (B, cout, rH, rW)


class ConvBN(nn.Module):
    """1x1 conv + BN under names the official layout does not use (PSM's own-branch path, head)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _upward_path(cin: int, cout: int, factor: int, fusion: str) -> nn.Module:
    if fusion == "psm":
        return PixelShuffleUp(cin, cout, factor)
    # official: 1x1 conv + BN + nearest upsampling (keys .0 and .1)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Upsample(scale_factor=factor)
    )


def _downward_path(widths: tuple[int, ...], j: int, i: int) -> nn.Sequential:
    """i - j stride-2 3x3 convs; the intermediate ones keep branch j's width and end in ReLU."""
    steps = []
    for k in range(i - j):
        last = k == i - j - 1
        steps.append(conv_bn(widths[j], widths[i] if last else widths[j], 3, 2, relu=not last))
    return nn.Sequential(*steps)


class ExchangeModule(nn.Module):
    """One HRNet exchange unit: four basic blocks per branch, then every output sums all branches.

    fuse_layers[i][j] carries branch j to branch i. For the PSM fusion, fuse_layers[i][i] is the
    1x1 conv + BN on the target's own features (the report's "1x1 convolution added in every
    previous layer"), present where branch i receives pixel-shuffled maps from below.
    """

    def __init__(self, widths: tuple[int, ...], fusion: str, multi_scale_output: bool = True):
        super().__init__()
        n = len(widths)
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(w) for _ in range(BLOCKS_PER_BRANCH))) for w in widths
        )
        self.fuse_layers = nn.ModuleList()
        for i in range(n if multi_scale_output else 1):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(_upward_path(widths[j], widths[i], 2 ** (j - i), fusion))
                elif j == i:
                    row.append(
                        ConvBN(widths[i], widths[i])
                        if fusion == "psm" and i < n - 1
                        else nn.Identity()
                    )
                else:
                    row.append(_downward_path(widths, j, i))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for row in self.fuse_layers:
            y = row[0](xs[0])  # same summation order as the official code
            for j in range(1, len(xs)):
                y = y + row[j](xs[j])
            out.append(self.relu(y))
        return out


class PoseHRNet(nn.Module):
    def __init__(
        self,
        widths: tuple[int, int, int, int] = (32, 64, 128, 256),
        fusion: str = "hrnet",
        heatmap_stride: int = 4,
        num_joints: int = 17,
        final_conv_kernel: int = 1,
        stage_modules: tuple[int, int, int] = ModelConfig.stage_modules,
    ):
        super().__init__()
        if fusion not in ("hrnet", "psm") or heatmap_stride not in (2, 4):
            raise ValueError(f"fusion={fusion!r}, heatmap_stride={heatmap_stride}: not supported")
        self.widths, self.fusion, self.heatmap_stride = tuple(widths), fusion, heatmap_stride

        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 3, 2, 1, bias=False)  # -> 1/2
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(STEM_WIDTH, STEM_WIDTH, 3, 2, 1, bias=False)  # -> 1/4
        self.bn2 = nn.BatchNorm2d(STEM_WIDTH, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        stage1_out = STEM_WIDTH * Bottleneck.expansion
        self.layer1 = nn.Sequential(
            Bottleneck(STEM_WIDTH, STEM_WIDTH),
            *(Bottleneck(stage1_out, STEM_WIDTH) for _ in range(3)),
        )

        # transition1 adapts stage 1's 256 channels to branches 0 and 1; later transitions only add
        # the new lowest-resolution branch from the previous stage's last one (official layout).
        self.transition1 = nn.ModuleList(
            [
                conv_bn(stage1_out, widths[0], 3, 1, relu=True),
                nn.Sequential(conv_bn(stage1_out, widths[1], 3, 2, relu=True)),
            ]
        )
        for s, modules in zip((2, 3, 4), stage_modules, strict=True):
            if s > 2:
                new = nn.Sequential(conv_bn(widths[s - 2], widths[s - 1], 3, 2, relu=True))
                self.add_module(
                    f"transition{s - 1}",
                    nn.ModuleList([*(nn.Identity() for _ in range(s - 1)), new]),
                )
            stage = [
                ExchangeModule(
                    widths[:s], fusion, multi_scale_output=not (s == 4 and m == modules - 1)
                )
                for m in range(modules)
            ]
            self.add_module(f"stage{s}", nn.Sequential(*stage))

        if heatmap_stride == 2:
            # PSM head: pixel-shuffle the 1/4 branch to 1/2, add the stem's 1/2 features (1x1 conv)
            self.head_up = PixelShuffleUp(widths[0], widths[0], 2)
            self.head_stem = ConvBN(STEM_WIDTH, widths[0])
        self.final_layer = nn.Conv2d(
            widths[0], num_joints, final_conv_kernel, 1, final_conv_kernel // 2
        )
        self.init_weights()

    def init_weights(self) -> None:
        # as the official code: N(0, 0.001) convs, BN to identity, zero biases
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stem features at 1/2, highest-resolution branch at 1/4)."""
        half = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(self.relu(self.bn2(self.conv2(half))))
        xs = [t(x) for t in self.transition1]
        xs = self.stage2(xs)
        xs = self.stage3(xs + [self.transition2[2](xs[-1])])
        xs = self.stage4(xs + [self.transition3[3](xs[-1])])
        return half, xs[0]

    def forward_head(self, half: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if self.heatmap_stride == 2:
            high = self.relu(self.head_up(high) + self.head_stem(half))
        return self.final_layer(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, joints, H/stride, W/stride) heatmaps."""
        return self.forward_head(*self.forward_features(x))


def build_model(cfg: ModelConfig) -> PoseHRNet:
    """The one place that turns config into a model: freshly initialised (training loads
    `cfg.pretrained` with `psm_model.weights.load_pretrained`)."""
    return PoseHRNet(
        cfg.branch_widths,
        cfg.fusion,
        cfg.heatmap_stride,
        cfg.num_joints,
        cfg.final_conv_kernel,
        cfg.stage_modules,
    )


# ImageNet statistics of RGB images in [0, 1], as the official torchvision Normalize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> float32 (B, 3, H, W), ImageNet-normalised as the official loader.

    Run it on the device the batch will be used on: moving uint8 is 4x cheaper than float32.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 (B, H, W, 3) batch, got {images.dtype} {tuple(images.shape)}"
        )
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    # a permuted NHWC tensor already has channels_last strides, which elementwise ops keep
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
