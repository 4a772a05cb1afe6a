#!/usr/bin/env python
"""MoCo v1 / v2: Momentum Contrast for unsupervised visual representation learning.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(arXiv:1911.05722); Chen et al., "Improved Baselines with Momentum Contrastive Learning"
(arXiv:2003.04297). Reference code: facebookresearch/moco (main_moco.py, moco/builder.py) and
OpenSelfSup (configs/selfsup/moco). Spec: methods.md §1.

  python moco.py                                    # demo: shipped CIFAR-10 sample, CPU, 10-20 min
  python moco.py /data/imagenet                     # MoCo v1, 1 process (SplitBN emulates 8 GPUs)
  torchrun --nproc_per_node=8 moco.py /data/imagenet          # MoCo v1, paper defaults
  torchrun --nproc_per_node=8 moco.py --v2 /data/imagenet     # MoCo v2 (= --mlp --moco-t 0.2 --aug-plus --cos)

Deviations from facebookresearch/moco (all as OpenSelfSup, see README):
  * conv and projection layers use Kaiming-normal fan_in init (torchvision convs: fan_out, Linear: default);
  * --lr is per 256 images and scaled linearly with the global batch (the original takes it as is);
  * on one process the BN of both encoders is split into --bn-splits sub-batches (SplitBatchNorm),
    since ShuffleBN has nothing to shuffle across.
"""
import argparse

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
    p = argparse.ArgumentParser(description='MoCo v1/v2 pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--bn-splits', type=int, default=8,
                   help='one process only: BN statistics over this many sub-batches (SplitBatchNorm), '
                        'emulating the per-GPU BN of an 8-GPU run; 1 = plain BN')
    g = p.add_argument_group('MoCo')
    g.add_argument('--moco-dim', type=int, default=128, help='feature dimension')
    g.add_argument('--moco-k', type=int, default=65536, help='queue size (multiple of the global batch)')
    g.add_argument('--moco-m', type=float, default=0.999, help='key encoder momentum')
    g.add_argument('--moco-t', type=float, default=0.07, help='softmax temperature')
    g.add_argument('--mlp', action='store_true', help='v2: 2-layer MLP projection head')
    g.add_argument('--aug-plus', action='store_true', help='v2: SimCLR-style augmentation with blur')
    g.add_argument('--cos', action='store_true', help='v2: cosine LR schedule instead of steps')
    g.add_argument('--v2', action='store_true', help='MoCo v2: sets --mlp --moco-t 0.2 --aug-plus --cos '
                   '(flags given explicitly still win)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=200)
    g.add_argument('-b', '--batch-size', type=positive(int), default=256,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=0.03, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[120, 160], help='x0.1 at these epochs (without --cos)')
    g.add_argument('--warmup-epochs', type=float, default=0, help='linear warm-up, per iteration')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=1e-4, help='weight decay')
    optim.add_param_group_arg(g)
    g = add_run_args(p, 'output/moco', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    return p


# demo: the recipe that beats random init on the 5,000-image sample within ~10 CPU-minutes
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, v2=True,
            moco_k=2048, moco_m=0.99, lr=0.06, epochs=24, workers=2, knn_every=6, save_freq=6,
            output_dir='output/moco_demo', seed=0)
V2 = dict(mlp=True, moco_t=0.2, aug_plus=True, cos=True)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
        pre, _ = p.parse_known_args(argv)
    if pre.v2:
        p.set_defaults(**V2)
    return p.parse_args(argv)


# ============ model ============


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of negative keys (builder.py of the paper).

    base_encoder(num_classes) must return a network whose `fc` maps pooled features to num_classes
    (common.resnet.ResNet does). forward(im_q, im_k) -> (logits Nx(1+K), labels N); `perm` injects the
    ShuffleBN permutation of the global batch.
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:  # v2: fc -> fc-relu-fc (hidden width = feature width)
            d = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), self.encoder_k.fc)
        for mod in list(self.encoder_q.fc.modules()):  # OSS neck init: Kaiming fan_in, bias 0
            if isinstance(mod, nn.Linear):
                nn.init.kaiming_normal_(mod.weight, mode='fan_in', nonlinearity='relu')
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)  # key encoder starts as a copy and gets no gradient
            p_k.requires_grad = False
        self.register_buffer('queue', F.normalize(torch.randn(dim, K), dim=0))  # dimxK, unit columns
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))
        self.emb_std = None  # per-dimension std of the last batch's q (collapse monitor; not state)
        # host copy of queue_ptr: reading the buffer every step would make the CPU wait for the GPU;
        # it is read once, and again after a load_state_dict (resume)
        self._ptr = None
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, '_ptr', None))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = dist.concat_all_gather(keys)  # (world*N)xdim: every process enqueues the global batch
        n = keys.shape[0]
        ptr = int(self.queue_ptr) if self._ptr is None else self._ptr
        assert self.K % n == 0, f'queue size {self.K} is not a multiple of the global batch {n}'
        self.queue[:, ptr:ptr + n] = keys.T.to(self.queue.dtype)  # replace the oldest keys
        self._ptr = (ptr + n) % self.K
        self.queue_ptr.fill_(self._ptr)  # the buffer is what checkpoints hold

    def forward(self, im_q, im_k, perm=None):
        q = F.normalize(self.encoder_q(im_q), dim=1)  # NxC
        with torch.no_grad():
            self.emb_std = q.detach().float().std(0, correction=0).mean()
            # theta_k <- m theta_k + (1 - m) theta_q, parameters only, *before* the keys are computed
            optim.ema_update(self.encoder_k, self.encoder_q, self.m)
            im_k, idx_unshuffle = dist.batch_shuffle(im_k, perm)  # ShuffleBN
            k = F.normalize(self.encoder_k(im_k), dim=1)  # NxC
            k = dist.batch_unshuffle(k, idx_unshuffle)
        l_pos = torch.einsum('nc,nc->n', q, k).unsqueeze(-1)  # Nx1
        l_neg = torch.einsum('nc,ck->nk', q, self.queue.clone().detach())  # NxK, snapshot of the queue
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positive at 0
        self._dequeue_and_enqueue(k)  # after the logits: a batch's keys are never its own negatives
        return logits, labels


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'moco')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    local_bs = args.batch_size // world
    bn_splits = args.bn_splits if world == 1 else 1
    if bn_splits > 1 and local_bs % bn_splits:
        raise SystemExit(f'--bn-splits {bn_splits} must divide the batch of {local_bs}; change one of them')
    if args.moco_k % args.batch_size:
        raise SystemExit(f'--moco-k {args.moco_k} must be a multiple of the global batch {args.batch_size}; '
                         f'use e.g. --moco-k {max(1, args.moco_k // args.batch_size) * args.batch_size}')
    if args.aug_plus:
        aug = augment.moco_v2(args.crop_size, blur=args.crop_size >= 64)  # no blur on 32-px data
    else:
        aug = augment.moco_v1(args.crop_size)
    train_set, sampler, loader = train_loader(args.data, augment.MultiView(aug, aug), args.batch_size, rank,
                                              world, args.seed, args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    if args.moco_k > len(train_set):
        raise SystemExit(f'--moco-k {args.moco_k} is larger than the dataset ({len(train_set)} images); '
                         f'use at most {len(train_set) // args.batch_size * args.batch_size}')
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({local_bs} per process), BN splits {bn_splits}')

    # ============ model ============
    def encoder(num_classes):
        return build_resnet(args.arch, num_classes, args.width, args.cifar_stem, bn_splits=bn_splits)

    model = MoCo(encoder, args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp)
    # no buffer broadcast: the queue is kept identical by enqueueing the gathered keys (saves a dimxK
    # copy per step); BN running stats stay per process and rank 0's are saved
    model, core = dist.place(model, device)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256')
    groups = optim.param_groups(core, args.param_group, log.print)
    optimizer = torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'encoder_q', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.encoder_q, core.encoder_k, loader)  # --compile
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
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, args.cos, args.schedule,
                         warmup_epochs=args.warmup_epochs)
        optim.set_lr(optimizer, lr)
        im_q = images[0].to(device, non_blocking=True, memory_format=fmt)
        im_k = images[1].to(device, non_blocking=True, memory_format=fmt)
        with autocast(args, device):
            logits, labels = model(im_q, im_k)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = (logits.detach().argmax(1) == 0).float().mean() * 100  # positive ranked first
        meter.step(it, lr, loss=loss, acc=acc, emb_std=core.emb_std)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
