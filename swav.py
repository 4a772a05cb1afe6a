#!/usr/bin/env python
"""SwAV: swapped assignments between multi-crop views, with online Sinkhorn-Knopp codes.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020 (arXiv:2006.09882). Reference code: facebookresearch/swav at 06b1b7c (main_swav.py,
src/resnet50.py, src/multicropdataset.py, scripts/*.sh). Spec: methods-modern.md §14 (with the §0a
conventions); citations `SW:file:lines` below are to that commit.

  python swav.py                                     # demo: shipped CIFAR-10 sample, CPU (see DEMO)
  torchrun --nnodes=8 --nproc_per_node=8 ... swav.py --amp fp16 /data/imagenet     # batch 4096, 800 ep
  torchrun --nproc_per_node=4 swav.py --recipe bs256 --amp fp16 /data/imagenet     # batch 256, 200 ep
  torchrun ... swav.py --epochs 100 /data/imagenet                                 # 100/200/400 ep runs

The method, as facebookresearch/swav:
  * ResNet-50 (torchvision stem and names, Kaiming fan_out, no zero-init residuals) + projection head
    Linear(2048, 2048)-BN-ReLU-Linear(2048, 128), L2-normalised, + prototypes Linear(128, 3000) without
    bias, whose rows are renormalised to unit norm before every forward (`SW:src/resnet50.py:199-217`,
    `SW:main_swav.py:277-281`);
  * multi-crop 2x224 (scale 0.14-1) + 6x96 (0.05-0.14), one backbone pass per resolution, one head pass
    (common/augment.swav, `SW:src/resnet50.py:308-323`);
  * codes for crops 0 and 1 by 3 Sinkhorn-Knopp iterations (eps 0.05) over the batch of all processes
    (and the queue, when there is one), no gradient; each crop's code is predicted from every other
    crop (softmax of the scores / 0.1); loss = the mean over the predicting crops and the two coded
    crops (`SW:main_swav.py:287-315,353-376`);
  * LARC (trust 0.001, no clipping, every parameter) over SGD momentum 0.9, wd 1e-6; per-iteration
    LR: linear warm-up from --start-warmup, then a cosine to --final-lr; the prototypes get no update
    for the first --freeze-prototypes-niters iterations (`SW:main_swav.py:166-182,318-328`);
    `--optimizer adam` swaps LARC for Adam under the same schedule (lightly's CIFAR-10 benchmark).
--recipe (explicit flags win): bs4096 = batch 4096, lr 4.8 -> 0.0048, 10 warm-up epochs from 0.3,
  prototypes frozen 313 iterations, no queue, 800 epochs (`SW:scripts/swav_800ep_pretrain.sh:28-50`);
  bs256 = batch 256, lr 0.6 -> 0.0006, no warm-up, frozen 5005 iterations, a 3840-row queue from
  epoch 15, 200 epochs (`SW:scripts/swav_200ep_bs256_pretrain.sh:28-50`).
The loss is logged beside ln(K), the value of a collapsed run (uniform predictions; §14.8.5).

Deviations from facebookresearch/swav:
  * -b is the global batch (the reference takes a per-GPU batch: 64 x 64 GPUs, 64 x 4 GPUs);
  * --amp defaults to off as in every program here (the scripts run apex O1 fp16; --amp fp16 is the
    closest: autocast + GradScaler); Sinkhorn and the loss run in float32 under AMP;
  * the queue lives in the checkpoint (every process's, gathered into rank 0's file) instead of
    queue<rank>.pth files, so --resume also restores it mid-epoch; a resume at another world size
    while a queue exists is refused;
  * blur is off below 64-px crops (the CIFAR practice of the other recipes; --blur forces it);
  * SyncBN is torch's over all processes (the bs256 script's; the bs4096 one uses apex groups of 8);
  * the kNN monitor and eval/ normalise with std 0.229 (the pre-training views keep SwAV's 0.228).
"""
import argparse
import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.resnet import build_resnet
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive

# ============ arguments ============

# the two ImageNet recipes of SW:scripts (methods-modern.md §14.5)
RECIPES = {
    'bs4096': dict(batch_size=4096, base_lr=4.8, final_lr=0.0048, warmup_epochs=10, start_warmup=0.3,
                   freeze_prototypes_niters=313, queue_length=0, epoch_queue_starts=15, epochs=800),
    'bs256': dict(batch_size=256, base_lr=0.6, final_lr=0.0006, warmup_epochs=0, start_warmup=0.,
                  freeze_prototypes_niters=5005, queue_length=3840, epoch_queue_starts=15, epochs=200),
}


def get_parser():
    p = argparse.ArgumentParser(description='SwAV pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    p.add_argument('--recipe', choices=list(RECIPES), default='bs4096',
                   help='batch-4096 or batch-256 ImageNet recipe; the flags below marked None take its values')
    g = p.add_argument_group('model')
    add_backbone_args(g, 'resnet50')
    g.add_argument('--hidden-mlp', type=positive(int), default=2048, help='hidden width of the projection head')
    g.add_argument('--feat-dim', type=positive(int), default=128, help='embedding (prototype) dimension')
    g.add_argument('--nmb-prototypes', type=positive(int), default=3000, help='number of prototypes K')
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm over all processes; None = on with several CUDA processes')
    g = p.add_argument_group('SwAV')
    g.add_argument('--crops-for-assign', type=int, nargs='+', default=[0, 1], help='crops whose codes are predicted')
    g.add_argument('--temperature', type=positive(float), default=0.1, help='softmax temperature of the predictions')
    g.add_argument('--epsilon', type=positive(float), default=0.05,
                   help='Sinkhorn regularisation (the README\'s remedy against collapse: 0.03)')
    g.add_argument('--sinkhorn-iterations', type=positive(int), default=3, help='Sinkhorn-Knopp iterations')
    g.add_argument('--queue-length', type=int, default=None,
                   help='queue rows over all processes, rounded down to a multiple of the batch (0 = none); '
                        'None = 0 / 3840')
    g.add_argument('--epoch-queue-starts', type=int, default=None, help='epoch that creates the queue; None = 15')
    g.add_argument('--freeze-prototypes-niters', type=int, default=None,
                   help='iterations without prototype updates; None = 313 / 5005')
    g = p.add_argument_group('optimisation (None = the --recipe value: bs4096 / bs256)')
    g.add_argument('--epochs', type=positive(int), default=None, help='None = 800 / 200')
    g.add_argument('-b', '--batch-size', type=positive(int), default=None,
                   help='GLOBAL batch over all processes; None = 4096 / 256')
    g.add_argument('--base-lr', type=positive(float), default=None,
                   help='LR after the warm-up (absolute, not scaled by the batch); None = 4.8 / 0.6')
    g.add_argument('--final-lr', type=float, default=None, help='LR at the end of the cosine; None = 0.0048 / 0.0006')
    g.add_argument('--warmup-epochs', type=int, default=None, help='linear warm-up epochs; None = 10 / 0')
    g.add_argument('--start-warmup', type=float, default=None, help='LR at the start of the warm-up; None = 0.3 / 0')
    g.add_argument('--optimizer', choices=['larc', 'adam'], default='larc',
                   help="larc: LARC over SGD (the reference's); adam: Adam, as lightly's CIFAR-10 benchmark, under "
                        "the same LR schedule and wd")
    g.add_argument('--wd', type=float, default=1e-6, help='weight decay (inside LARC or Adam, every parameter)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum under LARC')
    g.add_argument('--trust', type=positive(float), default=0.001, help='LARC trust coefficient eta')
    g = add_run_args(p, 'output/swav', device_aug=True)
    g.add_argument('--nmb-crops', type=int, nargs='+', default=[2, 6], help='crops per resolution')
    g.add_argument('--size-crops', type=int, nargs='+', default=[224, 96], help='crop size per resolution')
    g.add_argument('--min-scale-crops', type=float, nargs='+', default=[0.14, 0.05],
                   help='smallest scale per resolution')
    g.add_argument('--max-scale-crops', type=float, nargs='+', default=[1.0, 0.14], help='largest scale per resolution')
    g.add_argument('--blur', action=argparse.BooleanOptionalAction, default=None,
                   help='Gaussian blur (p 0.5) on every crop; None = on when the largest crop is 64 px or more')
    return p


# demo: the ResNet-10 (width 32, CIFAR stem) of the other demos on the 5,000-image sample, 2 crops of 32 px
# (scale 0.14-1, lightly's CIFAR-10 crops), solo-learn's CIFAR lr 0.6 and LARS trust 0.02 (§18.1), 300
# prototypes, a 512 head, eps 0.03 (the reference README's remedy against collapse: with 0.05 the loss
# reaches ln K in the first epoch), 30 epochs: kNN dips below random init for ~20 epochs, then passes it
# (docs/BENCHMARKS.md, "SwAV demo search")
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, size_crops=[32], nmb_crops=[2],
            min_scale_crops=[0.14], max_scale_crops=[1.0], hidden_mlp=512, nmb_prototypes=300, epsilon=0.03,
            trust=0.02, batch_size=128, base_lr=0.6, final_lr=0.0006, warmup_epochs=0, start_warmup=0.,
            freeze_prototypes_niters=39, queue_length=0, epoch_queue_starts=15, epochs=30, workers=2, knn_every=5,
            save_freq=5, output_dir='output/swav_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    demo = pre.data is None
    p.set_defaults(**{**RECIPES[pre.recipe], **(DEMO if demo else {})})  # explicit flags still win
    return p.parse_args(argv)


# ============ model and loss ============


class SwAV(nn.Module):
    """Backbone + projection head + prototypes (`SW:src/resnet50.py:199-217,297-323`).

    forward(crops) with crops a list of B x 3 x H x W batches, equal sizes consecutive: one backbone
    pass per resolution, one head pass; returns (embedding (n_crops*B) x D, L2-normalised; scores
    (n_crops*B) x K = embedding @ prototypes^T), rows crop-major."""

    def __init__(self, backbone, hidden_mlp=2048, feat_dim=128, nmb_prototypes=3000):
        super().__init__()
        self.backbone = backbone
        self.projection_head = nn.Sequential(nn.Linear(backbone.feat_dim, hidden_mlp), nn.BatchNorm1d(hidden_mlp),
                                             nn.ReLU(inplace=True), nn.Linear(hidden_mlp, feat_dim))
        self.prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)

    def forward(self, crops):
        feats = [self.backbone(torch.cat(list(group)))  # BN statistics shared by the crops of one size
                 for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]
        z = F.normalize(self.projection_head(torch.cat(feats)), dim=1)  # (n_crops*B) x D
        return z, self.prototypes(z)

    @torch.no_grad()
    def normalize_prototypes(self):
        """Each prototype (row of the KxD weight) to unit norm, in place (`SW:main_swav.py:277-281`)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))


@torch.no_grad()
def sinkhorn(out, epsilon=0.05, iterations=3):
    """Codes of M samples by Sinkhorn-Knopp (`SW:main_swav.py:353-376`; §14.3). out: M x K scores of this
    process; returns M x K codes whose rows sum to 1. Q = exp(out/eps)^T (K x M) is scaled to total 1,
    then alternately each prototype's row to 1/K and each sample's column to 1/B, B = M x world: the
    total and the row sums are all-reduced over the processes, the column sums (one sample each) stay
    local; finally columns x B. The same on one process as on the concatenated batch of all of them."""
    Q = torch.exp(out.to(torch.promote_types(out.dtype, torch.float32)) / epsilon).t()  # KxM
    B, K = Q.shape[1] * dist.get_world_size(), Q.shape[0]
    Q /= dist.all_reduce_sum(torch.sum(Q))
    for _ in range(iterations):
        Q /= dist.all_reduce_sum(torch.sum(Q, dim=1, keepdim=True))  # Kx1 prototype weights -> 1
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # 1xM sample weights -> 1
        Q /= B
    Q *= B  # columns sum to 1: an assignment per sample
    return Q.t()  # MxK


def swav_loss(embedding, output, prototypes, bs, n_crops, queue=None, use_queue=False, crops_for_assign=(0, 1),
              temperature=0.1, epsilon=0.05, iterations=3):
    """Swapped prediction (`SW:main_swav.py:287-315`; §14.2 steps 4-5). embedding: (n_crops*bs) x D and
    output: (n_crops*bs) x K, crop-major; prototypes: the K x D weight; queue: None or
    len(crops_for_assign) x L x D of past embeddings, shifted and refilled here in place.

    For each coded crop c: its scores, preceded by the queue's embeddings scored against the current
    prototypes once the queue is full (or was used already this epoch, `use_queue`), give the Sinkhorn
    codes, of which the last bs rows (this batch) are kept; every other crop v predicts them with
    softmax(output_v / T). Returns (loss, use_queue)."""
    output = output.to(torch.promote_types(output.dtype, torch.float32))  # AMP -> fp32
    loss = 0.
    for i, c in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * c:bs * (c + 1)].detach()  # bs x K
            if queue is not None:
                if use_queue or not torch.all(queue[i, -1] == 0):  # full: its last row has been written
                    use_queue = True
                    out = torch.cat((queue[i] @ prototypes.detach().to(queue.dtype).t(), out.to(queue.dtype)))
                queue[i, bs:] = queue[i, :-bs].clone()  # filled every iteration once it exists
                queue[i, :bs] = embedding[bs * c:bs * (c + 1)].detach()
            q = sinkhorn(out, epsilon, iterations)[-bs:]  # bs x K, this batch's codes only
        subloss = 0.
        for v in range(n_crops):
            if v != c:
                logp = F.log_softmax(output[bs * v:bs * (v + 1)] / temperature, dim=1)  # bs x K
                subloss = subloss - torch.mean(torch.sum(q.to(logp.dtype) * logp, dim=1))
        loss = loss + subloss / (n_crops - 1)
    return loss / len(crops_for_assign), use_queue


def lr_schedule(base_lr, final_lr, epochs, iters, warmup_epochs=0, start_warmup=0.):
    """Per-iteration LRs (epochs*iters), as `SW:main_swav.py:178-182`: np.linspace(start_warmup, base_lr)
    over the warm-up iterations (both ends included), then final + (base - final)(1 + cos(pi t/n))/2
    for t = 0..n-1 over the n remaining iterations."""
    warm = np.linspace(start_warmup, base_lr, iters * warmup_epochs)
    n = iters * (epochs - warmup_epochs)
    cos = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * np.arange(n) / n))  # vectorised: a long
    return np.concatenate((warm, cos))  # nominal run (scripts/benchmark.py) builds it in a moment


class SwAVRun(Run):
    """common.run.Run whose checkpoints also hold the queue of every process (gathered: world x
    len(crops_for_assign) x L/world x D, on CPU; None before the queue exists)."""
    queue = None

    def save(self, epoch, it, keep=False):
        q = self.queue
        self.extra['queue'] = None if q is None else dist.concat_all_gather(q[None].contiguous()).cpu()
        super().save(epoch, it, keep)


def check_args(args):
    """One-line refusals of inconsistent crop / queue flags. Returns (number of crops, queue length
    rounded down to a multiple of the global batch, `SW:main_swav.py:212-213`)."""
    lists = ('--size-crops', args.size_crops), ('--min-scale-crops', args.min_scale_crops), \
        ('--max-scale-crops', args.max_scale_crops)
    for flag, v in lists:
        if len(v) != len(args.nmb_crops):
            raise SystemExit(f'{flag} has {len(v)} values but --nmb-crops {len(args.nmb_crops)}; give one per '
                             f'resolution')
    if min(args.nmb_crops) < 1:
        raise SystemExit(f'--nmb-crops {args.nmb_crops}: every resolution needs at least one crop')
    n_crops = sum(args.nmb_crops)
    if n_crops < 2 or any(not 0 <= c < n_crops for c in args.crops_for_assign):
        raise SystemExit(f'--crops-for-assign {args.crops_for_assign} must name crops 0..{n_crops - 1} of at least 2')
    if args.warmup_epochs > args.epochs:
        raise SystemExit(f'--warmup-epochs {args.warmup_epochs} is longer than the run (--epochs {args.epochs})')
    if args.queue_length < 0:
        raise SystemExit(f'--queue-length {args.queue_length} must be 0 (no queue) or more')
    if args.queue_length and args.queue_length < args.batch_size:
        raise SystemExit(f'--queue-length {args.queue_length} is shorter than the batch ({args.batch_size}); '
                         f'it is rounded down to a multiple of the batch: give 0 or at least {args.batch_size}')
    return n_crops, args.queue_length - args.queue_length % args.batch_size


def restore_queue(saved, rank, world, path):
    """This process's queue from a checkpoint's gathered queues (None when it held none)."""
    if saved is None:
        return None
    if saved.shape[0] != world:
        dist.exit_all(f'--resume {path}: the checkpoint holds the queues of {saved.shape[0]} processes and this run '
                      f'has {world}; resume with {saved.shape[0]} processes')
    return saved[rank].clone()


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'swav')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    n_crops, queue_length = check_args(args)
    blur = max(args.size_crops) >= 64 if args.blur is None else args.blur  # no blur on 32-px data
    views = augment.swav(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops, blur)
    train_set, sampler, loader = train_loader(args.data, views, args.batch_size, rank, world, args.seed,
                                              args.workers, device, args.device_aug, prefetch=args.aug_prefetch)
    iters = sampler.iters
    crops = ' + '.join(f'{n}x{s}' for n, s in zip(args.nmb_crops, args.size_crops))
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({args.batch_size // world} per process), crops {crops}, blur {"on" if blur else "off"}, '
              f'queue {queue_length or "none"}' + (f' from epoch {args.epoch_queue_starts}' if queue_length else ''))

    # ============ model ============
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem, init='fan_out')  # SW:src/resnet50.py:218-234
    model = SwAV(backbone, args.hidden_mlp, args.feat_dim, args.nmb_prototypes)
    sync_bn = (world > 1 and device.type == 'cuda') if args.sync_bn is None else args.sync_bn
    if sync_bn and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA devices; drop it on CPU')
    model, core = dist.place(model, device, sync_bn)  # SyncBN: SW:main_swav.py:157-158; BN stats per process

    # ============ optimizer, schedule, resume ============
    # LARC over SGD, every parameter (SW:main_swav.py:166-177); or Adam (LY:cifar10_benchmark.py SwaVModel)
    if args.optimizer == 'adam':
        optimizer, opt_name = torch.optim.Adam(core.parameters(), args.base_lr, weight_decay=args.wd), 'Adam'
    else:
        optimizer = optim.LARC(core.parameters(), args.base_lr, momentum=args.momentum, weight_decay=args.wd,
                               eta=args.trust)
        opt_name = f'LARC (eta {args.trust:g}) over SGD'
    lrs = lr_schedule(args.base_lr, args.final_lr, args.epochs, iters, args.warmup_epochs, args.start_warmup)
    warm = f'{args.start_warmup:g} -> {args.base_lr:g} in {args.warmup_epochs} epochs, ' if args.warmup_epochs else ''
    log.print(f'{opt_name}: LR {warm}{args.base_lr:g} cosine to {args.final_lr:g}; '
              f'wd {args.wd:g}; prototypes frozen for '
              f'{args.freeze_prototypes_niters} iterations; BN {"synchronised" if sync_bn else "per process"}; '
              f'collapse value of the loss ln K = {math.log(args.nmb_prototypes):.4f}')
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = SwAVRun(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set,
                  knn_size=args.size_crops[0])
    saved = run.ckpt_extra.get('queue')
    run.queue = restore_queue(saved, rank, world, ckpt_path)
    if run.queue is not None:
        run.queue = run.queue.to(device)
    compile_modules(args, core.backbone, core.projection_head, loader)  # --compile
    del ckpt, saved

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if queue_length and epoch >= args.epoch_queue_starts and run.queue is None:  # SW:main_swav.py:225-231
            run.queue = torch.zeros(len(args.crops_for_assign), queue_length // world, args.feat_dim, device=device,
                                    dtype=core.prototypes.weight.dtype)
            log.print(f'epoch {epoch}: queue of {queue_length} embeddings ({queue_length // world} per process) '
                      f'created; used once full')
        if train_one_epoch(loader, model, core, optimizer, scaler, lrs, run.queue, epoch, run.start_iter, iters,
                           n_crops, args, device, run):
            break  # --max-steps
        run.start_iter = 0
        run.epoch_end(epoch)
    run.finish()
    return core, run.queue


def train_one_epoch(loader, model, core, optimizer, scaler, lrs, queue, epoch, start_iter, iters, n_crops, args,
                    device, run):
    """One epoch from `start_iter` (`SW:main_swav.py:259-329`); returns True when --max-steps was reached.
    The queue's 'used this epoch' flag starts False every epoch as the reference's; a resumed run needs
    no saved flag, since a queue whose last row was written once stays full."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device)
    use_queue, ln_k = False, math.log(args.nmb_prototypes)
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        step = epoch * iters + it
        lr = float(lrs[step])
        optim.set_lr(optimizer, lr)
        core.normalize_prototypes()  # before the forward, every iteration
        crops = [im.to(device, non_blocking=True, memory_format=fmt) for im in images]
        bs = crops[0].shape[0]
        with autocast(args, device):
            embedding, output = model(crops)
        loss, use_queue = swav_loss(embedding.detach(), output, core.prototypes.weight, bs, n_crops, queue,
                                    use_queue, args.crops_for_assign, args.temperature, args.epsilon,
                                    args.sinkhorn_iterations)
        if not math.isfinite(loss.item()):
            raise SystemExit(f'loss is {loss.item()} at epoch {epoch} iteration {it}; stopping (lower --base-lr or '
                             f'--epsilon, or --amp off)')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step < args.freeze_prototypes_niters:  # no prototype update (nor decay, nor momentum) yet
            core.prototypes.weight.grad = None
        scaler.step(optimizer)
        scaler.update()
        meter.step(it, lr, loss=loss, loss_vs_ln_k=loss / ln_k, queue_used=float(use_queue))
        if run.step_end(step + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
