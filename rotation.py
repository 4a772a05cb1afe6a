#!/usr/bin/env python
"""RotNet: unsupervised representation learning by predicting image rotations.

Gidaris et al., "Unsupervised Representation Learning by Predicting Image Rotations", ICLR 2018
(arXiv:1803.07728). Reference code: gidariss/FeatureLearningRotNet (AlexNet) and OpenSelfSup
(configs/selfsup/rotation_pred/r50.py, the ResNet-50 recipe used by default here). Spec: methods.md §7.

  python rotation.py                                    # demo: shipped CIFAR-10 sample, CPU, ~10 min
  python rotation.py /data/imagenet                     # OpenSelfSup recipe on 1 process
  torchrun --nproc_per_node=8 rotation.py /data/imagenet          # OpenSelfSup recipe, 8 GPUs

Every image is augmented once (RandomResizedCrop + flip), then all four rotations by 0/90/180/270
degrees counter-clockwise (label k = torch.rot90(x, k) in the (H, W) plane) go into the same batch,
image-major: rows 4i..4i+3 hold image i rotated by k = 0..3. A linear head on the pooled backbone
feature predicts k (4-way cross-entropy).

Batch and LR: --batch-size counts *images* (global, over all processes); the network sees 4x as
many rotated copies per step. --lr is per 256 images and scaled linearly with the global batch.
OpenSelfSup trains 16 images x 4 rotations x 8 GPUs = 128 images (512 rotated copies) at LR 0.2,
which is --lr 0.4 per 256 images (= 0.1 per 256 rotated copies); those are the defaults.

Deviations from OpenSelfSup (see README):
  * the rotations are made on the device from the augmented batch (OpenSelfSup: in the dataset);
    values, order and labels are the same, the loader moves 4x less data;
  * --lr is per 256 images and scaled linearly (OpenSelfSup: absolute LR for its batch of 128);
  * one process computes BN statistics over its whole batch (OpenSelfSup: per GPU, 64 copies).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, positive
from common.resnet import build_resnet

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='RotNet (rotation prediction) pre-training',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g = p.add_argument_group('optimisation (OpenSelfSup rotation_pred/r50.py)')
    g.add_argument('--epochs', type=positive(int), default=70)
    g.add_argument('-b', '--batch-size', type=positive(int), default=128,
                   help='GLOBAL batch of *images* over all processes (each process takes batch/world); '
                        'the network sees 4 rotated copies of each')
    g.add_argument('--lr', type=positive(float), default=0.4,
                   help='LR for a global batch of 256 images (1024 rotated copies); scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[30, 50], help='x0.1 at these epochs')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear warm-up, per iteration')
    g.add_argument('--warmup-ratio', type=float, default=0.1, help='warm-up starts at this fraction of the LR')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-4, help='weight decay')
    optim.add_param_group_arg(g)
    g = add_run_args(p, 'output/rotation', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    return p


# demo: the OpenSelfSup recipe shortened to ~10 CPU-minutes on the 5,000-image sample (32-px crops)
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32,
            batch_size=128, lr=0.4, epochs=8, schedule=[6], warmup_epochs=1, workers=2, knn_every=4,
            save_freq=4, output_dir='output/rotation_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


def rotation_augmentation(size=224):
    """OpenSelfSup rotation_pred/r50.py train pipeline: RandomResizedCrop (scale 0.08-1) + flip,
    applied once per image, *before* the four rotations."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), augment.normalize])


# ============ model ============


def rotate_four(img):
    """NxCxHxW -> (4NxCxHxW, labels 4N): rows 4i..4i+3 hold image i rotated by k = 0, 1, 2, 3 times
    90 degrees counter-clockwise (torch.rot90(x, k) in the (H, W) plane, = np.rot90 and PIL's
    rotate(90 k)), and label k. Square images only (a rotated copy must fit the batch)."""
    if img.shape[-1] != img.shape[-2]:
        raise ValueError(f'rotation prediction needs square images, got {tuple(img.shape[-2:])}')
    x = torch.stack([torch.rot90(img, k, (2, 3)) for k in range(4)], dim=1)  # Nx4xCxHxW
    labels = torch.arange(4, device=img.device).repeat(img.shape[0])        # 0,1,2,3,0,1,2,3,...
    return x.flatten(0, 1), labels


class RotationPred(nn.Module):
    """Backbone + linear 4-way rotation classifier on its pooled feature (OpenSelfSup RotationPred).

    backbone: a ResNet whose `pooled(x)` gives NxD features and whose `feat_dim` is D (common.resnet).
    forward(img) takes one augmented view per image (NxCxHxW) and returns (logits 4Nx4, labels 4N).
    """

    def __init__(self, backbone, num_rotations=4):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat_dim, num_rotations)
        nn.init.kaiming_normal_(self.head.weight, mode='fan_in', nonlinearity='relu')  # OSS head init
        nn.init.zeros_(self.head.bias)

    def forward(self, img):
        x, labels = rotate_four(img)
        if x.is_cuda:  # the stacked copies are NCHW-contiguous; the GPU convs run channels_last
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone.pooled(x)), labels


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'rotation')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    train_set, sampler, loader = train_loader(args.data, rotation_augmentation(args.crop_size), args.batch_size,
                                              rank, world, args.seed, args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'images = {4 * args.batch_size} rotated copies ({local_bs} images per process)')

    # ============ model ============
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem)
    model, core = dist.place(RotationPred(backbone), device, sync_buffers=True)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256 (per image, not per rotated copy)')
    groups = optim.param_groups(core, args.param_group, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core, loader)  # --compile (the forward calls backbone.pooled)
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
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, False, args.schedule,
                         warmup_epochs=args.warmup_epochs, warmup_ratio=args.warmup_ratio)
        optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)  # NxCxHxW, one augmented view per image
        with autocast(args, device):
            logits, labels = model(images)              # 4Nx4, 4N
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (logits.detach().argmax(1) == labels).float().mean() * 100  # rotation classified right
        meter.step(it, lr, loss=loss, acc=acc)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
