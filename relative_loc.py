#!/usr/bin/env python
"""Relative patch location (context prediction).

Doersch et al., "Unsupervised Visual Representation Learning by Context Prediction", ICCV 2015
(arXiv:1505.05192). Reference code: OpenSelfSup (configs/selfsup/relative_loc/r50.py, the ResNet-50
recipe used by default here; the paper's AlexNet recipe differs, see methods.md §8). Spec: methods.md §8.

  python relative_loc.py                                # demo: shipped CIFAR-10 sample, CPU, ~10 min
  python relative_loc.py /data/imagenet                 # OpenSelfSup recipe on 1 process
  torchrun --nproc_per_node=8 relative_loc.py /data/imagenet      # OpenSelfSup recipe, 8 GPUs

Each image is resized, randomly cropped to a square split into a 3x3 grid and turned grey with
p=0.66 (OpenSelfSup's replacement for the paper's colour projection/dropping); from every cell a randomly placed smaller patch is cut (the jitter leaves random gaps
between patches). Each of the 8 outer patches is paired with the centre patch, channels
[neighbour, centre] (6 channels), labelled 0..7 in row-major order of the neighbour's cell
(the centre skipped). A shared backbone encodes both patches, the two layer4 maps are concatenated
on channels and average-pooled, and a neck (fc-BN-ReLU-Dropout) + linear head predicts the label.

Geometry, from one size --crop-size (the side of the grid crop; OpenSelfSup: 255):
  cell = round(crop/3), patch = round(cell * 64/85), resize = round(3 cell * 292/255)
  --crop-size 255: resize 292 -> crop 255 -> cells 85 -> patches 64 (jitter 21, gaps 0-42 px)
  --crop-size 32:  resize 38  -> crop 33  -> cells 11 -> patches 8  (jitter 3,  gaps 0-6 px)
The proportions (patch/cell 0.75, resize/crop 1.15) are OpenSelfSup's; a 32x32 CIFAR image is
upsampled to 38 px first, just as ImageNet images are resized to 292.

Batch and LR: --batch-size counts *images* (global, over all processes); each gives 8 pairs, i.e.
16 patches through the backbone. --lr is per 256 images, scaled linearly with the global batch.
OpenSelfSup trains 64 images x 8 pairs x 8 GPUs = 512 images (4096 pairs) at LR 0.2, which is
--lr 0.1 per 256 images (= 0.0125 per 256 pairs); those are the defaults.

Deviations from OpenSelfSup (see README):
  * --lr is per 256 images and scaled linearly (OpenSelfSup: absolute LR for its batch of 512);
  * neck width (--neck-dim, default 4096 as OpenSelfSup) and geometry (--crop-size) are flags;
  * the kNN monitor (--knn-every) scores the backbone on whole images, not patches;
  * one process computes BN statistics over its whole batch (OpenSelfSup: per GPU, 512 pairs).
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import augment, batch_aug as B, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, positive
from common.resnet import build_resnet

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='Relative patch location pre-training',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--neck-dim', type=int, default=4096, help='width of the neck fc-BN-ReLU-Dropout')
    g = p.add_argument_group('optimisation (OpenSelfSup relative_loc/r50.py)')
    g.add_argument('--epochs', type=positive(int), default=70)
    g.add_argument('-b', '--batch-size', type=positive(int), default=512,
                   help='GLOBAL batch of *images* over all processes (each process takes batch/world); '
                        'each image gives 8 patch pairs')
    g.add_argument('--lr', type=positive(float), default=0.1, help='LR for a global batch of 256 images (2048 pairs); '
                   'scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[30, 50], help='x0.1 at these epochs')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear warm-up, per iteration')
    g.add_argument('--warmup-ratio', type=float, default=0.1, help='warm-up starts at this fraction of the LR')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-4, help='weight decay of the backbone')
    g.add_argument('--neck-wd', type=float, default=5e-4, help='weight decay of neck and head')
    optim.add_param_group_arg(g, note='override --neck-wd')
    g = add_run_args(p, 'output/relative_loc', device_aug=True)
    g.add_argument('--crop-size', type=int, default=255,
                   help='side of the square split into 3x3 cells; sets the whole patch geometry (see the '
                        'docstring; 32 for CIFAR)')
    return p


# demo: the OpenSelfSup recipe shortened to ~10 CPU-minutes on the 5,000-image sample (8-px patches)
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, neck_dim=512,
            batch_size=128, lr=0.1, epochs=30, schedule=[20, 25], warmup_epochs=2, workers=2, knn_every=10,
            save_freq=10, output_dir='output/relative_loc_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ patch pairs (the data side of the pretext task) ============

NEIGHBOURS = [0, 1, 2, 3, 5, 6, 7, 8]  # grid cells (row-major) of labels 0..7; cell 4 is the centre


def geometry(crop_size):
    """(resize, grid, cell, patch) in OpenSelfSup's proportions (292 -> 255 = 3 x 85 -> 64)."""
    cell = round(crop_size / 3)
    patch = round(cell * 64 / 85)
    return round(3 * cell * 292 / 255), 3 * cell, cell, patch


def grid_patches(img, cell, patch):
    """The 9 patches (row-major) of a PIL image of at least 3 cell x 3 cell px: from each cell a
    patch x patch crop at a random offset in [0, cell - patch] per axis (torch RNG)."""
    out = []
    for r in range(3):
        for c in range(3):
            dy, dx = torch.randint(0, cell - patch + 1, (2,)).tolist()
            top, left = r * cell + dy, c * cell + dx
            out.append(img.crop((left, top, left + patch, top + patch)))
    return out


class PatchPairs:
    """PIL image -> 8x6xPxP tensor: pair k = [neighbour NEIGHBOURS[k], centre] on channels.

    OpenSelfSup relative_loc: Resize -> RandomCrop(grid) -> RandomGrayscale(0.66) on the whole image,
    3x3 grid, jittered patch per cell, ToTensor + Normalize per patch.
    """

    def __init__(self, crop_size=255, gray_p=0.66):
        self.resize, self.grid, self.cell, self.patch = geometry(crop_size)
        if self.patch < 1 or self.cell - self.patch < 1:
            raise ValueError(f'--crop-size {crop_size} is too small for 3x3 cells with jittered patches '
                             f'(cell {self.cell}, patch {self.patch}); use at least 8')
        self.image = T.Compose([T.Resize(self.resize), T.RandomCrop(self.grid), T.RandomGrayscale(gray_p)])
        self.to_tensor = T.Compose([T.ToTensor(), augment.normalize])

    def __call__(self, img):
        p = [self.to_tensor(x) for x in grid_patches(self.image(img), self.cell, self.patch)]
        return torch.stack([torch.cat([p[i], p[4]]) for i in NEIGHBOURS])  # 8x6xPxP

    def __repr__(self):
        return (f'PatchPairs(resize {self.resize}, crop {self.grid}, cells {self.cell}, patches {self.patch}, '
                f'{self.image.transforms[2]})')

    def batched(self):
        """The same transform for uint8 batches on the device (--device-aug)."""
        return BatchedPatchPairs(self.resize, self.grid, self.cell, self.patch, self.image.transforms[2].p)


@functools.lru_cache(maxsize=64)
def resize_matrix(n, o):
    """PIL's bilinear resize of n pixels to o as an o x n matrix (made once per size pair)."""
    return B.resample_weights(torch.zeros(1), torch.tensor([float(n)]), n, o, 'bilinear')[0]


class BatchedPatchPairs:
    """PatchPairs for a batch of uint8 images (NxCxHxW, or a list of CxHxW) on any device:
    pairs(images, gen) -> Nx8x6xPxP. Resize + RandomCrop + the 9 patch crops are read off PIL's
    resize weights (common.batch_aug.resample_weights): each patch's rows and columns are rows of the
    resized image's weight matrices, so a patch costs two small matrix products and no full-size
    resize; the values are PIL's resize without its uint8 rounding between the passes."""

    def __init__(self, resize, grid, cell, patch, gray_p):
        self.resize, self.grid, self.cell, self.patch, self.gray_p = resize, grid, cell, patch, gray_p

    def out_size(self, h, w):
        """torchvision Resize(int): shorter side -> resize, the other int(resize * long / short)."""
        if h <= w:
            return self.resize, int(self.resize * w / h)
        return int(self.resize * h / w), self.resize

    def sample(self, sizes, gen):
        """Per image: RandomCrop offset (top, left) in the resized image, per cell the patch offset
        (dy, dx) in [0, cell - patch], and the grey switch; torchvision's draws, in distribution."""
        n = len(sizes)
        out = torch.tensor([self.out_size(int(h), int(w)) for h, w in sizes])  # Nx2 resized (h, w)
        span = (out - self.grid + 1).double()
        tl = torch.floor(torch.rand(n, 2, generator=gen, dtype=torch.float64) * span).long()  # Nx2
        off = torch.randint(0, self.cell - self.patch + 1, (n, 9, 2), generator=gen)  # Nx9x2 (dy, dx)
        return dict(out=out, tl=tl, off=off, gray=B.bernoulli(n, self.gray_p, gen))

    def _patches(self, x, out, tl, off):
        """x: NxCxHxW float, one size; out: its resized (h, w); tl: Nx2; off: Nx9x2 -> Nx9xCxPxP
        patches (row-major cells)."""
        _, _, h, w = x.shape
        cells = torch.arange(3) * self.cell
        weights = []
        for axis, (n, o) in enumerate(((h, int(out[0])), (w, int(out[1])))):
            full = resize_matrix(n, o)
            cell = cells.repeat_interleave(3) if axis == 0 else cells.repeat(3)  # cell row / column of 0..8
            first = tl[:, axis, None] + cell + off[:, :, axis]  # Nx9 patch starts in the resized image
            weights.append(B.to_device(full[first[..., None] + torch.arange(self.patch)], x.device))  # Nx9xPxn
        wy, wx = weights
        p = (x[:, None] @ wx.transpose(-1, -2)[:, :, None]).clamp_(0, 1)  # Nx9xCxHxP (columns first, as PIL)
        return (wy[:, :, None] @ p).clamp_(0, 1)  # Nx9xCxPxP

    def apply(self, images, params):
        x = B.to_float(images)
        if isinstance(x, list):  # any sizes: one image at a time
            patches = torch.cat([self._patches(xi[None], params['out'][i], params['tl'][i:i + 1],
                                               params['off'][i:i + 1]) for i, xi in enumerate(x)])
        else:
            patches = self._patches(x, params['out'][0], params['tl'], params['off'])
        gray = B.rgb_to_gray(patches.flatten(0, 1)).view(*patches.shape[:2], 1, *patches.shape[3:])
        on = B.to_device(params['gray'], patches.device).view(-1, 1, 1, 1, 1)
        patches = torch.where(on, gray.expand_as(patches), patches)
        patches = B.normalize(patches.flatten(0, 1), augment.IMAGENET_MEAN, augment.IMAGENET_STD).view_as(patches)
        centre = patches[:, 4:5].expand(-1, 8, -1, -1, -1)
        return torch.cat([patches[:, NEIGHBOURS], centre], 2)  # Nx8x6xPxP: [neighbour, centre]

    def __call__(self, images, gen):
        return self.apply(images, self.sample(B.image_sizes(images), gen))


# ============ model ============


class RelativeLoc(nn.Module):
    """Shared backbone on both patches of a pair, late fusion, neck, 8-way head (OpenSelfSup RelativeLoc).

    backbone: a ResNet with forward_stages() and feat_dim (common.resnet). forward(pairs) takes
    Nx8x6xPxP [neighbour, centre] pairs as PatchPairs makes them and returns (logits 8Nx8, labels 8N).
    """

    def __init__(self, backbone, neck_dim=4096, num_classes=8):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Linear(2 * backbone.feat_dim, neck_dim),
                                  nn.BatchNorm1d(neck_dim, momentum=0.003),
                                  nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.head = nn.Linear(neck_dim, num_classes)
        nn.init.normal_(self.neck[0].weight, 0, 0.005)  # OSS 'normal' neck init: N(0, 0.005), bias 0.1
        nn.init.constant_(self.neck[0].bias, 0.1)
        nn.init.normal_(self.head.weight, 0, 0.005)     # OSS head: N(0, 0.005), bias 0
        nn.init.zeros_(self.head.bias)

    def layer4(self, x):
        fmt = torch.channels_last if x.is_cuda else torch.contiguous_format
        return self.backbone.forward_stages(x.contiguous(memory_format=fmt))[-1]

    def forward(self, pairs):
        n, k = pairs.shape[:2]
        x = pairs.flatten(0, 1)                                         # 8Nx6xPxP, image-major
        # two passes (as OpenSelfSup): neighbours and centres each get their own BN batch statistics
        f = torch.cat([self.layer4(x[:, :3]), self.layer4(x[:, 3:])], dim=1)  # 8Nx2Cxhxw
        logits = self.head(self.neck(f.mean((2, 3))))      # 8Nx8
        labels = torch.arange(k, device=pairs.device).repeat(n)             # 0..7, 0..7, ...
        return logits, labels


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'relative_loc')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    try:
        pairs = PatchPairs(args.crop_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    train_set, sampler, loader = train_loader(args.data, pairs, args.batch_size, rank, world, args.seed,
                                              args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'images = {8 * args.batch_size} pairs ({local_bs} images per process); {pairs}')

    # ============ model ============
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem)
    model, core = dist.place(RelativeLoc(backbone, args.neck_dim), device, sync_buffers=True)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256 (per image, not per pair)')
    rules = [(r'^(neck|head)\.', {'weight_decay': args.neck_wd})] + args.param_group  # OSS paramwise_options
    groups = optim.param_groups(core, rules, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set,
              knn_size=args.crop_size if args.crop_size < 64 else 224)  # whole images, as eval/knn.py sees them
    compile_modules(args, core, loader)  # --compile (the forward calls backbone.forward_stages)
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, optimizer, scaler, epoch, run.start_iter, iters, lr, args, device,
                           log, run):
            break  # --max-steps
        run.start_iter = 0
        run.epoch_end(epoch)
    run.finish()
    return core


def train_one_epoch(loader, model, optimizer, scaler, epoch, start_iter, iters, base_lr, args, device, log,
                    run):
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    for it, (pairs, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, False, args.schedule,
                         warmup_epochs=args.warmup_epochs, warmup_ratio=args.warmup_ratio)
        optim.set_lr(optimizer, lr)
        pairs = pairs.to(device, non_blocking=True)  # Nx8x6xPxP
        with autocast(args, device):
            logits, labels = model(pairs)             # 8Nx8, 8N
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (logits.detach().argmax(1) == labels).float().mean() * 100  # position classified right
        meter.step(it, lr, loss=loss, acc=acc)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
