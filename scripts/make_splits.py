#!/usr/bin/env python
"""Writes deterministic class-balanced labelled subsets of an image folder for eval/semi.py.

  python scripts/make_splits.py /data/imagenet --fractions 0.01 0.1 --output-dir splits/
  -> splits/1percent.txt, splits/10percent.txt

From each class max(1, round(fraction * n_class)) images are drawn without replacement with a
generator seeded by (--seed, class index): the same folder, fraction and seed always give the same
list. One image per line, `class/file` relative to the train folder, in folder order; eval/semi.py
--split-file reads these as well as SimCLR's ImageNet lists (`n01440764_10026.JPEG` per line).
For ImageNet, SimCLR's published 1%/10% lists (12,811 / 128,116 images) are the standard choice.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # finds common/

from common.data import balanced_subset, scan  # noqa: E402


def train_root(data, split='train'):
    p = Path(data)
    return p / split if (p / split).is_dir() else p


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', help='ImageNet-layout root (its train/ is used) or a folder of class folders')
    p.add_argument('--fractions', type=float, nargs='+', default=[0.01, 0.1], help='labelled fractions')
    p.add_argument('--seed', type=int, default=0, help='seed of the draw')
    p.add_argument('--output-dir', default='splits', help='where <percent>percent.txt files go')
    args = p.parse_args(argv)
    root = train_root(args.data)
    try:
        samples, classes = scan(root)
        subsets = {f: balanced_subset(samples, f, args.seed) for f in args.fractions}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'{args.data}: {e}') from None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f, idx in subsets.items():
        path = out / f'{f * 100:g}percent.txt'
        path.write_text(''.join(os.path.relpath(samples[i][0], root).replace(os.sep, '/') + '\n' for i in idx))
        print(f'{path}: {len(idx)} of {len(samples)} images ({100 * len(idx) / len(samples):.2f}%), '
              f'{len(classes)} classes, seed {args.seed}')


if __name__ == '__main__':
    main()
