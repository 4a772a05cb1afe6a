#!/usr/bin/env python
"""Augmentation throughput: the PIL path (DataLoader workers running common/augment.py) against the
batched path (common/batch_aug.py on --device), for the MoCo v2 and BYOL two-view recipes.

  python scripts/bench_augment.py                          # CPU, shipped CIFAR-10 sample, 32 and 224 px
  python scripts/bench_augment.py --device cuda --sizes 224 --batch-size 256

Counted in source images per second (each gives two views). Paths:
  pil     DataLoader(--workers) decoding and augmenting with PIL, as the default training path;
  files   DataLoader(--workers) decoding to uint8, the batch augmented on --device (--device-aug files);
  memory  the decoded set already on --device, augmentation only (--device-aug memory).
For sizes above 64 px, --images train images are upsampled to 256x256 (bicubic) and saved as JPEG
(quality 95) in a temporary folder (scripts/make_jpeg_set.py), so both paths decode real JPEGs. The
worker paths are timed after 4 x workers + 2 untimed batches, which drain what the workers prefetched.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import augment, data  # noqa: E402
from scripts.make_jpeg_set import make_jpeg_set  # noqa: E402

RECIPES = {
    'moco_v2': lambda s: augment.MultiView(augment.moco_v2(s, blur=s >= 64), augment.moco_v2(s, blur=s >= 64)),
    'byol': lambda s: augment.MultiView(augment.byol(s, 1, blur=s >= 64), augment.byol(s, 2, blur=s >= 64)),
}


def count_kernels(recipe, size, n=64):
    """Ops of one two-view batch of n uint8 size x size images that touch an image-sized tensor (a
    kernel launch each on a GPU, and at large sizes a memory pass): the parameter draws on small CPU
    tensors and the view ops are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    views = ('view', 'select', 'unsqueeze', 'expand', 'slice', 'transpose', 'squeeze', 'alias')

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            big = max((t.numel() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)), default=0)
            if big >= n * size and not any(v in str(func) for v in views):
                Count.ops += 1
            return out

    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    with Count():
        recipe(x, torch.Generator().manual_seed(0))
    return Count.ops


def measure(loader, sampler, batches, warmup=1):
    """Source images per second over `batches` batches after `warmup` untimed ones. For a worker
    loader, pass warmup > workers x prefetch factor: the batches the workers made while the first was
    awaited come out at once and would inflate the rate."""
    sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        views, _, idx = next(it)
        n += len(idx)
    if views[0].is_cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=str(data.SAMPLE_DATA))
    p.add_argument('--sizes', type=int, nargs='+', default=[32, 224])
    p.add_argument('--recipes', nargs='+', default=list(RECIPES), choices=list(RECIPES))
    p.add_argument('--paths', nargs='+', default=['pil', 'files', 'memory'], choices=['pil', 'files', 'memory'])
    p.add_argument('--device', default='cpu')
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--compile', action='store_true',
                   help='compile the batched recipes (what --compile does with --device-aug); the first batch '
                        'compiles and is not timed')
    p.add_argument('--count-kernels', action='store_true',
                   help='only count the image-sized ops of one batch of each recipe and size (no timing)')
    p.add_argument('--threads', type=int, default=None, help='torch threads of the main process (default: torch\'s)')
    p.add_argument('--batch-size', type=int, default=None, help='default 256 at 32 px, 64 above')
    p.add_argument('--batches', type=int, default=None, help='timed batches (default 8 at 32 px, 4 above)')
    p.add_argument('--images', type=int, default=None,
                   help='images in the upsampled copy for sizes above 64 px (default: as many as the batches need)')
    args = p.parse_args(argv)
    if args.count_kernels:
        from common import batch_aug
        for size in args.sizes:
            for name in args.recipes:
                src = size if size <= 64 else round(size * 256 / 224)
                print(f'{name:8} {size:4} px: {count_kernels(batch_aug.from_transform(RECIPES[name](size)), src)} '
                      f'image-sized ops per two-view batch')
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f'device {device}, torch threads {torch.get_num_threads()}, workers {args.workers}, '
          f'load average {os.getloadavg()[0]:.1f} at start, {os.cpu_count()} CPUs')
    print(f'{"recipe":8} {"px":>4} {"path":7} {"img/s":>8}')
    with tempfile.TemporaryDirectory() as tmp:
        big = None
        for size in args.sizes:
            root = args.data
            bs = args.batch_size or (256 if size <= 64 else 64)
            batches = args.batches or (8 if size <= 64 else 4)
            warmup = 4 * args.workers + 2  # drains what the workers prefetched (prefetch factor 4)
            if size > 64:
                big = big or make_jpeg_set(args.data, tmp, args.images or (warmup + batches) * bs, (256, 256), 95,
                                           max(1, args.workers))
                root = big
            for name in args.recipes:
                for path in args.paths:
                    mode = 'off' if path == 'pil' else path
                    _, sampler, loader = data.train_loader(root, RECIPES[name](size), bs, 0, 1, 0, args.workers,
                                                           device, mode)
                    if args.compile and path != 'pil':
                        loader.compile()
                    rate = measure(loader, sampler, batches, warmup if path != 'memory' else 1)
                    print(f'{name:8} {size:4} {path:7} {rate:8.0f}', flush=True)
                    del loader
    print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
