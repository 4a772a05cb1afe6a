#!/usr/bin/env python
"""Barlow Twins: self-supervised learning by redundancy reduction.

Zbontar, Jing, Misra, LeCun and Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021 (arXiv:2103.03230). Reference code: facebookresearch/barlowtwins at 8e8d284
(main.py; evaluate.py for the linear protocol). Spec: methods-modern.md §0a, §13.

  python barlowtwins.py                                       # demo: shipped CIFAR-10 sample, CPU (see DEMO)
  torchrun --nproc_per_node=8 barlowtwins.py /data/imagenet   # the recipe below, batch 2048 over 8 GPUs
  torchrun --nnodes=2 --nproc_per_node=8 ... barlowtwins.py --amp fp16 /data/imagenet   # BT:README's 16 GPUs
  python eval/lincls.py --pretrained output/barlowtwins/backbone.pth /data/imagenet   # linear evaluation

The recipe (methods-modern.md §13; explicit flags win):
  * ResNet-50 with zero-initialised residual BNs and no fc (2048-d), projector 8192-8192-8192:
    [Linear without bias -> BN -> ReLU] x 2 -> Linear without bias (BT:main.py:191-202);
  * z1 and z2 are normalised separately by a BN without affine parameters over the GLOBAL batch
    (biased variance), C = BN(z1)^T BN(z2) / B_global (DxD), L = sum_i (1 - C_ii)^2 +
    lambda sum_{i!=j} C_ij^2, lambda 0.0051 (BT:main.py:204-220); C in fp32 under --amp;
  * FAIR LARS (momentum 0.9, eta 0.001; 1-D parameters get neither weight decay nor adaptation), wd
    1e-6 (the code's default, BT:main.py:37; the paper states 1.5e-6), two groups: weights at 0.2 x
    and biases / BN at 0.0048 x the schedule (BT:main.py:33-36,90-101);
  * schedule per step: base = B/256, linear from 0 over 10 warm-up epochs, then a half cosine from
    base to 0.001 x base (BT:main.py:155-168); global batch 2048, 1000 epochs;
  * BYOL's asymmetric views: bicubic crop (0.08, 1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
    grayscale 0.2, blur p=1.0 / 0.1, solarize p=0 / 0.2 (BT:main.py:290-326, common.augment.byol);
  * SyncBN with several CUDA processes (BT:main.py:89); only the backbone is saved (backbone.pth).
Deviations from facebookresearch/barlowtwins:
  * the gradient is that of the global-batch loss at every world size. The reference all-reduces C
    in place, outside autograd (BT:main.py:216): each process back-propagates through its own
    share of C only, and DDP's averaging then scales the gradient by 1/world_size (§0a, §13.7).
    Here the sums over processes (the loss BN's mean and variance, and C) are all-reduces that
    carry gradients (their backward sums too), so with DDP's averaging the applied gradient equals
    one process's on the whole batch (tests/test_barlowtwins.py checks it on 2 processes). LARS's
    trust ratio absorbs most of that scale for the weights, not for the biases and BN parameters;
  * the loss BN is computed by hand (it keeps no running statistics, which the reference's never
    uses), so it also spans the global batch on CPU processes, where SyncBatchNorm does not run
    (the projector's and backbone's BNs are then per process);
  * the loader drops the last incomplete batch (the reference has no drop_last, while it divides C by
    the nominal batch); mixed precision is off unless --amp (the reference always runs fp16);
  * blur is off below 64 px crops (the CIFAR practice; --blur forces it); ResNets are this repo's
    (torchvision names and init, --width / --cifar-stem).
"""
import argparse
import math

import torch
import torch.distributed
import torch.nn as nn

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.resnet import build_resnet
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive

END_LR_RATIO = 0.001  # the cosine ends at 0.1 % of the base LR (BT:main.py:165)
BN_EPS = 1e-5  # nn.BatchNorm1d's, as the reference's loss BN

# ============ arguments ============


def projector_sizes(text):
    """argparse type of --projector: '8192-8192-8192' -> [8192, 8192, 8192] (at least one width)."""
    sizes = [int(s) for s in text.split('-')]
    if not sizes or min(sizes) < 1:
        raise ValueError
    return sizes


projector_sizes.__name__ = 'projector (widths joined by -, e.g. 8192-8192-8192)'


def get_parser():
    p = argparse.ArgumentParser(description='Barlow Twins pre-training',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm in backbone and projector (the reference\'s); None = on with several CUDA '
                        'processes. The loss BN spans the global batch either way')
    g = p.add_argument_group('Barlow Twins')
    g.add_argument('--projector', type=projector_sizes, default='8192-8192-8192',
                   help='widths of the projector\'s Linear layers (BN + ReLU between them)')
    g.add_argument('--lambd', type=float, default=0.0051, help='weight of the off-diagonal terms')
    g = p.add_argument_group('optimisation (FAIR LARS)')
    g.add_argument('--epochs', type=positive(int), default=1000)
    g.add_argument('-b', '--batch-size', type=positive(int), default=2048,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--learning-rate-weights', type=positive(float), default=0.2,
                   help='LR of the weights (ndim > 1) per unit of the schedule, whose base is batch/256')
    g.add_argument('--learning-rate-biases', type=positive(float), default=0.0048,
                   help='LR of biases and BN parameters (ndim 1: no weight decay, no LARS adaptation)')
    g.add_argument('--weight-decay', type=float, default=1e-6, help='weight decay of the weights (paper: 1.5e-6)')
    g.add_argument('--warmup-epochs', type=float, default=10, help='linear warm-up from 0, per step')
    g.add_argument('--momentum', type=float, default=0.9, help='LARS momentum')
    g = add_run_args(p, 'output/barlowtwins', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--blur', action=argparse.BooleanOptionalAction, default=None,
                   help='Gaussian blur in the views; None = on from 64 px crops')
    return p


# demo: the shipped sample at 32 px with a resnet10 of width 32 (as the other demos), a smaller projector
# (solo-learn's CIFAR configs use 2048-2048, methods-modern.md §18.1), 2 warm-up epochs, and both LRs 5x
# the reference's (the 0.2 : 0.0048 ratio kept): FAIR LARS moves a weight by ~lr x 0.001 of its norm per
# step, and ~300 steps at the reference's 0.2 x B/256 barely leave the random init
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, batch_size=256,
            projector='1024-1024-1024', learning_rate_weights=1.0, learning_rate_biases=0.024, warmup_epochs=2,
            epochs=16, workers=2, knn_every=4, save_freq=4, output_dir='output/barlowtwins_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model and loss ============


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)  # every process's copy of the sum passes its gradient back
        return grad


def all_reduce_with_grad(t):
    """Sum over processes whose backward is the same sum of the incoming gradients: every process
    holds the global value and its own copy of everything computed from it, so the gradient of every
    copy reaches every process's share (with DDP's averaging: the gradient of the global loss).
    Identity on one process."""
    return _AllReduceSum.apply(t) if dist.is_dist() else t


def global_batch_norm(z, n):
    """BN without affine parameters over the global batch of `n` rows (this process has z: NxD):
    mean and biased variance summed over processes, with gradient. (z - mean) / sqrt(var + eps)."""
    mean = all_reduce_with_grad(z.sum(0)) / n  # D
    zc = z - mean  # NxD
    var = all_reduce_with_grad(zc.pow(2).sum(0)) / n  # D, biased (1/n), as BN in training mode
    return zc / torch.sqrt(var + BN_EPS)


def off_diagonal(c):
    """The d(d-1) off-diagonal elements of a square dxd matrix, as a view: from element 1 on, the
    flattened matrix in rows of d+1 ends every row with a diagonal element."""
    d = c.shape[0]
    return c.flatten()[1:].view(d - 1, d + 1)[:, :-1]


def barlow_twins_loss(z1, z2, lambd):
    """(loss, on-diagonal sum, off-diagonal sum) of §13.2 for this process's embeddings z1, z2 (NxD)
    of the two views; every process passes its rows and gets the loss of the global batch.
    C = BN(z1)^T BN(z2) / n over the n = N x world rows; loss = sum_i (1 - C_ii)^2 + lambd
    sum_{i!=j} C_ij^2. Computed in fp32 (fp64 stays) outside autocast: at D = 8192 the sum of the
    squares overflows fp16."""
    with torch.autocast(z1.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
        z1, z2 = z1.to(dtype), z2.to(dtype)
        n = z1.shape[0] * dist.get_world_size()  # equal shares: the loader drops incomplete batches
        c = all_reduce_with_grad(global_batch_norm(z1, n).T @ global_batch_norm(z2, n)) / n  # DxD
        on_diag = (c.diagonal() - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


def projector(in_dim, sizes):
    """[Linear (no bias) -> BN -> ReLU] for every width but the last, then Linear (no bias)
    (BT:main.py:194-202); Sequential indices as the reference's."""
    dims, layers = [in_dim, *sizes], []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Backbone (images -> NxF features) and projector (-> NxD); forward(y1, y2) -> the loss of the
    global batch, each view its own BN batch. `terms` holds the last (on-diagonal, off-diagonal)
    sums, detached, for the log."""

    def __init__(self, backbone, sizes=(8192, 8192, 8192), lambd=0.0051, feat_dim=None):
        super().__init__()
        self.lambd = lambd
        self.backbone = backbone
        self.projector = projector(feat_dim or backbone.feat_dim, list(sizes))
        self.terms = None

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1))  # NxD
        z2 = self.projector(self.backbone(y2))  # NxD
        loss, on_diag, off_diag = barlow_twins_loss(z1, z2, self.lambd)
        self.terms = on_diag.detach(), off_diag.detach()
        return loss


def lr_at(step, iters, epochs, warmup_epochs, batch_size):
    """Schedule value at optimizer step `step` (0-based over the run; BT:main.py:155-166): base =
    batch/256, linear from 0 over the warm-up steps, then a half cosine from base to END_LR_RATIO x
    base at the last step. The groups take lr_weights / lr_biases times it."""
    base, total, warm = batch_size / 256, epochs * iters, warmup_epochs * iters
    if step < warm:
        return base * step / warm
    q = 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    return base * q + END_LR_RATIO * base * (1 - q)


def param_groups(model, lr_weights, lr_biases):
    """The two groups of BT:main.py:90-97: weights (ndim > 1) and biases / BN parameters (ndim 1),
    each with its lr_mult on the schedule (common.optim.set_lr); FairLARS itself exempts the second
    from weight decay and adaptation."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], lr_mult=lr_weights),
            dict(params=[p for p in params if p.ndim <= 1], lr_mult=lr_biases)]


def build_model(args):
    """BarlowTwins of the flags: this repo's ResNet with torchvision's init and zero-init residuals
    (BT:main.py:191-192), fc removed."""
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem, init='fan_out', zero_init_residual=True)
    return BarlowTwins(backbone, args.projector, args.lambd)


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'barlowtwins')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    sync_bn = (world > 1 and device.type == 'cuda') if args.sync_bn is None else args.sync_bn
    if sync_bn and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA devices; drop it on CPU')
    blur = args.crop_size >= 64 if args.blur is None else args.blur  # no blur on 32-px data
    views = augment.MultiView(augment.byol(args.crop_size, 1, blur), augment.byol(args.crop_size, 2, blur))
    train_set, sampler, loader = train_loader(args.data, views, args.batch_size, rank, world, args.seed,
                                              args.workers, device, args.device_aug, prefetch=args.aug_prefetch)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({args.batch_size // world} per process and view), loss BN over the global batch, other BNs '
              f'{"synchronised" if sync_bn else "per process"}, blur {"on" if blur else "off"}')

    # ============ model ============
    model = build_model(args)
    model, core = dist.place(model, device, sync_bn)  # DDP averages the gradients; BN statistics per process

    # ============ optimizer / resume ============
    optimizer = optim.FairLARS(param_groups(core, args.learning_rate_weights, args.learning_rate_biases), 0.0,
                               weight_decay=args.weight_decay, momentum=args.momentum)
    base = args.batch_size / 256
    log.print(f'FAIR LARS: LR weights {args.learning_rate_weights:g} x {base:g}, biases/BN '
              f'{args.learning_rate_biases:g} x {base:g} (base = {args.batch_size}/256), warm-up '
              f'{args.warmup_epochs:g} epochs, cosine to {END_LR_RATIO:g} x base; wd {args.weight_decay:g}; '
              f'projector {"-".join(map(str, args.projector))}, lambda {args.lambd:g}')
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.backbone, core.projector, loader)  # --compile
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, args, device, run):
            break  # --max-steps
        run.start_iter = 0
        run.epoch_end(epoch)
    run.finish()
    return core


def train_one_epoch(loader, model, core, optimizer, scaler, epoch, start_iter, iters, args, device, run):
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device)
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        step = epoch * iters + it
        lr = lr_at(step, iters, args.epochs, args.warmup_epochs, args.batch_size)
        optim.set_lr(optimizer, lr)  # weights lr x 0.2, biases/BN lr x 0.0048 (the groups' lr_mult)
        y1 = images[0].to(device, non_blocking=True, memory_format=fmt)  # view 1: blur p=1, no solarize
        y2 = images[1].to(device, non_blocking=True, memory_format=fmt)  # view 2: blur p=0.1, solarize 0.2
        with autocast(args, device):
            loss = model(y1, y2)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        on_diag, off_diag = core.terms
        meter.step(it, lr, loss=loss, on_diag=on_diag, off_diag=off_diag)
        if run.step_end(step + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
