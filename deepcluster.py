#!/usr/bin/env python
"""DeepCluster: k-means pseudo-labels of the whole training set, re-computed every epoch.

Caron et al., "Deep Clustering for Unsupervised Learning of Visual Features", ECCV 2018
(arXiv:1807.05520). Reference code: facebookresearch/deepcluster (main.py, clustering.py, util.py;
AlexNet/VGG) and OpenSelfSup (configs/selfsup/deepcluster/r50.py, models/deepcluster.py,
hooks/deepcluster_hook.py, the uniform sampler of datasets/loader/sampler.py). Spec: methods.md §5.

  python deepcluster.py                                     # demo: shipped CIFAR-10 sample, CPU, ~10 min
  python deepcluster.py /data/imagenet                      # ResNet-50 Sobel, 10,000 clusters, batch 512
  torchrun --nproc_per_node=8 deepcluster.py /data/imagenet # the OSS recipe (8 x 64 images)

Model: a fixed Sobel front end (grayscale, then Sobel x/y: 2 input channels; --no-sobel for RGB),
a ResNet, global average pooling and a linear head to k clusters. forward(img) -> logits; the loss is
a plain cross-entropy against the image's current pseudo-label.
Clustering round r (before the first epoch: r = 0; after epoch e: r = e + 1, the last epoch included,
as OSS; the labels of round r train epoch r): eval-mode pooled features of the whole training set
under the deterministic eval transform, PCA to 256 dimensions with whitening, row L2 normalisation,
faiss k-means (20 iterations, seed derived from --seed and r, logged); every image takes its nearest
centroid as its label. Rank 0 clusters and broadcasts the labels, so every process holds the same.
Then the head is re-initialised N(0, 0.01), bias 0, and its optimizer state dropped; each epoch
samples uniformly over the clusters. Every round logs (log.jsonl type 'clusters') the NMI against the
previous round's labels, against the classes when the data has them, and the cluster sizes.

Checkpoints carry the labels (model buffer), the round and its seed (`extra`), so a resumed run is
bitwise the run it continues; their args say sobel=True/False, and the backbone (checkpoint or
backbone.pth) is a 2-channel ResNet that eval/ rebuilds behind the Sobel front end (common.features).

Choices (OSS unless said), and deviations:
  * --lr is per 256 images and scaled linearly: 0.05 x 512/256 = OSS's 0.1 at its batch of 512 (the
    original: 0.05 at 256); constant for 200 epochs; momentum 0.9, wd 1e-5; the head has momentum 0
    (a --param-group default) and keeps its weight decay;
  * the original builds a fresh momentum-free SGD for its new top layer every epoch; here the head's
    optimizer state is cleared at every re-initialisation, which is the same with momentum 0;
  * uniform sampling as OSS: int(N/k) + 1 draws per non-empty cluster (with replacement when the
    cluster has that many members or fewer), shuffled, cut (or cyclically repeated) to N;
    --quota nonempty is the original's int(N/#non-empty) + 1. The list is drawn per epoch from
    (seed, epoch), each draw with its own augmentation seed (duplicates get different views);
  * OSS augmentation (crop, flip, 2-degree rotation, strong colour jitter, grayscale); the original
    uses crop + flip only. Features: pooled layer4 (OSS); the original's AlexNet used pre-ReLU fc7;
  * the k-means seed of round r is (seed x 1000 + r) mod 2^31, not a fresh np.random.randint(1234),
    so a run and its resumed copy cluster alike; the head's re-initialisation is also seeded by it.
    faiss stops before 20 iterations once the objective no longer changes (the same result);
  * plain per-process BN, as the OSS config; before each round the BN statistics are broadcast from
    rank 0 (the ones saved), so all processes extract features with the same network;
  * the N x D feature matrix is held on rank 0 only (10 GB for ImageNet at D = 2048; with the PCA
    copies a round peaks at ~13.5 GB of host memory, see scripts/bench_clustering.py).
"""
import argparse
import functools
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, cluster, dist, optim
from common.data import SAMPLE_DATA, EpochSampler, same_images, train_loader
from common.features import iter_features
from common.log import peak_memory_mb, start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive
from common.resnet import build_resnet, build_resnet_sobel

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='DeepCluster pre-training',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sobel', action=argparse.BooleanOptionalAction, default=True,
                   help='fixed Sobel front end (grayscale -> Sobel x/y, a 2-channel conv1)')
    g = p.add_argument_group('DeepCluster')
    g.add_argument('--num-clusters', type=int, default=10000, help='k')
    g.add_argument('--pca-dim', type=int, default=256, help='PCA-whitening dimension before k-means (0 = none)')
    g.add_argument('--kmeans-iters', type=int, default=20, help='k-means iterations per round')
    g.add_argument('--quota', choices=['k', 'nonempty'], default='k',
                   help='uniform sampling: int(N/k)+1 draws per cluster (OSS) or int(N/#non-empty)+1 (original)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=200)
    g.add_argument('-b', '--batch-size', type=positive(int), default=512,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=0.05, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[], help='x0.1 at these epochs (without --cos)')
    g.add_argument('--cos', action='store_true', help='cosine LR schedule (per epoch) instead of steps')
    g.add_argument('--warmup-epochs', type=float, default=0, help='linear warm-up, per iteration')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-5, help='weight decay')
    optim.add_param_group_arg(g, default=[r'^head\.:momentum=0'],
                              note='added to the default (head without momentum, OSS)')
    g = add_run_args(p, 'output/deepcluster', dist_timeout=30, device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--min-crop', type=float, default=0.08, help='smallest RandomResizedCrop area (share of the image)')
    return p


# demo: the recipe that beats random init on the 5,000-image sample within ~10 CPU-minutes: 100 clusters
# of ~50 images (ImageNet: ~128 per cluster), the 256-d features PCA'd to 64, crops of at least 20% of
# the 32-px image, batch 128 (39 steps/epoch for each new head), cosine LR
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, min_crop=0.2,
            num_clusters=100, pca_dim=64, batch_size=128, lr=0.4, cos=True, epochs=20, workers=2, knn_every=5,
            save_freq=5, output_dir='output/deepcluster_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model ============


class DeepCluster(nn.Module):
    """Backbone (pooled features, Sobel front end or not) -> linear head to k clusters, and the
    pseudo-labels of the training set as the buffer `labels` (N).

    backbone(x) must return pooled features of width backbone.feat_dim (common.resnet.ResNet /
    SobelResNet with fc=Identity do). forward(img) -> logits Bxk.
    """

    def __init__(self, backbone, n_samples, k=10000):
        super().__init__()
        self.k = k
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat_dim, k)
        self.register_buffer('labels', torch.zeros(n_samples, dtype=torch.long))
        self.reset_head()

    def forward(self, img):
        return self.head(self.backbone(img))

    @torch.no_grad()
    def reset_head(self, generator=None):
        """Head weights ~ N(0, 0.01), bias 0 (OSS ClsHead 'normal' init; original main.py). Drawn on
        the CPU from `generator`, so every process draws the same."""
        w = torch.randn(self.head.weight.shape, generator=generator) * 0.01
        self.head.weight.copy_(w)
        self.head.bias.zero_()


def reset_head_state(optimizer, head):
    """Drops the optimizer state (momentum buffers) of the head's parameters: the re-initialised head
    starts as under a fresh optimizer."""
    for p in head.parameters():
        optimizer.state.pop(p, None)


def round_seed(seed, rnd):
    """Seed of clustering round `rnd` (k-means and head re-initialisation)."""
    return (seed * 1000 + rnd) % 2 ** 31


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'deepcluster')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)
    try:
        cluster.require_faiss()
    except ImportError as e:
        raise SystemExit(str(e)) from None

    # ============ data ============
    local_bs = args.batch_size // world
    train_set, sampler, loader = train_loader(
        args.data, augment.deepcluster(args.crop_size, args.min_crop), args.batch_size, rank, world, args.seed,
        args.workers, device, args.device_aug,
        functools.partial(UniformClusterSampler, k=args.num_clusters, quota=args.quota),
        prefetch=args.aug_prefetch)
    feat_set = same_images(train_set, augment.eval_transform(args.crop_size), args.data)  # same order
    n, k = len(train_set), args.num_clusters
    if n < k:
        raise SystemExit(f'--num-clusters {k} is more than the {n} training images; use fewer clusters '
                         f'(ImageNet has ~128 images per cluster: e.g. --num-clusters {max(1, n // 128)})')
    iters = sampler.iters
    log.print(f'{n} training images, {k} clusters, {iters} iterations/epoch (uniform over clusters, quota '
              f'by {args.quota}), global batch {args.batch_size} ({local_bs} per process)')

    # ============ model ============
    build = build_resnet_sobel if args.sobel else build_resnet
    model = DeepCluster(build(args.arch, 0, args.width, args.cifar_stem), n, k).to(device)
    d = model.backbone.feat_dim
    if not args.pca_dim <= min(d, n - 1):
        raise SystemExit(f'--pca-dim {args.pca_dim} must be at most the feature dimension ({d}) and below the '
                         f'number of images ({n}); use e.g. --pca-dim {min(d, 256, n - 1)} (or 0 for no PCA)')
    # no buffer broadcast (as OSS): each round sets the labels alike on every process, and aligns the
    # per-process BN statistics to rank 0's before extracting features
    model, core = dist.place(model, device)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256')
    groups = optim.param_groups(core, args.param_group, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.backbone, loader)  # --compile
    del ckpt
    rnd = run.ckpt_extra.get('round', -1)  # the round whose labels are in core.labels (-1: none yet)
    run.extra.update(run.ckpt_extra)

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        if rnd < epoch:  # a fresh run, or one stopped by --max-steps right at an epoch's end
            rnd = cluster_round(core, optimizer, epoch, feat_set, train_set, args, device, log, run)
        sampler.set_epoch(epoch, run.start_iter)
        sampler.set_labels(core.labels.cpu())
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, lr, args,
                           device, log, run):
            break  # --max-steps
        run.start_iter = 0
        rnd = cluster_round(core, optimizer, epoch + 1, feat_set, train_set, args, device, log, run)
        run.epoch_end(epoch)
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
        target = core.labels[idx.to(device, non_blocking=True)]  # this round's pseudo-labels
        with autocast(args, device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (logits.detach().argmax(1) == target).float().mean() * 100  # against the pseudo-labels
        meter.step(it, lr, loss=loss, acc=acc)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


# ============ clustering ============


def cluster_round(core, optimizer, rnd, feat_set, train_set, args, device, log, run):
    """Clustering round `rnd` (collective): features -> PCA-whitening -> L2 -> k-means on rank 0,
    labels broadcast into core.labels, head re-initialised with its optimizer state dropped. Returns rnd."""
    seed, k = round_seed(args.seed, rnd), args.num_clusters
    t0 = time.perf_counter()
    feats = extract_features(core, feat_set, args, device, f'round {rnd} features')
    t1 = time.perf_counter()
    labels = torch.zeros(len(feat_set), dtype=torch.long)
    if dist.is_main():
        x = cluster.preprocess_features(feats, args.pca_dim)  # NxD -> Nxpca_dim, unit rows
        del feats
        km, _, obj = cluster.kmeans(x, k, args.kmeans_iters, seed)
        labels = torch.from_numpy(km)
    labels = dist.broadcast(labels.to(device))
    t2 = time.perf_counter()
    if dist.is_main():
        rec = dict(round=rnd, seed=seed, objective=obj, **cluster.size_stats(km, k))
        sizes = cluster.cluster_sizes(km, k)
        rec['median_size'] = float(np.median(sizes[sizes > 0]))
        if rnd > 0:
            rec['nmi_prev'] = cluster.nmi(km, core.labels.cpu().numpy())
        targets = np.asarray(train_set.targets)
        if (targets >= 0).all():
            rec['nmi_classes'] = cluster.nmi(km, targets)
        rec.update(features_s=t1 - t0, cluster_s=t2 - t1, peak_mem_mb=peak_memory_mb(torch.device('cpu')))
        log.print(f'round {rnd}: seed {seed}, sizes min {rec["min_size"]} / median {rec["median_size"]:g} / max '
                  f'{rec["max_size"]}, {rec["empty"]} of {k} empty'
                  + ''.join(f', {n} {rec[n]:.4f}' for n in ('nmi_prev', 'nmi_classes') if n in rec)
                  + f'; features {t1 - t0:.1f} s, clustering {t2 - t1:.1f} s')
        log.record(type='clusters', epoch=rnd - 1, **rec)
    core.labels.copy_(labels)
    core.reset_head(torch.Generator().manual_seed(seed))
    reset_head_state(optimizer, core.head)
    run.extra.update(round=rnd, round_seed=seed)
    return rnd


@torch.no_grad()
def extract_features(core, feat_set, args, device, desc):
    """Pooled backbone features (eval mode) of every image, streamed in batches: an NxD float32 array
    on rank 0, None elsewhere. Collective. Non-finite features raise FloatingPointError."""
    for b in core.backbone.buffers():  # every process extracts with rank 0's BN statistics
        dist.broadcast(b)
    core.eval()
    fmt = memory_format(device)

    def fn(x):
        with autocast(args, device):
            return {'f': core.backbone(x.contiguous(memory_format=fmt))}

    feats = np.zeros((len(feat_set), core.backbone.feat_dim), np.float32) if dist.is_main() else None
    bad = 0
    bs = 2 * max(1, args.batch_size // dist.get_world_size())  # no gradients: twice the training batch (OSS)
    for idx, f, _ in iter_features(fn, feat_set, bs, args.workers, device, desc):
        bad += int((~torch.isfinite(f['f']).all(1)).sum())
        if feats is not None:
            feats[idx.numpy()] = f['f'].numpy()
    core.train()
    if bad:
        raise FloatingPointError(f'{desc}: {bad} of {len(feat_set)} images have NaN/inf features: the network '
                                 f'has diverged (lower --lr, or try --amp off)')
    return feats


class UniformClusterSampler(EpochSampler):
    """EpochSampler whose epoch is N draws spread uniformly over the clusters of set_labels(labels).

    The list of epoch e is drawn from (seed, e) alone (uniform_cluster_indices), so every process
    builds the same and takes the positions rank, rank + world, ... of its first iters x batch draws.
    Draw j is keyed (index, e*N + j): every draw of an image gets its own augmentation.
    """

    def __init__(self, dataset_len, global_batch, rank=0, world=1, seed=0, k=10000, quota='k'):
        super().__init__(dataset_len, global_batch, rank, world, seed)
        self.k, self.quota, self.labels = k, quota, None

    def set_labels(self, labels):
        self.labels = np.asarray(labels)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = uniform_cluster_indices(self.labels, self.k, rng, self.quota)
        keys = [(int(i), self.epoch * self.n + j) for j, i in enumerate(draws)]
        return iter(keys[self.start_iter * self.gb: self.iters * self.gb][self.rank::self.world])


def uniform_cluster_indices(labels, k, rng, quota='k'):
    """N indices (N = len(labels)) drawn uniformly over the non-empty clusters: each contributes
    int(N / k) + 1 (quota 'k', OSS) or int(N / #non-empty) + 1 (quota 'nonempty', original) of its
    members, with replacement only when it has no more members than that; shuffled, then cut to N,
    or repeated cyclically when the draws fall short (many empty clusters under quota 'k')."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    sizes = cluster.cluster_sizes(labels, k)
    nonempty = np.flatnonzero(sizes)
    per = n // (k if quota == 'k' else len(nonempty)) + 1
    members = np.split(np.argsort(labels, kind='stable'), np.cumsum(sizes)[:-1])
    draws = np.concatenate([rng.choice(members[c], per, replace=sizes[c] <= per) for c in nonempty])
    return np.resize(rng.permutation(draws), n)


if __name__ == '__main__':
    main()
