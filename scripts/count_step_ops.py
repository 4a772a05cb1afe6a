#!/usr/bin/env python
"""Kernels per eager training step of MoCo v2, SimCLR and BYOL as scripts/bench_cifar.py runs them
(ResNet-18, CIFAR stem, lightly's heads), counted on the CPU.

  python scripts/count_step_ops.py
  python scripts/count_step_ops.py --top 12      # also the most frequent ops of each step
  python scripts/count_step_ops.py --profile     # on the GPU: full-size step time vs its kernels' time

At CIFAR size a GPU step is launch-bound: each op that computes something is a kernel launch of a
few microseconds of CPU time whatever its size. This counts those ops (every ATen op of forward,
backward, the multi-tensor optimizer step and the EMA update, less the view ops, which launch
nothing) and times the step on tiny tensors (width 4, 8x8 px, batch 16, one thread), where the CPU
time is dispatch overhead rather than arithmetic. The count does not depend on width, image size or
batch; it is the eager count (--compile fuses most of it).

--profile runs each step at full size (width 64, batch 512 per view, 32 px, bf16 on CUDA; MoCo's
queue 8192) and prints the wall time per step next to the time its kernels keep the device busy
(torch.profiler): a busy time well below the wall time means the device waits for the CPU to launch.
Source images per second count a two-view image once, as the training logs do.
"""
import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import byol  # noqa: E402
import moco  # noqa: E402
import simclr  # noqa: E402
from common.resnet import build_resnet  # noqa: E402

VIEWS = {'view', '_unsafe_view', 'detach', 't', 'permute', 'as_strided', 'squeeze', 'unsqueeze', 'expand',
         'slice', 'select', 'alias', 'split', 'split_with_sizes', 'chunk', 'unbind', 'transpose', 'lift_fresh',
         '_reshape_alias', 'empty', 'empty_like', 'new_empty_strided', 'empty_strided'}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def build(method, width, bn_splits, queue=64):
    """(model, loss_fn(x1, x2), after_step) with bench_cifar.py's method flags (heads at our widths)."""
    if method == 'moco':  # --v2 --moco-t 0.1 --moco-k 8192 --moco-m 0.99 (queue length: same ops)
        model = moco.MoCo(lambda num_classes: build_resnet('resnet18', num_classes, width, True, bn_splits=bn_splits),
                          128, queue, 0.99, 0.1, mlp=True)
        return model, lambda x1, x2: F.cross_entropy(*[t.float() if t.is_floating_point() else t
                                                       for t in model(x1, x2)]), None
    if method == 'simclr':  # --temperature 0.5, projection feat-512-128
        backbone = build_resnet('resnet18', 0, width, True)
        model = simclr.SimCLR(backbone, simclr.projection_head(backbone.feat_dim, 512, 128), 0.5)
        return model, lambda x1, x2: F.cross_entropy(*model(simclr.interleave([x1, x2]))), None
    model = byol.BYOL(build_resnet('resnet18', 0, width, True), hidden_dim=1024, dim=256)  # lightly's heads
    return model, model, lambda: model.update_target(0.99)


def make_step(method, bn_splits=8, width=4, n=16, size=8, device='cpu', amp=False, queue=64):
    """One training step of `method` on fixed random n x 3 x size x size views, channels_last as on
    CUDA, the multi-tensor SGD (torch's default on CUDA), bf16 autocast if `amp`."""
    torch.manual_seed(0)
    device = torch.device(device)
    model, loss_fn, after = build(method, width, bn_splits, queue)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9,
                          weight_decay=5e-4, foreach=True)
    x1 = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn_like(x1)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = loss_fn(x1, x2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after:
            after()
    return step


def measure(method, bn_splits=8, width=4, n=16, size=8, steps=20):
    """(Counter of the kernels of one step, seconds per step on the CPU) at a tiny size."""
    step = make_step(method, bn_splits, width, n, size)
    for _ in range(3):
        step()
    counter = CountOps()
    with counter:
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return counter.ops, (time.perf_counter() - t) / steps


def profile(method, bn_splits, device, n, size, width=64, steps=20, top=8):
    """--profile: the step at full size on `device`: wall time per step, the time its kernels keep the
    device busy (torch.profiler; below the wall time = the device waits for launches), top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    cuda = torch.device(device).type == 'cuda'
    step = make_step(method, bn_splits, width, n, size, device, amp=cuda, queue=8192 // n * n)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(10):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - t) / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(5):
            step()
        sync()
    events = prof.key_averages()
    if cuda:
        from torch.autograd import DeviceType
        # busy: the kernels' own entries; top: the ATen ops that launched them (which carry the same time)
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 5 / 1e6
        ranked = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: -e.self_device_time_total)
        what = [f'{e.key} {e.self_device_time_total / 5 / 1e3:.2f} ms' for e in ranked[:top]]
    else:
        busy = None
        ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
        what = [f'{e.key} {e.self_cpu_time_total / 5 / 1e3:.2f} ms' for e in ranked[:top]]
    return wall, busy, what


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--top', type=int, default=0, help='also list the N most frequent ops (kernels by time with '
                                                     '--profile) of each step')
    p.add_argument('--profile', action='store_true',
                   help='instead of counting: time the full-size step on --device (ResNet-18 width 64, bf16 '
                        'on CUDA) and the share of it that its kernels keep the device busy')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('-b', '--batch-size', type=int, default=512, help='--profile: batch (per view)')
    p.add_argument('--size', type=int, default=32, help='--profile: image side')
    args = p.parse_args(argv)
    rows = [('moco', 8, 'MoCo v2, 8 BN splits (bench_cifar)'), ('moco', 1, 'MoCo v2, no BN split'),
            ('simclr', 1, 'SimCLR, 2N views in one batch'), ('byol', 1, 'BYOL, views one by one')]
    if args.profile:
        print(f'{args.device}, batch {args.batch_size}, {args.size} px; wall time per step and the kernels\' '
              f'device time in it')
        for method, splits, label in rows:
            wall, busy, top = profile(method, splits, args.device, args.batch_size, args.size, top=args.top or 8)
            busy = f'{busy * 1e3:8.1f} ms ({busy / wall:.0%})' if busy is not None else 'n/a'
            print(f'{label:36} {wall * 1e3:8.1f} ms/step, kernels {busy}, '
                  f'{args.batch_size / wall:,.0f} img/s')
            print('    ' + ', '.join(top))
        return
    torch.set_num_threads(1)
    print(f'{"step":36} {"kernels":>8} {"tiny CPU step":>14}')
    for method, splits, label in rows:
        ops, dt = measure(method, splits)
        print(f'{label:36} {sum(ops.values()):8d} {dt * 1e3:11.1f} ms')
        if args.top:
            print('    ' + ', '.join(f'{k} {v}' for k, v in ops.most_common(args.top)))


if __name__ == '__main__':
    main()
