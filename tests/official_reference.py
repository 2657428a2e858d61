"""Independent functional reference of the official HRNet pose network.

Mirrors the forward pass of leoxiaobin/deep-high-resolution-net.pytorch
(lib/models/pose_hrnet.py) in eval mode, using only torch.nn.functional and a
plain state_dict with the OFFICIAL key names. It shares no code with the
project model, so agreement between the two is a real cross-check.

Layout (W32/W48 configs): stem, layer1 (4 Bottlenecks), then stages 2/3/4 with
1/4/3 modules and 2/3/4 branches of 4 BasicBlocks each. The last stage-4
module keeps only output branch 0, which feeds final_layer.
"""

import math

import torch
import torch.nn.functional as F

STAGES = ((2, 1, 2), (3, 4, 3), (4, 3, 4))  # (stage index, modules, branches)
BLOCKS_PER_BRANCH = 4
BN_EPS = 1e-5


def official_state_dict(widths=(32, 64, 128, 256), num_joints=17, final_kernel=1, seed=0):
    """Every key of the official model, with random values, built by hand."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(key, cout, cin, k):
        # He-style std keeps activations O(1) through conv + ReLU.
        std = math.sqrt(2.0 / (cin * k * k))
        sd[key + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * std

    def bn(key, c):
        sd[key + ".weight"] = torch.rand(c, generator=g) + 0.5
        sd[key + ".bias"] = torch.randn(c, generator=g) * 0.1
        # Placeholders; set by the calibration pass at the end.
        sd[key + ".running_mean"] = torch.zeros(c)
        sd[key + ".running_var"] = torch.ones(c)
        sd[key + ".num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    # Stem: two stride-2 3x3 convs, 3 -> 64 -> 64.
    conv("conv1", 64, 3, 3)
    bn("bn1", 64)
    conv("conv2", 64, 64, 3)
    bn("bn2", 64)

    # layer1: 4 Bottlenecks (planes 64, out 256); block 0 projects 64 -> 256.
    cin = 64
    for b in range(4):
        p = f"layer1.{b}"
        conv(p + ".conv1", 64, cin, 1)
        bn(p + ".bn1", 64)
        conv(p + ".conv2", 64, 64, 3)
        bn(p + ".bn2", 64)
        conv(p + ".conv3", 256, 64, 1)
        bn(p + ".bn3", 256)
        if b == 0:
            conv(p + ".downsample.0", 256, cin, 1)
            bn(p + ".downsample.1", 256)
        cin = 256

    prev = [256]
    for s, n_modules, n_branches in STAGES:
        cur = list(widths[:n_branches])
        # Transition: existing branches get a 3x3 conv only if width changes;
        # new branches come from the last previous branch via stride-2 convs.
        t = f"transition{s - 1}"
        for i in range(n_branches):
            if i < len(prev):
                if prev[i] != cur[i]:
                    conv(f"{t}.{i}.0", cur[i], prev[i], 3)
                    bn(f"{t}.{i}.1", cur[i])
            else:
                steps = i + 1 - len(prev)
                for k in range(steps):
                    cout = cur[i] if k == steps - 1 else prev[-1]
                    conv(f"{t}.{i}.{k}.0", cout, prev[-1], 3)
                    bn(f"{t}.{i}.{k}.1", cout)
        for m in range(n_modules):
            p = f"stage{s}.{m}"
            for i, c in enumerate(cur):
                for b in range(BLOCKS_PER_BRANCH):
                    q = f"{p}.branches.{i}.{b}"
                    conv(q + ".conv1", c, c, 3)
                    bn(q + ".bn1", c)
                    conv(q + ".conv2", c, c, 3)
                    bn(q + ".bn2", c)
            last = s == 4 and m == n_modules - 1  # multi_scale_output=False
            for i in range(1 if last else n_branches):
                for j in range(n_branches):
                    q = f"{p}.fuse_layers.{i}.{j}"
                    if j > i:
                        conv(q + ".0", cur[i], cur[j], 1)
                        bn(q + ".1", cur[i])
                    elif j < i:
                        for k in range(i - j):
                            cout = cur[i] if k == i - j - 1 else cur[j]
                            conv(f"{q}.{k}.0", cout, cur[j], 3)
                            bn(f"{q}.{k}.1", cout)
        prev = cur

    conv("final_layer", num_joints, widths[0], final_kernel)
    sd["final_layer.bias"] = torch.randn(num_joints, generator=g) * 0.1

    # Purely random running stats let activations grow ~1e10 through the ~40
    # residual adds and fuse sums (eval BN does not normalise), which would
    # make a 1e-5 comparison meaningless. So one forward pass on a random
    # input sets each BN's stats from the batch stats of its own input, with
    # jitter: mean + N(0, 0.1) * std and var * U(0.5, 1.5).
    x = torch.randn(2, 3, 128, 96, generator=g)
    _forward(sd, x, calib=g)
    return sd


def official_forward(sd, x):
    """Official PoseHighResolutionNet eval output for input x (N,3,H,W).

    Floating weights are cast to x.dtype, so float64 inputs give a float64
    reference. H and W must be multiples of 32 (as in the official model,
    otherwise the upsampled fuse terms do not match in size).
    """
    return _forward(sd, x)


@torch.no_grad()
def _forward(sd, x, calib=None):
    """Eval forward; with a generator `calib`, first sets each BN's running
    stats from its input (see official_state_dict)."""

    def w(key):
        return sd[key].to(x.dtype)

    def conv(h, key, stride=1):
        weight = w(key + ".weight")
        bias = w(key + ".bias") if key + ".bias" in sd else None
        return F.conv2d(h, weight, bias, stride, weight.shape[-1] // 2)

    def bn(h, key):
        if calib is not None:
            mean = h.double().mean(dim=(0, 2, 3))
            var = h.double().var(dim=(0, 2, 3), unbiased=False)
            c, dt = mean.numel(), sd[key + ".running_mean"].dtype
            jitter = torch.randn(c, generator=calib, dtype=torch.float64)
            scale = torch.rand(c, generator=calib, dtype=torch.float64) + 0.5
            sd[key + ".running_mean"] = (mean + 0.1 * var.sqrt() * jitter).to(dt)
            sd[key + ".running_var"] = (var * scale).to(dt)
        return F.batch_norm(
            h,
            w(key + ".running_mean"),
            w(key + ".running_var"),
            w(key + ".weight"),
            w(key + ".bias"),
            training=False,
            eps=BN_EPS,
        )

    def count(fmt):  # how many consecutive indices n have keys under fmt.format(n)
        n = 0
        while any(k.startswith(fmt.format(n)) for k in sd):
            n += 1
        return n

    def bottleneck(h, p):
        out = F.relu(bn(conv(h, p + ".conv1"), p + ".bn1"))
        out = F.relu(bn(conv(out, p + ".conv2"), p + ".bn2"))
        out = bn(conv(out, p + ".conv3"), p + ".bn3")
        res = (
            bn(conv(h, p + ".downsample.0"), p + ".downsample.1")
            if p + ".downsample.0.weight" in sd
            else h
        )
        return F.relu(out + res)

    def basic(h, p):
        out = F.relu(bn(conv(h, p + ".conv1"), p + ".bn1"))
        out = bn(conv(out, p + ".conv2"), p + ".bn2")
        return F.relu(out + h)

    def fuse(h, q, i, j):
        if j > i:  # 1x1 conv to c_i, BN, nearest upsample by 2^(j-i)
            h = bn(conv(h, q + ".0"), q + ".1")
            return F.interpolate(h, scale_factor=float(2 ** (j - i)), mode="nearest")
        for k in range(i - j):  # chain of stride-2 3x3 convs; no ReLU at the end
            h = bn(conv(h, f"{q}.{k}.0", stride=2), f"{q}.{k}.1")
            if k < i - j - 1:
                h = F.relu(h)
        return h

    def hr_module(xs, p):
        n = len(xs)
        xs = list(xs)
        for i in range(n):
            for b in range(count(f"{p}.branches.{i}.{{}}.")):
                xs[i] = basic(xs[i], f"{p}.branches.{i}.{b}")
        outs = []
        # fuse_layers.{i} exists only for the outputs kept (multi_scale_output)
        for i in range(count(f"{p}.fuse_layers.{{}}.")):
            # same summation order as the official loop
            y = xs[0] if i == 0 else fuse(xs[0], f"{p}.fuse_layers.{i}.0", i, 0)
            for j in range(1, n):
                y = y + (xs[j] if j == i else fuse(xs[j], f"{p}.fuse_layers.{i}.{j}", i, j))
            outs.append(F.relu(y))
        return outs

    def transition(ys, t, n_branches):
        xs = []
        for i in range(n_branches):
            if i < len(ys):  # optional width-changing 3x3 conv, stride 1
                h = ys[i]
                if f"{t}.{i}.0.weight" in sd:
                    h = F.relu(bn(conv(h, f"{t}.{i}.0"), f"{t}.{i}.1"))
            else:  # new branch from the last (lowest-resolution) previous one
                h = ys[-1]
                for k in range(i + 1 - len(ys)):
                    h = F.relu(bn(conv(h, f"{t}.{i}.{k}.0", stride=2), f"{t}.{i}.{k}.1"))
            xs.append(h)
        return xs

    h = F.relu(bn(conv(x, "conv1", stride=2), "bn1"))
    h = F.relu(bn(conv(h, "conv2", stride=2), "bn2"))
    for b in range(count("layer1.{}.")):
        h = bottleneck(h, f"layer1.{b}")

    ys = [h]
    for s, _, n_branches in STAGES:
        xs = transition(ys, f"transition{s - 1}", n_branches)
        for m in range(count(f"stage{s}.{{}}.")):
            xs = hr_module(xs, f"stage{s}.{m}")
        ys = xs
    return conv(ys[0], "final_layer")
