#!/usr/bin/env python
"""SimCLR: a simple framework for contrastive learning of visual representations.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020
(arXiv:2002.05709). Reference code: google-research/simclr (v1, TF) and OpenSelfSup
(configs/selfsup/simclr/r50_bs256_ep200.py, models/simclr.py, necks.py NonLinearNeckSimCLR).
Spec: methods.md §2.

  python simclr.py                                    # demo: shipped CIFAR-10 sample, CPU, ~10 min
  python simclr.py /data/imagenet                     # one process (BN over its whole batch)
  torchrun --nproc_per_node=8 simclr.py /data/imagenet          # OSS recipe, SyncBN, batch 256
  torchrun --nproc_per_node=8 simclr.py -b 4096 --epochs 100 /data/imagenet   # the paper's batch

Recipe (OSS r50_bs256_ep200): ResNet-50; projection head 2048-2048-128 with BN; NT-Xent with T=0.1
over the *global* batch (2N-2 negatives per anchor, embeddings gathered from every process with a
gradient-carrying all-gather); LARS (eta 1e-3, momentum 0.9, wd 1e-6, BN and bias parameters
excluded from wd and adaptation), lr 0.3 per 256 images scaled linearly, 10 warm-up epochs from
1e-4 x lr per iteration, then cosine per epoch to 0; 200 epochs; SyncBN.

Batch layout: interleaved, as OSS: rows 2i and 2i+1 are the two views of image i (TF: [v1; v2]).
Gathered in rank order the global batch is interleaved too, so the positive of row r is r xor 1.

Loss scale: the mean over the 2N anchors, as OSS. TF's loss is the sum of the two directional means,
exactly 2x ours (tests/test_simclr.py checks the identity). Under LARS the factor nearly cancels in
the trust ratio of adapted parameters (it is exact without wd); BN and bias parameters see it.

BN: with --sync-bn (default under DDP on GPU) backbone and head BN statistics are over the global
batch of 2N views, as TF's global BN. Otherwise they are per process, over its 2n views: one process
therefore needs nothing more, while DDP without SyncBN (e.g. gloo on CPU, where SyncBN does not
exist) has the local-BN information leakage the paper warns about (§2.2, "Global BN").

Deviations from google-research/simclr (all as OpenSelfSup, see README):
  * loss = mean over 2N anchors (TF: 2x), interleaved layout (TF: [v1; v2]);
  * the head's last BN keeps its bias beta (TF: center=False); head and conv init Kaiming fan_in;
  * OSS LARS: trust = eta ||w|| / (||g|| + wd ||w||) (TF: ||g + wd w||), warm-up from ratio 1e-4 per
    iteration and cosine per epoch (TF: from 0, cosine per step);
  * torchvision augmentation (multiplicative brightness, blur as PIL radius; TF: additive, kernel
    10% of the side); blur off below 64 px, as the paper's CIFAR-10 setting.
"""
import argparse
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive
from common.resnet import build_resnet

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='SimCLR pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm in backbone and head (needs CUDA and several processes); '
                        'None = on exactly then, else BN statistics are per process')
    g = p.add_argument_group('SimCLR')
    g.add_argument('--proj-dim', type=int, default=128, help='output of the projection head (its hidden '
                   'width is the backbone feature width)')
    g.add_argument('--temperature', type=float, default=0.1, help='NT-Xent temperature')
    g.add_argument('--color-strength', type=float, default=1.0,
                   help='colour jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) (paper: 1.0 ImageNet, 0.5 CIFAR-10)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=200)
    g.add_argument('-b', '--batch-size', type=positive(int), default=256,
                   help='GLOBAL batch of images over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=0.3, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--warmup-epochs', type=float, default=10, help='linear warm-up, per iteration')
    g.add_argument('--warmup-ratio', type=float, default=1e-4, help='warm-up starts at this fraction of the LR')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-6, help='weight decay (LARS: not on BN and bias)')
    g.add_argument('--eta', type=float, default=1e-3, help='LARS trust coefficient')
    optim.add_optimizer_arg(g)
    optim.add_param_group_arg(g, note='applied after the BN/bias exclusion rules')
    g = add_run_args(p, 'output/simclr', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    return p


# demo: the recipe that beats random init on the 5,000-image sample within ~10 CPU-minutes. Against the
# ImageNet recipe: T=0.2 and lr 1.0 per 256 (4-epoch runs on this data, kNN top-1: T 0.1 / 0.2 / 0.5 at
# lr 1.0 -> 34.4 / 36.7 / 33.5; lr 2.0 at T 0.2 -> 36.4) and 2 warm-up epochs of 16. The paper's CIFAR-10
# runs (App. B.9) pick lr from {0.5, 1.0, 1.5} and T from {0.1, 0.5, 1.0}, with colour strength 0.5
# (augment.simclr has 1.0).
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32,
            batch_size=256, lr=1.0, warmup_epochs=2, temperature=0.2, epochs=16, workers=2, knn_every=4,
            save_freq=4, output_dir='output/simclr_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model and loss ============


def projection_head(in_dim, hidden_dim=2048, out_dim=128):
    """OSS NonLinearNeckSimCLR (2 layers): fc0 -> BN -> ReLU -> fc1 -> BN, Linear layers without bias.

    The BN modules are named bn0/bn1 so that the LARS exclusion regex (optim.LARS_EXCLUDE_RULES)
    catches them. The last BN keeps its beta, as OSS (TF: center=False). Init as OSS: Linear
    Kaiming-normal fan_in, BN weight 1 / bias 0.
    """
    head = nn.Sequential(OrderedDict(
        fc0=nn.Linear(in_dim, hidden_dim, bias=False), bn0=nn.BatchNorm1d(hidden_dim), relu0=nn.ReLU(inplace=True),
        fc1=nn.Linear(hidden_dim, out_dim, bias=False), bn1=nn.BatchNorm1d(out_dim)))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
    return head


def contrastive_logits(z, t=0.1):
    """NT-Xent logits of this process's anchors against the global batch.

    z: this process's 2n embeddings (2n x d, interleaved: rows 2i, 2i+1 = views of image i). They are
    L2-normalised and all-gathered with gradient (dist.gather_with_grad) into 2N x d. Returns
    (logits 2n x 2N, cosine / t with the anchor's own column at -inf, so 2N-1 candidates: the
    partner and 2N-2 negatives; labels 2n, the global index of each anchor's partner).
    """
    with torch.autocast(z.device.type, enabled=False):  # similarities in fp32 (at least) under --amp
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # 2n x d
        z_all = dist.gather_with_grad(z)              # 2N x d, rank order
        n2 = z.shape[0]
        idx = dist.get_rank() * n2 + torch.arange(n2, device=z.device)  # global row of each anchor
        logits = z @ z_all.T / t                      # 2n x 2N
        logits = logits.masked_fill(F.one_hot(idx, z_all.shape[0]).bool(), float('-inf'))  # self: no candidate
    return logits, idx ^ 1                            # interleaved: the partner of 2i is 2i+1 and back


def nt_xent(z, t=0.1):
    """NT-Xent loss of this process's anchors: the mean over its 2n rows of cross-entropy against the
    2N-1 candidates. With DDP averaging gradients over the processes this is the gradient of the mean
    over all 2N anchors (OSS scale; the TF loss is 2x)."""
    return F.cross_entropy(*contrastive_logits(z, t))


class SimCLR(nn.Module):
    """Backbone (pooled feature, fc=Identity) + projection head; forward(x) takes the 2n views of this
    process, interleaved, and returns (logits 2n x 2N, labels 2n) of contrastive_logits. The modules
    are injected (tests use a BN-free backbone and head)."""

    def __init__(self, backbone, head, t=0.1):
        super().__init__()
        self.backbone, self.head, self.t = backbone, head, t
        self.emb_std = None  # per-dimension std of the last batch's normalised z (collapse monitor)

    def forward(self, x):
        z = self.head(self.backbone(x))               # 2n x d
        with torch.no_grad():
            self.emb_std = F.normalize(z.detach().float(), dim=1).std(0, correction=0).mean()
        return contrastive_logits(z, self.t)


def interleave(views):
    """[v1 (n x C x H x W), v2] -> 2n x C x H x W with rows 2i, 2i+1 = the two views of image i."""
    return torch.stack(views, dim=1).flatten(0, 1)


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'simclr')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    sync_bn = args.sync_bn if args.sync_bn is not None else (world > 1 and device.type == 'cuda')
    if sync_bn and world > 1 and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA (PyTorch SyncBatchNorm has no CPU kernel); use --no-sync-bn')
    blur = args.crop_size >= 64  # no blur on 32-px data (the paper's CIFAR-10 setting)
    aug = augment.simclr(args.crop_size, blur=blur, strength=args.color_strength)
    train_set, sampler, loader = train_loader(args.data, augment.MultiView(aug, aug), args.batch_size, rank,
                                              world, args.seed, args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    iters = sampler.iters
    bn_batch = f'{2 * args.batch_size} views (SyncBN)' if sync_bn and world > 1 else f'{2 * local_bs} views per process'
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({local_bs} per process), {2 * args.batch_size - 2} negatives per anchor, BN over {bn_batch}, '
              f'blur {"on" if blur else "off"}')

    # ============ model ============
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem)  # fc = Identity: pooled feature
    model = SimCLR(backbone, projection_head(backbone.feat_dim, backbone.feat_dim, args.proj_dim),
                   args.temperature)
    model, core = dist.place(model, device, sync_bn and world > 1, sync_buffers=True)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256')
    optimizer = optim.lars_or_sgd(core, args, lr, log.print, args.eta)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.backbone, core.head, loader)  # --compile
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
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, cos=True, warmup_epochs=args.warmup_epochs,
                         warmup_ratio=args.warmup_ratio)
        optim.set_lr(optimizer, lr)
        x = interleave(images).to(device, non_blocking=True, memory_format=fmt)  # 2n views
        with autocast(args, device):
            logits, labels = model(x)
        loss = F.cross_entropy(logits.float(), labels)  # = nt_xent: mean over this process's 2n anchors
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (logits.detach().argmax(1) == labels).float().mean() * 100  # partner ranked first of 2N-1
        meter.step(it, lr, loss=loss, acc=acc, emb_std=core.emb_std)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
