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
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.knn import KnnMonitor
from common.log import TrainMeter, start_run
from common.resnet import build_resnet

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='RotNet (rotation prediction) pre-training',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    g.add_argument('--arch', default='resnet50', help='resnet10|18|34|50|101|152 (torchvision names)')
    g.add_argument('--width', type=int, default=64, help='ResNet base width (64 = torchvision)')
    g.add_argument('--cifar-stem', action='store_true', help='3x3 stride-1 conv1, no max-pool (32x32 data)')
    g = p.add_argument_group('optimisation (OpenSelfSup rotation_pred/r50.py)')
    g.add_argument('--epochs', type=int, default=70)
    g.add_argument('-b', '--batch-size', type=int, default=128,
                   help='GLOBAL batch of *images* over all processes (each process takes batch/world); '
                        'the network sees 4 rotated copies of each')
    g.add_argument('--lr', type=float, default=0.4,
                   help='LR for a global batch of 256 images (1024 rotated copies); scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[30, 50], help='x0.1 at these epochs')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear warm-up, per iteration')
    g.add_argument('--warmup-ratio', type=float, default=0.1, help='warm-up starts at this fraction of the LR')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-4, help='weight decay')
    g.add_argument('--param-group', type=optim.parse_param_group, action='append', default=[],
                   metavar='REGEX:key=value[,...]', help='options for parameters whose name matches '
                   'REGEX (keys lr_mult, weight_decay, momentum); repeatable')
    g = p.add_argument_group('data and speed')
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    g.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision')
    g.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto')
    g.add_argument('--seed', type=int, default=None, help='random seed (drawn and logged when omitted)')
    g.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower on GPU)')
    g = p.add_argument_group('checkpoints and logging')
    g.add_argument('--output-dir', default='output/rotation')
    g.add_argument('--resume', default='', help="checkpoint path, or 'auto' for output-dir/checkpoint_last.pth")
    g.add_argument('--save-freq', type=int, default=10, help='keep checkpoint_EEEE.pth every N epochs')
    g.add_argument('--save-iters', type=int, default=0, help='also checkpoint every N iterations (0 = epoch ends only)')
    g.add_argument('--max-steps', type=int, default=0, help='stop (with a checkpoint) after N steps in all; for smoke tests/benchmarks')
    g.add_argument('--print-freq', type=int, default=10)
    g.add_argument('--knn-every', type=int, default=0, help='weighted-kNN monitor every N epochs on the val split (0 = off)')
    g.add_argument('--knn-k', type=int, default=200)
    g.add_argument('--tensorboard', action='store_true', help='also write TensorBoard scalars (needs tensorboard)')
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
    rank, world, device = dist.init_distributed(args.device)
    ckpt_path, ckpt = checkpoint.open_resume(args)
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    train_set, sampler, loader = train_loader(args.data, rotation_augmentation(args.crop_size), args.batch_size,
                                              rank, world, args.seed, args.workers, device)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'images = {4 * args.batch_size} rotated copies ({local_bs} images per process)')

    # ============ model ============
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem)
    model = RotationPred(backbone).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    core = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256 (per image, not per rotated copy)')
    groups = optim.param_groups(core, args.param_group, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    start_epoch, start_iter, knn_random = 0, 0, None
    if ckpt:
        start_epoch, start_iter = checkpoint.restore(ckpt, ckpt_path, core, optimizer, scaler, log)
        knn_random = ckpt.get('knn_random')
        del ckpt

    def save(epoch, it, keep=False):
        state = checkpoint.training_state(core, 'backbone.', optimizer, scaler, epoch, it, args, git,
                                          knn_random=knn_random)
        if dist.is_main():
            checkpoint.save_training(state, args.output_dir, epoch, keep)

    knn = None
    if args.knn_every:
        knn = KnnMonitor(args.data, args.crop_size, args.knn_k, args.workers, device)
        if knn_random is None:
            knn_random = knn(copy.deepcopy(core.backbone))  # the same network at initialisation
            log.print(f'kNN top-1 of the randomly initialised backbone: {knn_random:.2f}')

    # ============ training loop ============
    rec = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        stopped = train_one_epoch(loader, model, optimizer, scaler, epoch, start_iter, iters, lr, args, device,
                                  log, save)
        start_iter = 0
        if stopped:
            break
        rec = {}
        if knn and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            rec = dict(knn_top1=knn(core.backbone), knn_random=knn_random)
            log.print(f'epoch {epoch}: kNN top-1 {rec["knn_top1"]:.2f} (random init {knn_random:.2f})')
            log.record(type='knn', epoch=epoch, **rec)
        save(epoch + 1, 0, keep=(epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs)

    # ============ save the backbone ============
    if dist.is_main():
        checkpoint.save_backbone(core.backbone, os.path.join(args.output_dir, 'backbone.pth'))
        log.print(f'backbone (torchvision names, no fc) saved to {args.output_dir}/backbone.pth')
        if knn and rec:
            log.print(f'weighted kNN top-1 (k={args.knn_k}): trained {rec["knn_top1"]:.2f}  '
                      f'random init {knn_random:.2f}')
    log.close()
    dist.cleanup()
    return core


def train_one_epoch(loader, model, optimizer, scaler, epoch, start_iter, iters, base_lr, args, device, log,
                    save):
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    meter = TrainMeter(log, epoch, iters, args.batch_size, device, args.print_freq)
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, False, args.schedule,
                         warmup_epochs=args.warmup_epochs, warmup_ratio=args.warmup_ratio)
        optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)  # NxCxHxW, one augmented view per image
        with torch.autocast(**amp):
            logits, labels = model(images)              # 4Nx4, 4N
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (logits.detach().argmax(1) == labels).float().mean() * 100  # rotation classified right
        meter.step(it, lr, loss=loss, acc=acc)
        step = epoch * iters + it + 1
        if args.save_iters and step % args.save_iters == 0 and it + 1 < iters:
            save(epoch, it + 1)
        if args.max_steps and step >= args.max_steps:
            if it + 1 < iters:
                save(epoch, it + 1)
            else:
                save(epoch + 1, 0)
            log.print(f'--max-steps {args.max_steps} reached')
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
