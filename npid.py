#!/usr/bin/env python
"""NPID: unsupervised feature learning via non-parametric instance discrimination.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
(arXiv:1805.01978). Reference code: zhirongw/lemniscate.pytorch (NCEAverage.py, NCECriterion.py,
test.py) and OpenSelfSup (configs/selfsup/npid/r50.py, models/npid.py). Spec: methods.md §4.

  python npid.py                                    # demo: shipped CIFAR-10 sample, CPU, ~10 min
  python npid.py /data/imagenet                     # softmax over 1+65536 bank entries (OSS, "updated NPID")
  torchrun --nproc_per_node=8 npid.py /data/imagenet
  torchrun --nproc_per_node=8 npid.py --nce /data/imagenet    # the paper's NCE objective, K=4096

Every image i has an entry m_i of a memory bank (N x 128, L2-normalised rows). The network's
normalised embedding v of an augmented image i is pulled towards m_i and pushed from K entries
drawn uniformly from the bank; after the loss, m_i <- normalize((1 - mu) m_i + mu v).

Deviations from lemniscate.pytorch (all as OpenSelfSup, see methods.md §10):
  * default objective: softmax CE over the positive entry and K=65536 uniformly drawn entries
    (T=0.07), the "updated" NPID; --nce gives the paper's NCE (K=4096, Z fixed after batch 1);
  * the bank starts as randn rows L2-normalised (lemniscate: uniform, unnormalised); mu weights the
    *new* feature (lemniscate's "momentum" weights the old entry; the same at the default 0.5);
  * conv and fc layers use Kaiming-normal fan_in init;
  * --lr is per 256 images and scaled linearly with the global batch; under DDP on GPUs the backbone
    BN is synchronised (OSS config; --no-sync-bn for per-process BN as lemniscate's DataParallel);
  * negatives are the entries of a BxN similarity matrix picked at the drawn indices (the same numbers
    as OSS's gathered BxKxD rows, in less memory whenever N < K*128, e.g. on ImageNet).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.knn import extract_features, knn_predict
from common.log import start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive
from common.resnet import build_resnet

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='NPID pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=True,
                   help='under DDP on GPUs: backbone BN statistics over the global batch (SyncBatchNorm)')
    g = p.add_argument_group('NPID')
    g.add_argument('--npid-dim', type=int, default=128, help='embedding / memory bank dimension')
    g.add_argument('--npid-k', type=int, default=65536, help='negatives drawn from the bank per sample (4096 with --nce)')
    g.add_argument('--npid-t', type=float, default=0.07, help='temperature')
    g.add_argument('--npid-m', type=float, default=0.5, help='bank update: weight of the new feature (OSS momentum)')
    g.add_argument('--ensure-neg', action='store_true', help="redraw negatives equal to the sample's own index")
    g.add_argument('--nce', action='store_true', help='the paper\'s NCE objective (lemniscate NCEAverage/NCECriterion) '
                   'instead of softmax CE; sets --npid-k 4096 unless given')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=200)
    g.add_argument('-b', '--batch-size', type=positive(int), default=256,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=0.03, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[120, 160], help='x0.1 at these epochs (without --cos)')
    g.add_argument('--cos', action='store_true', help='cosine LR schedule (per epoch) instead of steps')
    g.add_argument('--warmup-epochs', type=float, default=0, help='linear warm-up, per iteration')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-4, help='weight decay')
    optim.add_param_group_arg(g)
    g = add_run_args(p, 'output/npid', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    return p


# demo: the recipe that beats random init on the 5,000-image sample within ~10 CPU-minutes
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, npid_k=4096,
            lr=0.03, epochs=36, cos=True, workers=2, knn_every=12, save_freq=12,
            output_dir='output/npid_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
        pre, _ = p.parse_known_args(argv)
    if pre.nce:  # the paper's K, unless --npid-k is given
        p.set_defaults(npid_k=4096)
    return p.parse_args(argv)


# ============ model and losses ============


def softmax_loss(dots, t):
    """OSS / updated NPID: CE of logits dots/T (Bx(1+K), positive in column 0) with label 0."""
    return F.cross_entropy(dots / t, torch.zeros(dots.shape[0], dtype=torch.long, device=dots.device))


def nce_loss(dots, t, z, n, eps=1e-7):
    """lemniscate NCECriterion: P_ij = exp(dots_ij / T) / Z, noise Pn = 1/N, K = columns - 1;
    -(sum_i log(P_i0 / (P_i0 + K Pn + eps)) + sum_{i,j>=1} log(K Pn / (P_ij + K Pn + eps))) / B."""
    p = torch.exp(dots / t) / z
    kpn = (dots.shape[1] - 1) / n
    log_pos = torch.log(p[:, 0] / (p[:, 0] + kpn + eps))
    log_neg = torch.log(kpn / (p[:, 1:] + kpn + eps))
    return -(log_pos.sum() + log_neg.sum()) / dots.shape[0]


class NPID(nn.Module):
    """Encoder with a `dim`-wide fc (the LinearNeck) + L2 norm, and a memory bank with one entry per
    training image.

    base_encoder(num_classes) must return a network whose `fc` maps pooled features to num_classes
    (common.resnet.ResNet does). forward(x, idx) -> (loss, dots Bx(1+K): v . m_idx in column 0, then
    v . m_j for the K drawn j); the bank is updated with the batch afterwards. `generator` (or
    neg_idx in forward) lets tests fix the drawn indices.
    """

    def __init__(self, base_encoder, n_samples, dim=128, K=65536, T=0.07, m=0.5, ensure_neg=False,
                 nce=False, generator=None):
        super().__init__()
        self.n, self.K, self.T, self.m, self.ensure_neg, self.nce = n_samples, K, T, m, ensure_neg, nce
        self.generator = generator
        self.encoder = base_encoder(num_classes=dim)
        nn.init.kaiming_normal_(self.encoder.fc.weight, mode='fan_in', nonlinearity='relu')  # OSS neck init
        if self.encoder.fc.bias is not None:
            nn.init.zeros_(self.encoder.fc.bias)
        self.register_buffer('memory', F.normalize(torch.randn(n_samples, dim), dim=1))  # NxD, unit rows
        self.register_buffer('nce_z', torch.tensor(-1.0))  # NCE normalisation constant; < 0 until batch 1

    def embed(self, x):
        v = self.encoder(x)  # BxD; AMP's half precision goes up to fp32, fp32/fp64 stay as they are
        return F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=1)

    def draw_negatives(self, idx):
        """BxK indices drawn uniformly (with replacement) from the bank; with ensure_neg, draws equal
        to the sample's own index are redrawn until none is left (OSS npid.py)."""
        neg = torch.randint(self.n, (idx.shape[0], self.K), device=idx.device, generator=self.generator)
        while self.ensure_neg:
            same = neg == idx[:, None]
            n_same = int(same.sum())
            if not n_same:
                break
            neg[same] = torch.randint(self.n, (n_same,), device=idx.device, generator=self.generator)
        return neg

    def forward(self, x, idx, neg_idx=None):
        v = self.embed(x)  # BxD
        if neg_idx is None:
            neg_idx = self.draw_negatives(idx)
        with torch.autocast(v.device.type, enabled=False):  # bank similarities in fp32
            bank = self.memory.clone()  # snapshot: the update below must not touch autograd's copy
            # all BxN similarities, then the 1+K columns of each row: positive first
            dots = (v @ bank.T).gather(1, torch.cat([idx[:, None], neg_idx], dim=1))  # Bx(1+K)
            if self.nce:
                if self.nce_z < 0:  # Z = mean(exp(dots / T)) x N on the first (global) batch, then fixed
                    z = torch.exp(dots.detach() / self.T).mean()
                    self.nce_z.fill_(float(dist.all_reduce_sum(z)) / dist.get_world_size() * self.n)
                loss = nce_loss(dots, self.T, self.nce_z, self.n)
            else:
                loss = softmax_loss(dots, self.T)
        self.update_memory(idx, v.detach())  # after the loss: the positive was the old entry
        return loss, dots

    @torch.no_grad()
    def update_memory(self, idx, v):
        """m_i <- normalize((1 - mu) m_i + mu v_i) for the (index, feature) pairs of every process, so
        every process holds the same bank. Indices within a global batch are distinct (EpochSampler)."""
        idx, v = dist.concat_all_gather(idx), dist.concat_all_gather(v)
        self.memory[idx] = F.normalize((1 - self.m) * self.memory[idx] + self.m * v, dim=1)


@torch.no_grad()
def bank_knn(model, val_set, bank_labels, num_classes, k, workers, device):
    """lemniscate test.py: top-1 of the weighted kNN (T=0.07) of the val images' embeddings against the
    memory bank itself, labelled with the training labels. Collective."""
    was_training = model.training
    model.eval()
    feats, labels = extract_features(model.embed, val_set, workers=workers, device=device, desc='kNN val embeddings')
    model.train(was_training)
    scores = knn_predict(feats.to(device), model.memory, bank_labels, num_classes, k)
    return 100.0 * (scores.argmax(1).cpu() == labels).float().mean().item()


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'npid')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    train_set, sampler, loader = train_loader(args.data, augment.moco_v1(args.crop_size), args.batch_size, rank,
                                              world, args.seed, args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    n = len(train_set)
    if args.npid_k < 1 or (args.ensure_neg and n < 2):
        raise SystemExit(f'--npid-k {args.npid_k}: need at least 1 negative (and 2 images with --ensure-neg)')
    iters = sampler.iters
    log.print(f'{n} training images (= memory bank entries), {iters} iterations/epoch, global batch '
              f'{args.batch_size} ({local_bs} per process), {args.npid_k} negatives, '
              f'{"NCE" if args.nce else "softmax CE"} objective')

    # ============ model ============
    def encoder(num_classes):
        return build_resnet(args.arch, num_classes, args.width, args.cifar_stem)

    model = NPID(encoder, n, args.npid_dim, args.npid_k, args.npid_t, args.npid_m, args.ensure_neg,
                 args.nce).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == 'cuda' and args.sync_bn:
        model.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
    core = model
    if world > 1:
        # no buffer broadcast: the bank is kept identical by updating with the gathered batch
        model = dist.ddp(model, device, sync_buffers=False)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256')
    groups = optim.param_groups(core, args.param_group, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    if args.knn_every:
        bank_labels = torch.tensor(train_set.targets, device=device)
        if (bank_labels < 0).any():
            raise SystemExit('--knn-every needs labelled training images (class folders); drop --knn-every')
    run = Run(args, core, 'encoder', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.encoder, loader)  # --compile
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, lr, args,
                           device, log, run):
            break  # --max-steps
        run.start_iter = 0
        bank = {}
        if run.knn_due(epoch):  # the original's test: val features against the memory bank
            bank['knn_bank'] = bank_knn(core, run.knn.val_set, bank_labels, len(train_set.classes), args.knn_k,
                                        args.workers, device)
        run.epoch_end(epoch, **bank)
    run.finish()
    return core


def train_one_epoch(loader, model, core, optimizer, scaler, epoch, start_iter, iters, base_lr, args, device,
                    log, run):
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device)
    for it, (images, _, idx) in enumerate(loader, start=start_iter):
        meter.data_ready()
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, args.cos, args.schedule,
                         warmup_epochs=args.warmup_epochs)
        optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True, memory_format=fmt)
        idx = idx.to(device, non_blocking=True)
        with autocast(args, device):
            loss, dots = model(images, idx)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (dots.detach().argmax(1) == 0).float().mean() * 100  # own entry ranked first
        meter.step(it, lr, loss=loss, acc=acc)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
