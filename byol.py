#!/usr/bin/env python
"""BYOL: Bootstrap Your Own Latent.

Grill et al., "Bootstrap your own latent: A new approach to self-supervised Learning", NeurIPS 2020
(arXiv:2006.07733). Reference code: OpenSelfSup (configs/selfsup/byol/r50_bs256_ep200.py,
models/byol.py, necks.py NonLinearNeckV2, heads/latent_pred_head.py, hooks/byol_hook.py) and
lucidrains/byol-pytorch v0.8.2. Spec: methods.md §3.

  python byol.py                                    # demo: shipped CIFAR-10 sample, CPU, ~15 min
  python byol.py /data/imagenet                     # OpenSelfSup r50_bs256_ep200 recipe, 1 process
  torchrun --nproc_per_node=8 byol.py /data/imagenet                      # the same on 8 GPUs (SyncBN)
  torchrun --nproc_per_node=8 byol.py -b 512 --accum-steps 8 --warmup-epochs 10 /data/imagenet
      # the paper's batch 4096 on 8 GPUs: LR 0.2 x 4096/256 = 3.2 (OSS's 4096 config,
      # r50_bs256_accumulate16_ep300, uses 4.8 = --lr 0.3, --wd 1e-6 --tau 0.99 --epochs 300)

The model, as OpenSelfSup (which matches the paper where they differ from lucidrains):
  * loss per pair 2 - 2cos(p, z') summed over the two directions (view-1 prediction vs view-2 target
    and back), mean over the batch: the paper's / lucidrains' constant, range [0, 8]. OpenSelfSup
    reports -2cos (= ours - 4); the constant changes no gradient;
  * each view is its own BN batch: the two views go through online, predictor and target separately,
    never as one concatenated 2N batch (lucidrains concatenates, which changes the loss);
  * target = EMA of online backbone + projector, tau_k = 1 - (1 - tau0)(cos(pi k/K) + 1)/2 over
    optimizer steps k = 0..K-1, applied after the optimizer step of step k (OSS BYOLHook);
  * LARS (OSS definition) with BN and bias excluded from weight decay and adaptation, cosine LR per
    epoch, linear warm-up per step from ratio 1e-4 over 2 epochs (OSS; the paper warms up 10).
Deviations, see README:
  * --lr is per 256 images, scaled linearly with the effective batch (batch x accum-steps); the paper
    states it the same way (0.2 x B/256), OSS configs give it absolute;
  * with --accum-steps, tau's k and K and the LR schedule count optimizer steps (OSS counts
    micro-batches for tau); an epoch's last iters % accum-steps micro-batches are dropped, so a window
    never spans two epochs and checkpoints fall on optimizer steps;
  * blur is off below 64 px (the CIFAR practice; --blur forces it); several CUDA processes use SyncBN
    (the paper's cross-replica BN; OSS uses per-GPU BN, 32 images); on one process BN sees the
    whole per-view batch.
"""
import argparse
import contextlib
import copy
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive
from common.resnet import build_resnet

WARMUP_RATIO = 1e-4  # OSS r50_bs256_ep200: linear warm-up starts at 1e-4 x LR

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='BYOL pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm over all processes (the paper\'s cross-replica BN); None = on with '
                        'several CUDA processes')
    g = p.add_argument_group('BYOL')
    g.add_argument('--hidden-dim', type=int, default=4096, help='hidden width of projector and predictor')
    g.add_argument('--dim', type=int, default=256, help='output width of projector and predictor')
    g.add_argument('--tau', type=float, default=0.996, help='base target EMA rate tau0 (cosine to 1)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=200)
    g.add_argument('-b', '--batch-size', type=positive(int), default=256,
                   help='GLOBAL batch of one forward over all processes (each takes batch/world)')
    g.add_argument('--accum-steps', type=int, default=1,
                   help='optimizer step every N batches (gradient accumulation): effective batch = batch x N')
    g.add_argument('--lr', type=positive(float), default=0.2, help='LR per 256 images of the effective batch; scaled linearly')
    g.add_argument('--warmup-epochs', type=float, default=2, help='linear warm-up, per optimizer step')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1.5e-6, help='weight decay (LARS: not on BN and bias)')
    optim.add_optimizer_arg(g)
    optim.add_param_group_arg(g, note='after the BN/bias exclusions')
    g = add_run_args(p, 'output/byol', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--blur', action=argparse.BooleanOptionalAction, default=None,
                   help='Gaussian blur in the views; None = on from 64 px crops')
    return p


# demo: the recipe that beats random init on the 5,000-image sample in ~15 CPU-minutes (2 cores)
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32,
            hidden_dim=512, dim=128, tau=0.99, lr=1.0, epochs=24, workers=2, knn_every=6, save_freq=6,
            output_dir='output/byol_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model and loss ============


def mlp(in_dim, hidden_dim, out_dim):
    """Projector / predictor (OSS NonLinearNeckV2, paper §3.3): Linear -> BN -> ReLU -> Linear. The BN is
    named bn0 so that common.optim.LARS_EXCLUDE_RULES exempts it from weight decay and LARS."""
    return nn.Sequential(OrderedDict(fc0=nn.Linear(in_dim, hidden_dim), bn0=nn.BatchNorm1d(hidden_dim),
                                     relu0=nn.ReLU(inplace=True), fc1=nn.Linear(hidden_dim, out_dim)))


def byol_loss(p1, p2, z1, z2):
    """Symmetric BYOL loss: mean over the batch of (2 - 2cos(p1, z2)) + (2 - 2cos(p2, z1)).

    p1, p2: NxD online predictions of view 1 and 2; z1, z2: NxD target projections (no gradient).
    Both sides are L2-normalised; the value lies in [0, 8]. OpenSelfSup logs -2cos (this minus 4).
    """
    def pair(p, z):  # half precision (AMP) goes up to fp32, fp32/fp64 stay
        dtype = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)
        return 2 - 2 * (F.normalize(p.to(dtype), dim=1) * F.normalize(z.to(dtype), dim=1)).sum(1)  # N
    return (pair(p1, z2) + pair(p2, z1)).mean()


def tau_at(k, total, tau0):
    """EMA rate after optimizer step k of `total` (OSS BYOLHook): tau0 at k=0, rising to 1 at k=total."""
    return 1 - (1 - tau0) * (math.cos(math.pi * k / total) + 1) / 2


class BYOL(nn.Module):
    """Online network (backbone + projector) with a predictor, and a target network (EMA copy of
    backbone + projector, no gradient).

    `backbone` maps images to NxF features (common.resnet.ResNet with fc=Identity: F = feat_dim).
    forward(x1, x2) -> loss; each view is forwarded as its own batch (BN statistics per view).
    """

    def __init__(self, backbone, feat_dim=None, hidden_dim=4096, dim=256):
        super().__init__()
        feat_dim = feat_dim or backbone.feat_dim
        self.online = nn.Sequential(OrderedDict(backbone=backbone, projector=mlp(feat_dim, hidden_dim, dim)))
        self.predictor = mlp(dim, hidden_dim, dim)
        for m in self.online.projector.modules():  # OSS: projector Kaiming fan_in, predictor N(0, 0.01)
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)
        for m in self.predictor.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self.target = copy.deepcopy(self.online)  # starts as a copy and gets no gradient
        for p in self.target.parameters():
            p.requires_grad = False
        self.emb_std = None  # per-dimension std of the last batch's normalised projections (collapse monitor)

    def forward(self, x1, x2):
        y1, y2 = self.online(x1), self.online(x2)  # NxD each: two BN batches, as OSS (not one of 2N)
        p1, p2 = self.predictor(y1), self.predictor(y2)
        with torch.no_grad():
            z1, z2 = self.target(x1), self.target(x2)
            self.emb_std = F.normalize(y1.detach().float(), dim=1).std(0, correction=0).mean()
        return byol_loss(p1, p2, z1, z2)

    @torch.no_grad()
    def update_target(self, tau):
        """xi <- tau xi + (1 - tau) theta over parameters; BN statistics are the target's own."""
        optim.ema_update(self.target, self.online, tau)


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'byol')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)
    # ============ data ============
    accum = args.accum_steps
    sync_bn = (world > 1 and device.type == 'cuda') if args.sync_bn is None else args.sync_bn
    if sync_bn and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA devices; drop it on CPU')
    blur = args.crop_size >= 64 if args.blur is None else args.blur  # no blur on 32-px data
    views = augment.MultiView(augment.byol(args.crop_size, 1, blur), augment.byol(args.crop_size, 2, blur))
    train_set, sampler, loader = train_loader(args.data, views, args.batch_size, rank, world, args.seed,
                                              args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    if sampler.iters < accum:
        raise SystemExit(f'--accum-steps {accum} needs {accum} batches per epoch; the data gives {sampler.iters}')
    sampler.iters -= sampler.iters % accum  # whole accumulation windows per epoch (drop_last for windows)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters // accum} optimizer steps/epoch of '
              f'{args.batch_size * accum} images ({accum} x {args.batch_size}, {args.batch_size // world} per '
              f'process and view), BN {"synchronised" if sync_bn else "per process"}, blur {"on" if blur else "off"}')

    # ============ model ============
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem)
    model = BYOL(backbone, hidden_dim=args.hidden_dim, dim=args.dim)
    model, core = dist.place(model, device, sync_bn)  # BN running statistics per process; rank 0's saved

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size * accum)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size * accum}/256')
    optimizer = optim.lars_or_sgd(core, args, lr, log.print)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'online.backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.online, core.predictor, core.target, loader)  # --compile
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, lr, args,
                           device, log, run):
            break  # --max-steps
        run.start_iter = 0
        run.epoch_end(epoch)
    run.finish()
    return core


def train_one_epoch(loader, model, core, optimizer, scaler, epoch, start_iter, iters, base_lr, args, device,
                    log, run):
    """One epoch of `iters` batches from batch `start_iter` (a multiple of --accum-steps); every
    --accum-steps batches make one optimizer step, and the LR schedule, tau and --max-steps,
    --save-iters, --print-freq count those steps. Returns True when --max-steps was reached."""
    model.train()
    accum = args.accum_steps
    steps = iters // accum  # optimizer steps per epoch
    total = args.epochs * steps  # K of the tau schedule
    meter = run.train_meter(epoch, steps, args.batch_size * accum)
    fmt = memory_format(device)
    loss_sum = 0.0
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        if it % accum == 0:
            meter.data_ready()  # data time: waiting for a window's first batch
        x1 = images[0].to(device, non_blocking=True, memory_format=fmt)  # view 1: blur p=1, no solarize
        x2 = images[1].to(device, non_blocking=True, memory_format=fmt)  # view 2: blur p=0.1, solarize 0.2
        last = (it + 1) % accum == 0
        sync = model.no_sync() if not last and model is not core else contextlib.nullcontext()
        with sync:  # DDP all-reduces the gradients of a window's last batch only
            with autocast(args, device):
                loss = model(x1, x2)
            scaler.scale(loss / accum).backward()  # mean over the effective batch
        loss_sum = loss_sum + loss.detach()
        if not last:
            continue
        k = epoch * steps + it // accum  # this optimizer step, 0-based
        lr = optim.lr_at(base_lr, epoch, it // accum, steps, args.epochs, cos=True,
                         warmup_epochs=args.warmup_epochs, warmup_ratio=WARMUP_RATIO)
        optim.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        tau = tau_at(k, total, args.tau)
        core.update_target(tau)  # after the optimizer step (OSS hook order)
        meter.step(it // accum, lr, loss=loss_sum / accum, tau=tau, emb_std=core.emb_std)
        loss_sum = 0.0
        if run.step_end(k + 1, epoch, it, iters):  # counts optimizer steps, saves at batch it + 1
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
