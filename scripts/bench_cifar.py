#!/usr/bin/env python
"""CIFAR-10 speed and accuracy benchmark: MoCo v2, SimCLR and BYOL with a CIFAR-stem ResNet-18 on the
full CIFAR-10 train set (an ImageNet-layout folder: train/<class>/*.png|jpg, val/<class>/*), a fixed
epoch budget each, the batched on-device augmentation with the whole set in device memory.

  python scripts/bench_cifar.py /data/cifar10                     # 200 epochs each, batch 512, bf16
  python scripts/bench_cifar.py /data/cifar10 --epochs 20 --methods moco
  python scripts/bench_cifar.py data/cifar10_sample --epochs 1 --tiny    # CPU smoke test

Runs each method file as it is (`python METHOD.py DATA ...`), then prints per method: img/s (mean
over epochs after the first), wall time, mean GPU utilisation (nvidia-smi, sampled every second)
and the weighted-kNN top-1 (k=200, T=0.1) of the final backbone on val, the protocol of lightly's
CIFAR-10 benchmark (targets at 200 epochs, batch 512: MoCo 0.847, SimCLR 0.848, BYOL 0.868,
SimSiam 0.764, Barlow Twins 0.819, SwaV 0.842). The
per-method flags are lightly's settings in our flags: SGD at 0.06 x batch/128 (our --lr is per 256:
0.12), momentum 0.9, wd 5e-4, cosine, no warm-up; MoCo T 0.1, queue 8192 (lightly's for batch 512),
key momentum 0.99, 8 BN splits; SimCLR T 0.5, colour strength 0.5, projection 512-512-128; BYOL
projector and predictor 1024 wide to 256, target momentum 0.99 (ours rises to 1 on a cosine, as the
paper); SimSiam, Barlow Twins and SwAV: see METHOD_ARGS (Barlow Twins keeps its paper's LARS where
lightly uses SGD; SwAV takes lightly's Adam). Their ResNet-18 and crops differ in details; the flags are
not tuned beyond that.
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

METHOD_ARGS = {  # lightly's CIFAR-10 benchmark settings, in our flags
    'moco': '--v2 --moco-t 0.1 --moco-k 8192 --moco-m 0.99 --lr 0.12 --wd 5e-4 --knn-t 0.1',
    'simclr': '--optimizer sgd --lr 0.12 --wd 5e-4 --warmup-epochs 0 --temperature 0.5 --color-strength 0.5 '
              '--knn-t 0.1',
    'byol': '--optimizer sgd --lr 0.12 --wd 5e-4 --warmup-epochs 0 --hidden-dim 1024 --dim 256 --tau 0.99 '
            '--knn-t 0.1',
    # lightly: SGD 0.06 unscaled (our --lr is per 256: 0.03 at batch 512), 2-layer projector 2048, predictor 512
    'simsiam': '--proj-layers 2 --proj-hidden-dim 2048 --dim 2048 --pred-dim 512 --lr 0.03 --wd 5e-4 --knn-t 0.1',
    # lightly: projector 2048-2048, lambda 0.005; barlowtwins.py has FAIR LARS only (lightly: SGD), its LRs kept
    'barlowtwins': '--projector 2048-2048 --lambd 0.005 --warmup-epochs 2 --knn-t 0.1',
    # lightly: head 512-512-128, 512 prototypes, 2 crops of 32 px (scale 0.14-1), no queue, Adam 1e-3 x batch/128
    # with wd 1e-6 on a cosine to 0
    'swav': '--hidden-mlp 512 --nmb-prototypes 512 --optimizer adam --base-lr 0.004 --final-lr 0 --wd 1e-6 '
            '--warmup-epochs 0 --freeze-prototypes-niters 98 --queue-length 0 --knn-t 0.1',
}
# how each method takes its crop size (SwAV: a list of multi-crop sizes and counts)
CROP_ARGS = {'swav': '--size-crops 32 --nmb-crops 2 --min-scale-crops 0.14 --max-scale-crops 1'}
TINY = '--arch resnet10 --width 8 --batch-size 16 --workers 0 --knn-k 20 --amp off'  # CPU: bf16 is slow there
TINY_METHOD = {'moco': '--moco-k 32 --bn-splits 2 --moco-dim 16', 'simclr': '--proj-dim 16',
               'byol': '--hidden-dim 32 --dim 16', 'simsiam': '--proj-hidden-dim 32 --dim 16 --pred-dim 8',
               'barlowtwins': '--projector 32-32', 'swav': '--hidden-mlp 32 --feat-dim 16 --nmb-prototypes 20'}


class GpuSampler(threading.Thread):
    """Mean GPU utilisation (percent, first GPU) from nvidia-smi once a second; None without it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.values, self.stop = [], threading.Event()

    def run(self):
        if not shutil.which('nvidia-smi'):
            return
        while not self.stop.wait(1.0):
            out = subprocess.run(['nvidia-smi', '--query-gpu=utilization.gpu', '--format=csv,noheader,nounits'],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.values.append(float(out[0]))

    def mean(self):
        return sum(self.values) / len(self.values) if self.values else None


def run_method(method, args):
    out = Path(args.output_dir) / method
    cmd = [sys.executable, str(REPO / f'{method}.py'), str(args.data), '--arch', 'resnet18', '--cifar-stem',
           *shlex.split(CROP_ARGS.get(method, '--crop-size 32')), '--batch-size', str(args.batch_size), '--epochs', str(args.epochs),
           '--knn-every', str(args.epochs), '--knn-k', '200', '--device-aug', args.device_aug, '--amp', args.amp,
           '--workers', str(args.workers), '--seed', '0', '--print-freq', '50', '--save-freq', str(args.epochs),
           '--output-dir', str(out)] + shlex.split(METHOD_ARGS[method])
    if args.tiny:
        cmd += shlex.split(TINY) + shlex.split(TINY_METHOD[method])
    cmd += shlex.split(args.extra.get(method, ''))
    print('$', shlex.join(cmd), flush=True)
    gpu = GpuSampler()
    gpu.start()
    t = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t
    gpu.stop.set()
    if p.returncode:
        raise SystemExit(f'{method} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}')
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    epochs = [r for r in recs if r['type'] == 'epoch']
    timed = epochs[1:] or epochs  # the first epoch includes start-up and compilation
    knn = [r for r in recs if r['type'] == 'knn']
    return dict(method=method, img_s=sum(r['img_s'] for r in timed) / len(timed), wall_s=wall, gpu_util=gpu.mean(),
                knn_top1=knn[-1]['knn_top1'] if knn else None, epochs=len(epochs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='CIFAR-10 as an ImageNet-layout folder (train/ and val/ class folders)')
    p.add_argument('--methods', nargs='+', default=list(METHOD_ARGS), choices=list(METHOD_ARGS))
    p.add_argument('--epochs', type=int, default=200)
    p.add_argument('-b', '--batch-size', type=int, default=512)
    p.add_argument('--device-aug', default='memory', choices=['off', 'memory', 'files', 'jpeg'])
    p.add_argument('--amp', default='bf16', choices=['off', 'bf16', 'fp16'])
    p.add_argument('-j', '--workers', type=int, default=8)
    p.add_argument('--extra', type=lambda s: s.split('=', 1), action='append', default=[],
                   metavar='METHOD=ARGS', help='more flags for one method, e.g. --extra "moco=--lr 0.06"')
    p.add_argument('--tiny', action='store_true', help='tiny network and batch (CPU smoke test)')
    p.add_argument('--output-dir', default='output/bench_cifar')
    args = p.parse_args(argv)
    args.extra = dict(args.extra)
    rows = [run_method(m, args) for m in args.methods]
    print(f'\n{"method":8} {"epochs":>6} {"img/s":>8} {"wall":>9} {"GPU util":>8} {"kNN top-1":>9}')
    for r in rows:
        util = f'{r["gpu_util"]:.0f}%' if r['gpu_util'] is not None else 'n/a'
        knn = f'{r["knn_top1"]:.2f}' if r['knn_top1'] is not None else 'n/a'
        print(f'{r["method"]:8} {r["epochs"]:6d} {r["img_s"]:8.0f} {r["wall_s"] / 60:7.1f} m {util:>8} {knn:>9}')
    with open(Path(args.output_dir) / 'bench_cifar.json', 'w') as f:
        json.dump(dict(args=vars(args), results=rows), f, indent=1)


if __name__ == '__main__':
    main()
