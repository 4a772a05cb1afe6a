#!/usr/bin/env python
"""Times N training steps of a method and prints img/s and peak memory.

It runs the method file itself (the real training loop, data loading included) with --max-steps
and --print-freq 1, then reads the per-step records of its log.jsonl, so the number is what a user
gets. The first --warmup steps (allocator, cuDNN autotuning, worker start) are not timed.

  python scripts/benchmark.py moco --steps 30 -- data/cifar10_sample --arch resnet18 --cifar-stem --crop-size 32 --moco-k 4096
  python scripts/benchmark.py moco --steps 30 -- synthetic:224 --amp bf16   # pure compute, no decoding

Arguments after `--` go to the method unchanged (batch size, arch, AMP, workers, ...); without a
data argument the method's demo recipe runs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ['moco', 'simclr', 'byol', 'npid', 'deepcluster', 'odc', 'rotation', 'relative_loc', 'mocov3', 'dino',
           'simsiam', 'barlowtwins', 'swav', 'mae']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('method', choices=METHODS)
    p.add_argument('--steps', type=int, default=30, help='timed steps (after the warm-up)')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    p.add_argument('--nproc', type=int, default=1, help='processes (torchrun) ')
    argv = sys.argv[1:] if argv is None else list(argv)
    # everything after `--` goes to the method (argparse's REMAINDER would also swallow --steps)
    own, margs = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    args = p.parse_args(own)
    script = REPO / f'{args.method}.py'
    if not script.exists():
        raise SystemExit(f'{script} does not exist (method not implemented yet)')
    with tempfile.TemporaryDirectory() as out:
        total = args.warmup + args.steps
        launcher = [sys.executable] if args.nproc == 1 else \
            [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(args.nproc)]
        # --epochs before the method's flags, so that they may set it (DINO's per-iteration schedules are
        # arrays of epochs x iterations: a long nominal run on ImageNet-sized data does not fit in memory)
        cmd = [*launcher, str(script), '--epochs', '100000', *margs, '--max-steps', str(total), '--print-freq', '1',
               '--save-freq', '100000', '--output-dir', out]
        print(' '.join(cmd[1:]) if args.nproc == 1 else ' '.join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED='1'))
        if r.returncode:
            raise SystemExit(f'{args.method}.py failed with exit code {r.returncode}')
        recs = [json.loads(l) for l in open(Path(out) / 'log.jsonl')]
    steps = [r for r in recs if r.get('type') == 'train']
    if len(steps) < total:
        raise SystemExit(f'only {len(steps)} of {total} steps were logged')
    timed = steps[args.warmup:]
    img_s = len(timed) / sum(1 / r['img_s'] for r in timed)  # total images / total time (equal batches)
    data = sum(r['data_time'] for r in timed) / len(timed)
    peak = max(r['peak_mem_mb'] for r in steps)
    print(f'{args.method}: {img_s:.1f} img/s over {len(timed)} steps (after {args.warmup} warm-up), '
          f'data wait {data * 1e3:.1f} ms/step, peak memory {peak:.0f} MiB')
    return img_s, peak


if __name__ == '__main__':
    main()
