#!/usr/bin/env python
"""ODC: Online Deep Clustering for unsupervised representation learning.

Zhan et al., "Online Deep Clustering for Unsupervised Representation Learning", CVPR 2020
(arXiv:2006.10645). Reference code: OpenSelfSup only (configs/selfsup/odc/r50_v1.py, models/odc.py,
models/memories/odc_memory.py, hooks/odc_hook.py, hooks/deepcluster_hook.py). Spec: methods.md §6.

  python odc.py                                     # demo: shipped CIFAR-10 sample, CPU, ~10 min
  python odc.py /data/imagenet                      # ResNet-50, 10,000 clusters, batch 512
  torchrun --nproc_per_node=8 odc.py /data/imagenet # the OSS recipe (8 x 64 images)

Start: the whole training set is clustered once (eval-mode neck features, L2-normalised, faiss
k-means, no PCA); the features fill a memory bank (N x 256) and each image gets its cluster as its
label. Each step: weighted CE of the head's logits against the labels in the bank (from before this
step), then the bank rows of the batch move halfway to the new (train-mode, dropped-out) neck
features and are relabelled to their nearest centroid. After the optimizer step: every 10 steps the
centroids are recomputed; clusters with fewer than --min-cluster members are dissolved into the
nearest other clusters, and each emptied cluster takes one half of a 2-means split of the largest.
The loss weights are (1/n_c)^0.5 of the current cluster sizes.

Under DDP every process holds the bank, labels and centroids: each process gathers the batch and
computes every update, and the results that pass through floating-point reductions (new bank rows,
new labels, centroids, small-cluster relabelling) are broadcast from rank 0, so the copies stay
bitwise equal whatever the kernels (OSS keeps the features on rank 0 only).

Choices where OpenSelfSup leaves nothing to follow, or deviations:
  * --lr is per 256 images and scaled linearly: 0.03 x 512/256 = OSS's 0.06 at its batch of 512;
  * sampling with replacement keys every draw's augmentation separately (as OSS's fresh draws);
    duplicate indices within a global batch update the bank once, with the last draw;
  * the 2-means split uses sklearn KMeans(2, random_state=0, max_iter=20, n_init=10) (n_init=10 was
    sklearn's default then); its fallback halving is seeded, not drawn from the global RNG;
  * empty clusters after the initial k-means are not an error: the first step's small-cluster pass
    refills them (OSS asserts);
  * head N(0, 0.01) init and the neck's Kaiming init as OSS; --sync-bn under DDP on GPUs as the config.
"""
import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, cluster, dist, optim
from common.data import SAMPLE_DATA, EpochSampler, same_images, train_loader
from common.knn import extract_features
from common.log import start_run
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive
from common.resnet import build_resnet

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='ODC pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=True,
                   help='under DDP on GPUs: backbone BN statistics over the global batch (SyncBatchNorm)')
    g = p.add_argument_group('ODC')
    g.add_argument('--num-clusters', type=int, default=10000, help='k')
    g.add_argument('--min-cluster', type=int, default=20, help='clusters with fewer members are dissolved')
    g.add_argument('--odc-m', type=float, default=0.5, help='bank update: weight of the new feature')
    g.add_argument('--centroids-every', type=int, default=10, help='recompute all centroids every N steps')
    g.add_argument('--reweight-pow', type=float, default=0.5, help='loss weight of cluster c: (1/n_c)^pow')
    g.add_argument('--kmeans-iters', type=int, default=20, help='iterations of the initial k-means')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=440)
    g.add_argument('-b', '--batch-size', type=positive(int), default=512,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=0.03, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[400], help='x --lr-gamma at these epochs (without --cos)')
    g.add_argument('--lr-gamma', type=float, default=0.4, help='step decay factor')
    g.add_argument('--cos', action='store_true', help='cosine LR schedule (per epoch) instead of steps')
    g.add_argument('--warmup-epochs', type=float, default=0, help='linear warm-up, per iteration')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-5, help='weight decay')
    optim.add_param_group_arg(g, default=[r'^head\.:momentum=0'],
                              note='added to the default (head without momentum, OSS)')
    g = add_run_args(p, 'output/odc', dist_timeout=30, device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--min-crop', type=float, default=0.08, help='smallest RandomResizedCrop area (share of the image)')
    return p


# demo: 30 clusters of ~170 images (min 20, as OSS), batch 128 and a 4x LR so that the ~1,200 steps of
# ~7 CPU-minutes move the backbone (100 clusters at lr 0.06 and batch 256 did not beat random init)
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, num_clusters=30,
            min_cluster=20, batch_size=128, lr=0.24, epochs=30, cos=True, workers=2, knn_every=10, save_freq=10,
            output_dir='output/odc_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model ============


class ODC(nn.Module):
    """Backbone -> neck (fc-BN-ReLU-Dropout-fc-ReLU, OSS NonLinearNeckV0) -> head fc to k clusters, with
    the memory: `bank` (NxD unit rows), `labels` (N) and `centroids` (kxD), all buffers.

    backbone(x) must return pooled features of width backbone.feat_dim (common.resnet.ResNet with
    fc=Identity does). forward(x, idx) -> (logits Bxk, targets B, class weights k); it updates the
    bank with the batch afterwards. after_step(step) does the per-step cluster bookkeeping.
    """

    def __init__(self, backbone, n_samples, k=10000, hid_dim=512, dim=256, m=0.5, min_cluster=20,
                 centroids_every=10, reweight_pow=0.5):
        super().__init__()
        self.k, self.m, self.min_cluster, self.centroids_every = k, m, min_cluster, centroids_every
        self.reweight_pow = reweight_pow
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Linear(backbone.feat_dim, hid_dim),
                                  nn.BatchNorm1d(hid_dim, momentum=0.001, affine=False), nn.ReLU(inplace=True),
                                  nn.Dropout(0.5), nn.Linear(hid_dim, dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(dim, k)
        for mod in self.neck:
            if isinstance(mod, nn.Linear):  # OSS neck init: Kaiming fan_in, bias 0
                nn.init.kaiming_normal_(mod.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.head.weight, std=0.01)  # OSS ClsHead 'normal' init
        nn.init.zeros_(self.head.bias)
        self.register_buffer('bank', torch.zeros(n_samples, dim))
        self.register_buffer('labels', torch.zeros(n_samples, dtype=torch.long))
        self.register_buffer('centroids', torch.zeros(k, dim))
        self.change_ratio = None  # share of the batch relabelled by the last update (a log value)

    def features(self, x):
        return self.neck(self.backbone(x))  # BxD

    def forward(self, x, idx):
        feat = self.features(x)  # train mode: after dropout, as OSS stores it
        logits = self.head(feat)  # Bxk
        target = self.labels[idx]  # labels from before this step's update
        weight = self.class_weights()
        self.change_ratio = self.update_memory(idx, feat.detach().to(self.bank.dtype))  # AMP: the bank's fp32
        return logits, target, weight

    def class_weights(self):
        """w_c proportional to (1 / (n_c + 1e-5))^pow, summing to 1 (OSS set_reweight)."""
        n_c = torch.bincount(self.labels, minlength=self.k).to(self.bank.dtype)
        w = (1.0 / (n_c + 1e-5)) ** self.reweight_pow
        return w / w.sum()

    @torch.no_grad()
    def init_memory(self, feats, labels):
        """Fills the bank with the (L2-normalised) features of the initial clustering and its labels;
        centroids = cluster means."""
        self.bank.copy_(feats / (feats.norm(dim=1, keepdim=True) + 1e-10))
        self.labels.copy_(labels)
        self.update_centroids()

    @torch.no_grad()
    def update_memory(self, idx, feat):
        """Bank rows of the global batch <- normalize((1 - m) row + m normalize(feat)); each updated row is
        relabelled to argmax_c centroid_c . row. Returns the share of rows whose label changed."""
        idx, feat = dist.concat_all_gather(idx), dist.concat_all_gather(feat)
        idx, feat = last_draws(idx, feat)  # sampling with replacement: one update per image
        feat = feat / (feat.norm(dim=1, keepdim=True) + 1e-10)
        new = (1 - self.m) * self.bank[idx] + self.m * feat
        new = dist.broadcast(new / (new.norm(dim=1, keepdim=True) + 1e-10))
        label = dist.broadcast((new @ self.centroids.T).argmax(dim=1))
        change = (label != self.labels[idx]).float().mean()
        self.bank[idx] = new
        self.labels[idx] = label
        return change

    @torch.no_grad()
    def update_centroids(self, clusters=None):
        """Centroids of the non-empty clusters (all, or those listed) <- mean of their bank rows;
        empty clusters keep theirs."""
        n_c = torch.bincount(self.labels, minlength=self.k)
        sums = torch.zeros_like(self.centroids).index_add_(0, self.labels, self.bank)
        todo = n_c > 0
        if clusters is not None:
            todo &= torch.zeros_like(todo).index_fill_(0, torch.as_tensor(clusters, device=todo.device), True)
        self.centroids[todo] = sums[todo] / n_c[todo, None]
        dist.broadcast(self.centroids)

    @torch.no_grad()
    def deal_with_small_clusters(self):
        """OSS deal_with_small_clusters: members of clusters under min_cluster move to their nearest
        centroid among the other clusters; then every such (now empty) cluster, in order, takes one half
        of a 2-means split of the then largest cluster, and both centroids are recomputed. Returns the
        number of clusters dissolved."""
        n_c = torch.bincount(self.labels, minlength=self.k)
        small = (n_c < self.min_cluster).nonzero()[:, 0]
        if not len(small):
            return 0
        keep = (n_c >= self.min_cluster).nonzero()[:, 0]
        moving = (n_c[self.labels] < self.min_cluster).nonzero()[:, 0]
        if len(moving):
            self.labels[moving] = keep[(self.bank[moving] @ self.centroids[keep].T).argmax(dim=1)]
        for e in small.tolist():
            largest = int(torch.bincount(self.labels, minlength=self.k).argmax())
            members = (self.labels == largest).nonzero()[:, 0]
            self.labels[members[split_in_two(self.bank[members])]] = e
            self.update_centroids([largest, e])
        dist.broadcast(self.labels)
        return len(small)

    def after_step(self, step):
        """Cluster bookkeeping after the optimizer step `step` (1-based), OSS ODCHook order."""
        if step % self.centroids_every == 0:
            self.update_centroids()
        return self.deal_with_small_clusters()


def last_draws(idx, feat):
    """Keeps, for every distinct index, its last row (deterministic where indices repeat)."""
    uniq, inv = torch.unique(idx, return_inverse=True)
    pos = torch.arange(len(idx), device=idx.device)
    last = torch.full_like(uniq, -1).scatter_reduce_(0, inv, pos, 'amax')
    return idx[last], feat[last]


def split_in_two(feats):
    """Boolean mask of the second part of a 2-means split of `feats` (OSS _partition_max_cluster:
    sklearn KMeans(2, random_state=0, max_iter=20)); halves of a seeded permutation when one part
    comes out empty."""
    from sklearn.cluster import KMeans
    with warnings.catch_warnings():  # identical points: sklearn warns, the fallback below handles it
        warnings.simplefilter('ignore')
        part = KMeans(n_clusters=2, random_state=0, max_iter=20, n_init=10).fit(feats.cpu().numpy()).labels_
    second = torch.from_numpy(part == 1).to(feats.device)
    if second.all() or not second.any():
        perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0)).to(feats.device)
        second = torch.zeros_like(second)
        second[perm[len(feats) // 2:]] = True
    return second


class ReplacementSampler(EpochSampler):
    """EpochSampler whose epoch is N uniform draws *with* replacement (OSS sampling_replace=True).
    Draw j of epoch e is keyed (index, e*N + j): each draw of an image gets its own augmentation."""

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        draws = torch.randint(self.n, (self.iters * self.gb,), generator=g)
        keys = [(i, self.epoch * self.n + j) for j, i in enumerate(draws.tolist())]
        return iter(keys[self.start_iter * self.gb:][self.rank::self.world])


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'odc')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    train_set, sampler, loader = train_loader(args.data, augment.deepcluster(args.crop_size, args.min_crop),
                                              args.batch_size, rank, world, args.seed, args.workers, device,
                                              args.device_aug, ReplacementSampler, prefetch=args.aug_prefetch)
    n, k = len(train_set), args.num_clusters
    if n < k * args.min_cluster:
        raise SystemExit(f'--num-clusters {k} x --min-cluster {args.min_cluster} = {k * args.min_cluster} is more '
                         f'than the {n} training images; lower one of them (e.g. --num-clusters {n // args.min_cluster})')
    iters = sampler.iters
    log.print(f'{n} training images, {k} clusters, {iters} iterations/epoch (sampling with replacement), '
              f'global batch {args.batch_size} ({local_bs} per process)')

    # ============ model ============
    model = ODC(build_resnet(args.arch, 0, args.width, args.cifar_stem), n, k, m=args.odc_m,
                min_cluster=args.min_cluster, centroids_every=args.centroids_every,
                reweight_pow=args.reweight_pow).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == 'cuda' and args.sync_bn:
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
    core = model
    if world > 1:
        # no buffer broadcast: bank, labels and centroids are kept identical by update_memory & co.
        model = dist.ddp(model, device, sync_buffers=False)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256')
    groups = optim.param_groups(core, args.param_group, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.backbone, loader)  # --compile
    del ckpt
    if not run.resumed:
        init_clusters(core, train_set, args, device, log)

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, lr, args,
                           device, log, run):
            break  # --max-steps
        run.start_iter = 0
        log_clusters(core, train_set, epoch, log)
        run.epoch_end(epoch)
    run.finish()
    return core


@torch.no_grad()
def init_clusters(core, train_set, args, device, log):
    """Initial clustering (OSS DeepClusterHook with initial=True): eval-mode neck features of the whole
    training set (eval transform), L2-normalised, k-means on rank 0 (no PCA), labels broadcast."""
    core.eval()
    data = same_images(train_set, augment.eval_transform(args.crop_size), args.data)  # same order
    feats, _ = extract_features(core.features, data, workers=args.workers, device=device, desc='ODC init features')
    core.train()
    labels = torch.zeros(len(feats), dtype=torch.long)
    if dist.is_main():
        km, _, obj = cluster.kmeans(cluster.preprocess_features(feats), args.num_clusters, args.kmeans_iters, args.seed)
        labels = torch.from_numpy(km)
        log.print(f'initial k-means: {cluster.size_stats(km, args.num_clusters)}, objective {obj:.4g}')
    labels = dist.broadcast(labels.to(device)).cpu()
    core.init_memory(feats.to(device), labels.to(device))


def log_clusters(core, train_set, epoch, log):
    """Cluster sizes and, on labelled data, NMI of the clusters against the classes."""
    labels = core.labels.cpu().numpy()
    rec = cluster.size_stats(labels, core.k)
    targets = torch.tensor(train_set.targets).numpy()
    if (targets >= 0).all():
        rec['nmi'] = cluster.nmi(labels, targets)
    log.print(f'epoch {epoch}: clustering: ' + ', '.join(f'{k} {v:.4g}' for k, v in rec.items()))
    log.record(type='clusters', epoch=epoch, **rec)


def train_one_epoch(loader, model, core, optimizer, scaler, epoch, start_iter, iters, base_lr, args, device,
                    log, run):
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device)
    for it, (images, _, idx) in enumerate(loader, start=start_iter):
        meter.data_ready()
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, args.cos, args.schedule, args.lr_gamma,
                         warmup_epochs=args.warmup_epochs)
        optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True, memory_format=fmt)
        idx = idx.to(device, non_blocking=True)
        with autocast(args, device):
            logits, target, weight = model(images, idx)
        loss = F.cross_entropy(logits.float(), target, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step = epoch * iters + it + 1
        dissolved = core.after_step(step)  # bank update, relabelling, centroids, dissolving (in the model)
        acc = (logits.detach().argmax(1) == target).float().mean() * 100  # against the pseudo-labels
        meter.step(it, lr, loss=loss, acc=acc, change_ratio=core.change_ratio, dissolved=dissolved)
        if run.step_end(step, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
