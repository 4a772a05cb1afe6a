#!/usr/bin/env python
"""ImageNet-sized JPEGs from a small image set, for loader benchmarks where no ImageNet is at hand.

  python scripts/make_jpeg_set.py .data/cifar10 /tmp/jpeg500 --images 6400 --size 500 375

Copies the first --images train images (spread evenly over the set) into an
ImageNet-layout folder OUT/train/<class>/, each upsampled (bicubic) to --size W H and saved as JPEG
at --quality, so that decoding costs about what an ImageNet image costs (mean ImageNet image: about
400x350, 110 KB). The content is upsampled CIFAR, so the images are smoother than photographs and
compress better; decode time depends mostly on the pixel count.
"""
import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.data import scan  # noqa: E402


def _convert(job):
    src, dst, size, quality = job
    Image.open(src).convert('RGB').resize(size, Image.BICUBIC).save(dst, quality=quality)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='ImageNet-layout source (train/<class>/...)')
    p.add_argument('out', help='output folder (OUT/train/<class>/)')
    p.add_argument('--images', type=int, default=6400)
    p.add_argument('--size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'))
    p.add_argument('--quality', type=int, default=90)
    p.add_argument('-j', '--workers', type=int, default=8)
    args = p.parse_args(argv)
    samples, classes = scan(args.data)
    if len(samples) < args.images:
        raise SystemExit(f'{args.data}: {len(samples)} train images, fewer than --images {args.images}')
    # spread over the classes: every len/images-th sample
    step = len(samples) // args.images
    jobs = []
    for path, label in samples[::step][:args.images]:
        d = Path(args.out) / 'train' / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((path, d / (Path(path).stem + '.jpg'), tuple(args.size), args.quality))
    with Pool(args.workers) as pool:
        pool.map(_convert, jobs, chunksize=64)
    print(f'{len(jobs)} JPEGs of {args.size[0]}x{args.size[1]} in {args.out}')


if __name__ == '__main__':
    main()
