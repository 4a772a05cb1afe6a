#!/usr/bin/env python
"""Time of the dataset scan (with its stat pass: one stat per image) on an ImageNet-sized layout.

  python scripts/bench_scan.py                # 1,281,167 paths in 1000 class folders
  python scripts/bench_scan.py --n 50000 --repeat 1

Builds TMP/train/<class>/<class>_<i>.JPEG as hard links to a small JPEG of the shipped sample (one
copy per class: ext4 allows 65,000 links to a file; fast to make, no space beyond the folder
entries, nonzero size) and a list file TMP/list.txt of the same paths with labels, then times
common.data.scan on both, and for comparison the scan as it was before the stat pass (sorted
os.walk without stat; the list read without stat). The tree has just been written, so the page and
dentry caches are warm: this is the best case; a cold scan on a network file system pays a metadata
round trip per file. The folder is removed afterwards.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.data import SAMPLE_DATA, _is_image, scan  # noqa: E402


def old_scan(p):
    """The folder scan before the stat pass (common/data.py at 2de8299), class folders only."""
    classes = sorted(e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith('.'))
    samples = []
    for label, c in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(p, c), followlinks=True)):
            samples += [(os.path.join(root, n), label) for n in sorted(names) if _is_image(n)]
    return samples


def old_read_list(p):
    """The list read before the stat pass (no format errors here: the bench writes the list)."""
    out = []
    for line in Path(p).read_text().splitlines():
        parts = line.split()
        out.append((str(Path(p).parent / parts[0]), int(parts[1])))
    return out


def make_tree(root, n, n_classes):
    jpg = next((SAMPLE_DATA / 'train' / 'cat').iterdir())
    (root / 'src').mkdir()
    lines = []
    for c in range(n_classes):
        name = f'n{c:08d}'
        d = root / 'train' / name
        d.mkdir(parents=True)
        src = shutil.copy(jpg, root / 'src' / f'{name}.jpg')
        for i in range(n // n_classes + (c < n % n_classes)):
            os.link(src, d / f'{name}_{i}.JPEG')
            lines.append(f'train/{name}/{name}_{i}.JPEG {c}\n')
    (root / 'list.txt').write_text(''.join(lines))


def timed(fn, arg, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - t)
    return min(times), times, len(out[0] if isinstance(out, tuple) else out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=1_281_167, help='number of image paths (ImageNet train: 1,281,167)')
    ap.add_argument('--classes', type=int, default=1000)
    ap.add_argument('--repeat', type=int, default=3, help='timed runs of each; the minimum is reported')
    ap.add_argument('--tmp', default=None, help='folder to build the tree in (default: the system temp folder)')
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix='bench_scan_', dir=args.tmp))
    try:
        t = time.perf_counter()
        make_tree(root, args.n, args.classes)
        print(f'{args.n:,} hard links in {args.classes} folders under {root}: made in {time.perf_counter() - t:.1f} s')
        print('warm page/dentry cache (the tree was just written); seconds, min of', args.repeat)
        for label, fn, arg in (('folder scan, stat pass', scan, root), ('folder scan, before (os.walk)', old_scan,
                               root / 'train'), ('list file, stat pass', scan, root / 'list.txt'),
                               ('list file, before (no stat)', old_read_list, root / 'list.txt')):
            best, times, n = timed(fn, arg, args.repeat)
            assert n == args.n, (label, n)
            print(f'  {label:32s} {best:7.2f} s   ({", ".join(f"{x:.2f}" for x in times)})')
    finally:
        t = time.perf_counter()
        shutil.rmtree(root)
        print(f'removed in {time.perf_counter() - t:.1f} s')


if __name__ == '__main__':
    main()
