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


def make_jpeg_set(data, out, images, size=(500, 375), quality=90, workers=8):
    """Writes `images` train images of `data`, spread evenly over it, as size[0] x size[1] JPEGs into
    out/train/<class>/; returns out."""
    samples, classes = scan(data)
    if len(samples) < images:
        raise SystemExit(f'{data}: {len(samples)} train images, fewer than the {images} asked for')
    step = len(samples) // images
    jobs = []
    for path, label in samples[::step][:images]:
        d = Path(out) / 'train' / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((path, d / (Path(path).stem + '.jpg'), tuple(size), quality))
    with Pool(workers) as pool:
        pool.map(_convert, jobs, chunksize=64)
    return out


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
    make_jpeg_set(args.data, args.out, args.images, args.size, args.quality, args.workers)
    print(f'{args.images} JPEGs of {args.size[0]}x{args.size[1]} in {args.out}')


if __name__ == '__main__':
    main()
