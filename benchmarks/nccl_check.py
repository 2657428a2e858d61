"""A one-GPU NCCL DDP train step of a tiny PSM model with SyncBatchNorm and bf16 autocast.

Checks the GPU code path (NCCL process group, DDP, sync BN, AMP, channels_last) without Ray.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from psm_model.config import ModelConfig
from psm_model.hrnet import build_model
from psm_model.loss import joints_mse_loss

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("nccl", rank=0, world_size=1)
cfg = ModelConfig(width=8, input_size=(128, 96))
model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg)).cuda()
model = DistributedDataParallel(model.to(memory_format=torch.channels_last), device_ids=[0])
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.randn(8, 3, 128, 96, device="cuda").to(memory_format=torch.channels_last)
target = torch.rand(8, 17, 64, 48, device="cuda")
losses = []
for _ in range(5):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = joints_mse_loss(model(x).float(), target, torch.ones(8, 17, device="cuda"))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(
    "nccl DDP + SyncBN + bf16 ok, backend",
    dist.get_backend(),
    "losses",
    [f"{v:.4f}" for v in losses],
)
dist.destroy_process_group()
