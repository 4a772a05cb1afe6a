#!/usr/bin/env python
"""MoCo v3: momentum contrast without a queue, for ResNets and Vision Transformers.

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021
(arXiv:2104.02057). Reference code: facebookresearch/moco-v3 at c349e6e (main_moco.py,
moco/builder.py, moco/optimizer.py, vits.py, CONFIG.md). Spec: methods-modern.md §0a, §0b, §15.

  python mocov3.py                                  # demo: shipped CIFAR-10 sample, CPU (see DEMO)
  torchrun --nproc_per_node=8 mocov3.py -b 1024 /data/imagenet        # ViT-S, CONFIG.md's 1-node recipe
  torchrun --nnodes=4 --nproc_per_node=8 ... mocov3.py /data/imagenet  # ViT-S, batch 4096 (32 GPUs)
  torchrun --nproc_per_node=8 mocov3.py --arch resnet50 /data/imagenet # R50, 100-epoch recipe
  torchrun ... mocov3.py --arch resnet50 --lr 0.3 --epochs 300 /data/imagenet   # R50, 300 epochs

The recipe follows --arch (M3:CONFIG.md, methods-modern.md §15.5; explicit flags win):
  ViT: AdamW lr 1.5e-4 x B/256, wd 0.1 on every parameter, 40 warm-up epochs of 300, T 0.2,
       crop scale from 0.08, fixed random patch projection (--stop-grad-conv1), 12 heads for ViT-S;
  ResNet: FAIR LARS lr 0.6 x B/256 (momentum 0.9, wd 1e-6; no wd or adaptation for 1-D parameters),
       10 warm-up epochs of 100, T 1.0, crop scale from 0.2, zero-init residuals;
  both: global batch 4096, momentum encoder m from 0.99 to 1 by a per-iteration cosine, LR warm-up
       and cosine per iteration, symmetric loss ctr(q1, k2) + ctr(q2, k1), each x 2T, over the keys of
       all processes; the momentum update comes before the keys; SyncBN with several CUDA processes.
Deviations from facebookresearch/moco-v3:
  * mixed precision is off unless --amp bf16|fp16 (the reference always runs fp16 autocast);
  * ResNets are this repo's (torchvision names and init, --width/--cifar-stem); ViTs common/vit.py
    (timm names and MoCo v3's init; the timm init the reference runs first is overwritten by it for
    every tensor but the LayerNorms, which both set to 1/0);
  * --moco-m-cos is on by default (every recipe of CONFIG.md passes it);
  * blur is off below 64 px crops (the CIFAR practice; --blur forces it);
  * one process (no torchrun) is supported: the keys are then the local batch's;
  * the momentum encoder's BN running statistics are per process (only used after training).
"""
import argparse
import copy
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.resnet import build_resnet
from common.run import (Run, add_backbone_args, add_run_args, autocast, build_backbone, compile_modules, is_vit,
                        memory_format, positive)

# ============ arguments ============

# per-backbone recipes (§15.5, M3:CONFIG.md:12-20 R50 100 ep, :104-166 ViT 300 ep)
RECIPES = {
    'vit': dict(optimizer='adamw', lr=1.5e-4, wd=0.1, warmup_epochs=40, epochs=300, moco_t=0.2, crop_min=0.08,
                stop_grad_conv1=True),
    'resnet': dict(optimizer='lars', lr=0.6, wd=1e-6, warmup_epochs=10, epochs=100, moco_t=1.0, crop_min=0.2,
                   stop_grad_conv1=False),
}


def get_parser():
    p = argparse.ArgumentParser(description='MoCo v3 pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g, 'vit_small', vit=True)
    g.add_argument('--stop-grad-conv1', action=argparse.BooleanOptionalAction, default=None,
                   help='ViT: keep the patch projection at its random init (no gradient); None = on for ViTs')
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm over all processes (the reference\'s); None = on with several CUDA processes')
    g = p.add_argument_group('MoCo v3')
    g.add_argument('--moco-dim', type=int, default=256, help='output width of projector and predictor')
    g.add_argument('--moco-mlp-dim', type=int, default=4096, help='hidden width of projector and predictor')
    g.add_argument('--moco-m', type=float, default=0.99, help='momentum of the momentum encoder (at the start)')
    g.add_argument('--moco-m-cos', action=argparse.BooleanOptionalAction, default=True,
                   help='raise the momentum to 1 by a half cosine, per iteration')
    g.add_argument('--moco-t', type=positive(float), default=None, help='softmax temperature; None = 0.2 ViT, 1.0 ResNet')
    g = p.add_argument_group('optimisation (None = the --arch recipe: ViT / ResNet)')
    g.add_argument('--optimizer', choices=['adamw', 'lars'], default=None, help='None = adamw / lars')
    g.add_argument('--epochs', type=positive(int), default=None, help='None = 300 / 100')
    g.add_argument('-b', '--batch-size', type=positive(int), default=4096,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=None,
                   help='LR for a global batch of 256, scaled linearly; None = 1.5e-4 / 0.6')
    g.add_argument('--wd', type=float, default=None, help='weight decay; None = 0.1 / 1e-6')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear warm-up, per iteration; None = 40 / 10')
    g.add_argument('--momentum', type=float, default=0.9, help='LARS momentum')
    optim.add_param_group_arg(g)
    g = add_run_args(p, 'output/mocov3')
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--crop-min', type=float, default=None, help='smallest crop scale; None = 0.08 ViT, 0.2 ResNet')
    g.add_argument('--blur', action=argparse.BooleanOptionalAction, default=None,
                   help='Gaussian blur in the views; None = on from 64 px crops')
    return p


# demo: a ResNet, not a ViT: on the 5,000-image sample (2 shared CPU cores) a ViT-Tiny at 32 px (patch 4)
# trained at ~4 img/s against ~25-30 for this resnet10, i.e. ~20 minutes per epoch. ResNet recipe (LARS)
# with solo-learn's CIFAR values T 0.2 and lr 0.3 (methods-modern.md §18.1) and smaller MLPs
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, batch_size=256,
            moco_mlp_dim=512, moco_dim=128, moco_t=0.2, lr=0.3, warmup_epochs=2, epochs=24, workers=2,
            knn_every=6, save_freq=6, output_dir='output/mocov3_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    demo = pre.data is None
    if demo:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
        pre, _ = p.parse_known_args(argv)
    p.set_defaults(**{**RECIPES['vit' if is_vit(pre) else 'resnet'], **(DEMO if demo else {})})
    return p.parse_args(argv)


# ============ model and loss ============


def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo v3's projector / predictor (M3:moco/builder.py:36-52): Linear layers without bias, each
    hidden one followed by BN and ReLU; the last by BN without affine parameters when last_bn
    (SimCLR's final BN, gamma and beta dropped). Sequential indices as the reference's."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q, k, T):
    """ctr(q, k) of §15.2: InfoNCE of this process's N queries against the keys of all processes.

    q: NxC predictions (with gradient), k: NxC momentum keys (none). Both are L2-normalised; k is
    gathered over the processes ((world*N)xC, no gradient); logits q k^T / T are N x world*N and the
    positive of query i is key i of this rank, i.e. label i + N*rank. Mean cross-entropy x 2T.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)  # AMP -> fp32
    q = F.normalize(q.to(dtype), dim=1)
    k = dist.concat_all_gather(F.normalize(k.to(dtype), dim=1))
    logits = q @ k.T / T  # N x world*N
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * dist.get_rank()
    return F.cross_entropy(logits, labels) * (2 * T)


def momentum_at(e, epochs, m0):
    """Momentum at fractional epoch e (M3:main_moco.py:431-434): m0 at e = 0, rising to 1 at e = epochs
    by a half cosine."""
    return 1 - 0.5 * (1 + math.cos(math.pi * e / epochs)) * (1 - m0)


class MoCoV3(nn.Module):
    """Base encoder (backbone + projector) with a predictor, and a momentum encoder (a copy of the base
    encoder, updated only by EMA) (M3:moco/builder.py).

    `backbone` maps images to NxF features: a ResNet of common.resnet (fc Identity) or a ViT of
    common.vit (head Identity: the normed cls token). vit=True: 3-layer projector and a predictor
    with its last BN (MoCo_ViT); else 2-layer projector and no last BN in the predictor (MoCo_ResNet).
    forward(x1, x2, m) -> loss, after updating the momentum encoder with momentum m.
    """

    def __init__(self, backbone, vit=False, dim=256, mlp_dim=4096, T=1.0, feat_dim=None):
        super().__init__()
        self.T = T
        feat_dim = feat_dim or backbone.feat_dim
        projector = mlp(3 if vit else 2, feat_dim, mlp_dim, dim)
        self.base_encoder = nn.Sequential(OrderedDict(backbone=backbone, projector=projector))
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=vit)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)  # starts as a copy, gets no gradient
        self.momentum_encoder.requires_grad_(False)
        self.emb_std = None  # per-dimension std of the last batch's normalised q1 (collapse monitor)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))  # NxC; each view is its own BN batch
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.emb_std = F.normalize(q1.detach().float(), dim=1).std(0, correction=0).mean()
            # theta_m <- m theta_m + (1 - m) theta_b over parameters, *before* the keys are computed
            optim.ema_update(self.momentum_encoder, self.base_encoder, m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return contrastive_loss(q1, k2, self.T) + contrastive_loss(q2, k1, self.T)


def augmentation(size=224, view=1, crop_min=0.08, blur=True):
    """MoCo v3's two views (§15.4; M3:main_moco.py:262-290), BYOL's recipe in MoCo v3's order:
    bilinear RandomResizedCrop scale (crop_min, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale
    0.2, PIL blur sigma U(0.1, 2) p=1.0 (view 1) / 0.1 (view 2), solarize p=0 / 0.2, flip. (Not
    common.augment.byol: that one crops bicubically and flips first, as OpenSelfSup.)"""
    p_blur, p_sol = (1.0, 0.0) if view == 1 else (0.1, 0.2)
    ops = [T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(T.RandomApply([augment.GaussianBlur((0.1, 2.0))], p=p_blur))
    if p_sol:
        ops.append(T.RandomApply([augment.Solarize()], p=p_sol))
    return T.Compose(ops + [T.RandomHorizontalFlip(), T.ToTensor(), augment.normalize])


def build_model(args):
    """MoCoV3 of the flags: a ViT with MoCo v3's init, sin-cos position table, 12 heads for ViT-S and
    (--stop-grad-conv1) a frozen patch projection; or a ResNet with torchvision's init and zero-init
    residuals (M3:main_moco.py:180-187, M3:vits.py)."""
    vit = is_vit(args)
    if args.stop_grad_conv1 and not vit:
        raise SystemExit('--stop-grad-conv1 freezes a ViT\'s patch projection; drop it with a ResNet')
    if vit:
        heads = dict(num_heads=12) if args.arch == 'vit_small' else {}  # M3:vits.py:115-120
        backbone = build_backbone(args, init='moco', pos_embed='sincos', **heads)
        if args.stop_grad_conv1:
            backbone.patch_embed.proj.requires_grad_(False)
    else:
        backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem, init='fan_out', zero_init_residual=True)
    return MoCoV3(backbone, vit, args.moco_dim, args.moco_mlp_dim, args.moco_t)


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'mocov3')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    sync_bn = (world > 1 and device.type == 'cuda') if args.sync_bn is None else args.sync_bn
    if sync_bn and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA devices; drop it on CPU')
    blur = args.crop_size >= 64 if args.blur is None else args.blur  # no blur on 32-px data
    views = augment.MultiView(augmentation(args.crop_size, 1, args.crop_min, blur),
                              augmentation(args.crop_size, 2, args.crop_min, blur))
    train_set, sampler, loader = train_loader(args.data, views, args.batch_size, rank, world, args.seed,
                                              args.workers, device)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({args.batch_size // world} per process and view, {args.batch_size} keys per query), '
              f'BN {"synchronised" if sync_bn else "per process"}, blur {"on" if blur else "off"}')

    # ============ model ============
    model = build_model(args)
    model, core = dist.place(model, device, sync_bn)  # BN running statistics per process; rank 0's saved
    if is_vit(args):
        log.print(f'patch projection {"frozen at its random init" if args.stop_grad_conv1 else "trained"}')

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'{args.optimizer}: effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256, wd {args.wd:g}, '
              f'T {args.moco_t:g}')
    groups = optim.param_groups(core, args.param_group, log.print)  # frozen parameters left out
    if args.optimizer == 'lars':
        optimizer = optim.FairLARS(groups, lr, weight_decay=args.wd, momentum=args.momentum)
    else:  # every parameter decayed, norms and biases included (M3:main_moco.py:228-230)
        optimizer = torch.optim.AdamW(groups, lr, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'base_encoder.backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.base_encoder, core.predictor, core.momentum_encoder, loader)  # --compile
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
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device)
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        e = epoch + it / iters  # LR and momentum per iteration
        lr = optim.warmup_cosine(base_lr, e, args.warmup_epochs, args.epochs)  # M3:main_moco.py:420-428
        optim.set_lr(optimizer, lr)
        m = momentum_at(e, args.epochs, args.moco_m) if args.moco_m_cos else args.moco_m
        x1 = images[0].to(device, non_blocking=True, memory_format=fmt)  # view 1: blur p=1, no solarize
        x2 = images[1].to(device, non_blocking=True, memory_format=fmt)  # view 2: blur p=0.1, solarize 0.2
        with autocast(args, device):
            loss = model(x1, x2, m)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        meter.step(it, lr, loss=loss, m=m, emb_std=core.emb_std)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
