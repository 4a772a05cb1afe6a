#!/usr/bin/env python
"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(arXiv:2104.14294). Reference code: facebookresearch/dino at 7c446df (main_dino.py, utils.py,
vision_transformer.py). Spec: methods-modern.md §16 (with §0a conventions, §0b the ViT); citations
`DN:file:lines` below are to that commit.

  python dino.py                                     # demo: shipped CIFAR-10 sample, CPU (see DEMO)
  python dino.py /data/imagenet                      # ViT-S/16, the reference's defaults, 1 process
  torchrun --nproc_per_node=8 dino.py --amp fp16 /data/imagenet       # the README's vanilla run (512)
  torchrun --nnodes=2 --nproc_per_node=8 ... dino.py --amp fp16 -b 1024 --epochs 300 --teacher-temp 0.07 \\
      --warmup-teacher-temp-epochs 30 --no-norm-last-layer /data/imagenet   # the README's boosted run
  torchrun --nproc_per_node=8 dino.py --amp fp16 --arch resnet50 --optimizer sgd --lr 0.03 --wd 1e-4 \\
      --wd-end 1e-4 --global-crops-scale 0.14 1 --local-crops-scale 0.05 0.14 /data/imagenet  # README R50

The method, as facebookresearch/dino:
  * student and teacher = the same backbone (ViT of common/vit.py with DINO's init and learned position
    table, resized bicubically for the local crops; or a ResNet) + DINOHead; the student has stochastic
    depth 0.1, the teacher none; the teacher starts as the student's copy and is an EMA of it, with the
    momentum cosine from 0.996 to 1 per iteration (`DN:main_dino.py:161-211,346-350`);
  * multi-crop: 2 global 224-px crops (scale 0.4-1) and 8 local 96-px crops (0.05-0.4); one backbone
    pass per resolution; the teacher sees the globals only (`DN:utils.py:594-629`, common/augment.dino);
  * loss: cross-entropy between the centred, sharpened teacher softmax (temperature 0.04, optionally
    warmed up per epoch) and the student softmax (0.1) over every (teacher global, student crop) pair
    of different views, averaged over the pairs; then the centre <- 0.9 c + 0.1 mean(teacher outputs),
    the mean over all processes (`DN:main_dino.py:363-416`);
  * AdamW, lr 0.0005 x B/256 with a 10-epoch linear warm-up and a cosine to 1e-6, weight decay cosine
    0.04 -> 0.4 on the regularised group only (not biases and 1-D params), per iteration; gradients
    clipped per tensor to norm 3 after unscaling; the head's last layer gets no update in epoch 0
    (`DN:main_dino.py:225-251,301-350`, `DN:utils.py:132-198,632-643`).
The teacher's centre buffer and weights are part of the model, so every checkpoint holds them;
backbone.pth and the kNN monitor take the teacher's backbone (what DINO evaluates, §16.6).

Deviations (see README):
  * --amp defaults to off as in every program here (the reference trains in fp16 by default:
    `--amp fp16` is its setting, with the same scaler order: unscale, clip, drop the last layer's
    grads, step); the loss and the centre are computed in float32 under AMP (the reference sums the
    fp16 teacher outputs in fp16);
  * -b is the global batch (the reference takes a per-GPU batch); the default 512 is its 8-GPU run;
  * --optimizer offers adamw and sgd (the ResNet recipe); the reference's LARS is not offered;
  * blur is off below 64-px global crops (the CIFAR practice of the other recipes; --blur forces it);
  * ResNets are common/resnet.py's (Kaiming fan_in init as every method here; the reference builds
    torchvision's), with SyncBN under several CUDA processes as the reference;
  * the DINOHead's weight-normalised last layer is written out (weight_g, weight_v, as
    torch.nn.utils.weight_norm names them) instead of using the deprecated weight_norm hook.
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
from common.run import (Run, add_backbone_args, add_run_args, autocast, build_backbone, compile_modules, is_vit,
                        memory_format, positive)
from common.vit import default_patch_size

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='DINO pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g, 'vit_small', vit=True)
    g.add_argument('--drop-path-rate', type=float, default=0.1, help='stochastic depth of the student ViT')
    g.add_argument('--out-dim', type=positive(int), default=65536, help='DINOHead output dimension K')
    g.add_argument('--norm-last-layer', action=argparse.BooleanOptionalAction, default=True,
                   help='weight-normalised last layer with its norm fixed to 1 (the README sets it off for '
                        'ViT-S in the boosted run: more accurate, less stable)')
    g.add_argument('--use-bn-in-head', action='store_true', help='BatchNorm in the head MLP')
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm for a backbone with BN; None = on with several CUDA processes')
    g = p.add_argument_group('DINO')
    g.add_argument('--momentum-teacher', type=float, default=0.996,
                   help='base teacher EMA rate, cosine to 1 per iteration (0.9995 for batch 256)')
    g.add_argument('--warmup-teacher-temp', type=float, default=0.04, help='initial teacher temperature')
    g.add_argument('--teacher-temp', type=float, default=0.04,
                   help='teacher temperature after the warm-up (paper / boosted run: 0.07; above is unstable)')
    g.add_argument('--warmup-teacher-temp-epochs', type=int, default=0,
                   help='epochs of the linear teacher-temperature warm-up (paper / boosted run: 30)')
    g.add_argument('--student-temp', type=float, default=0.1, help='student softmax temperature')
    g.add_argument('--center-momentum', type=float, default=0.9, help='EMA rate of the centre')
    g.add_argument('--local-crops-number', type=int, default=8, help='local crops per image (0 = two crops)')
    g.add_argument('--global-crops-scale', type=float, nargs=2, default=(0.4, 1.0),
                   help='RandomResizedCrop scale of the global crops (0.14 1 without local crops)')
    g.add_argument('--local-crops-scale', type=float, nargs=2, default=(0.05, 0.4),
                   help='RandomResizedCrop scale of the local crops')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=100, help='training epochs (schedules span them)')
    g.add_argument('-b', '--batch-size', type=positive(int), default=512,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--optimizer', choices=['adamw', 'sgd'], default='adamw',
                   help='adamw for ViTs; sgd (momentum 0.9) for ResNets (README R50 run: --lr 0.03 --wd 1e-4 '
                        '--wd-end 1e-4)')
    g.add_argument('--lr', type=positive(float), default=0.0005,
                   help='peak LR (end of warm-up) for a global batch of 256; scaled linearly')
    g.add_argument('--min-lr', type=float, default=1e-6, help='LR at the end of the cosine')
    g.add_argument('--warmup-epochs', type=int, default=10, help='linear LR warm-up from 0, per iteration')
    g.add_argument('--wd', type=float, default=0.04, help='initial weight decay (regularised group)')
    g.add_argument('--wd-end', type=float, default=0.4, help='final weight decay (cosine per iteration)')
    g.add_argument('--clip-grad', type=float, default=3.0, help='per-tensor gradient norm clip (0 = off)')
    g.add_argument('--freeze-last-layer', type=int, default=1, help='epochs without updates of the last layer')
    g = add_run_args(p, 'output/dino', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='global crop size (32 for CIFAR)')
    g.add_argument('--local-crop-size', type=int, default=96, help='local crop size (16 for CIFAR)')
    g.add_argument('--blur', action=argparse.BooleanOptionalAction, default=None,
                   help='Gaussian blur in the views; None = on from 64-px global crops')
    return p


# demo: the recipe for the 5,000-image sample on the CPU (2 cores). A ViT-Tiny (patch 4, 32-px globals,
# 16-px locals) ran 2.5x slower than this ResNet-10 (3 vs 8 img/s on the loaded development machine,
# where the ResNet makes 60 img/s unloaded): about 4 epochs in 15 minutes, too few to beat random init,
# so the demo trains the ResNet-10 of the other demos
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, local_crop_size=16,
            local_crops_number=4, out_dim=4096, batch_size=128, lr=0.001, warmup_epochs=2, epochs=12,
            momentum_teacher=0.99, workers=2, knn_every=4, save_freq=4, output_dir='output/dino_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model and loss ============


class WeightNormLinear(nn.Module):
    """Linear without bias whose weight is g * v / ||v|| per output row (torch.nn.utils.weight_norm's
    reparametrisation, dim 0, with its parameter names weight_g Kx1 and weight_v KxD). v starts at
    nn.Linear's default init and g at 1 (`DN:vision_transformer.py:276-279`)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self):
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """Projection head (`DN:vision_transformer.py:257-291`): an MLP of `nlayers` Linears (GELU between,
    optional BN, trunc-normal 0.02 / bias 0) to a `bottleneck_dim` vector, L2-normalised, then the
    weight-normalised last layer to `out_dim` logits; norm_last_layer freezes its g at 1 (a cosine
    layer)."""

    def __init__(self, in_dim, out_dim=65536, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers += [nn.BatchNorm1d(b)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers) if len(layers) > 1 else layers[0]
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)  # made after the MLP init, as DINO
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops (`DN:utils.py:594-629`): consecutive crops of one resolution
    go through the backbone as one batch, the head runs once on all features. Output rows are
    crop-major: (n_crops*B) x K."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        feats = [self.backbone(torch.cat(list(group)))
                 for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]
        return self.head(torch.cat(feats))


class DINOLoss(nn.Module):
    """Cross-entropy of the student's softmax against the centred, sharpened teacher softmax
    (`DN:main_dino.py:363-416`). student_out: (n_crops*B) x K, crop-major; teacher_out: (n_global*B) x K
    of the global crops; teacher_temp: this epoch's temperature. Returns the mean over the
    n_global*(n_crops-1) pairs of different views; then updates the centre buffer (1 x K, saved with
    the model) from the teacher outputs of every process, so this step used the previous centre."""

    def __init__(self, out_dim, n_crops, n_global=2, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.n_crops, self.n_global = n_crops, n_global
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer('center', torch.zeros(1, out_dim))

    def forward(self, student_out, teacher_out, teacher_temp):
        dtype = torch.promote_types(self.center.dtype, torch.float32)  # AMP halves go up to fp32
        s = (student_out.to(dtype) / self.student_temp).chunk(self.n_crops)
        q = F.softmax((teacher_out.detach().to(dtype) - self.center) / teacher_temp, dim=-1).chunk(self.n_global)
        total, terms = 0., 0
        for j, qj in enumerate(q):
            for v, sv in enumerate(s):
                if v == j:  # the same view
                    continue
                total = total + torch.sum(-qj * F.log_softmax(sv, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out):
        """c <- m c + (1 - m) mean of the teacher outputs of the global batch (all-reduced sum)."""
        batch = dist.all_reduce_sum(teacher_out.to(self.center.dtype).sum(0, keepdim=True))
        batch = batch / (len(teacher_out) * dist.get_world_size())
        self.center.copy_(self.center * self.center_momentum + batch * (1 - self.center_momentum))


class DINO(nn.Module):
    """Student and teacher (MultiCropWrapper each) and the loss with its centre.

    make_backbone(student: bool) -> a backbone mapping images to B x feat_dim (the student's with drop
    path). forward(crops, teacher_temp) -> loss, crops a list of B x 3 x H x W batches, globals first.
    """

    def __init__(self, make_backbone, out_dim=65536, n_crops=10, n_global=2, use_bn_in_head=False,
                 norm_last_layer=True, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.n_global = n_global
        student, teacher = make_backbone(True), make_backbone(False)
        self.student = MultiCropWrapper(student, DINOHead(student.feat_dim, out_dim, use_bn_in_head, norm_last_layer))
        self.teacher = MultiCropWrapper(teacher, DINOHead(teacher.feat_dim, out_dim, use_bn_in_head))
        self.teacher.load_state_dict(self.student.state_dict())  # starts as the student, gets no gradient
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = DINOLoss(out_dim, n_crops, n_global, student_temp, center_momentum)
        self.emb_std = None  # per-dimension std of the normalised teacher outputs (collapse monitor)

    def forward(self, crops, teacher_temp):
        with torch.no_grad():
            t = self.teacher(crops[:self.n_global])  # the global crops only
            self.emb_std = F.normalize(t.float(), dim=1).std(0, correction=0).mean()
        s = self.student(crops)
        return self.loss(s, t, teacher_temp)

    @torch.no_grad()
    def update_teacher(self, m):
        """theta_t <- m theta_t + (1 - m) theta_s over all parameters (BN statistics stay the teacher's)."""
        optim.ema_update(self.teacher, self.student, m)


# ============ schedules and optimisation helpers ============


def cosine_schedule(base, final, epochs, iters, warmup_epochs=0, start_warmup=0.):
    """Per-iteration values (epochs*iters), `DN:utils.py:187-198`: linspace(start_warmup, base) over
    the warm-up iterations (both ends included), then final + (base - final)(1 + cos(pi i/n))/2 over
    the n remaining iterations i = 0..n-1."""
    warm = warmup_epochs * iters
    n = epochs * iters - warm
    if n < 0:
        raise ValueError(f'the warm-up ({warmup_epochs} epochs) is longer than the run ({epochs} epochs)')
    i = np.arange(n)
    return np.concatenate([np.linspace(start_warmup, base, warm),
                           final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / n))])


def teacher_temp_at(epoch, warmup_temp, temp, warmup_epochs):
    """Teacher temperature of `epoch`: linspace(warmup_temp, temp) over the warm-up epochs (reaching
    temp at epoch warmup_epochs - 1), then temp (`DN:main_dino.py:374-378`)."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, temp, warmup_epochs)[epoch])
    return temp


def param_groups(model):
    """[regularised, unregularised (weight_decay 0)] of the trainable parameters (`DN:utils.py:632-643`):
    biases and 1-D tensors (norms) go unregularised; cls_token, pos_embed and weights are decayed."""
    reg, noreg = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (noreg if name.endswith('.bias') or p.ndim == 1 else reg).append(p)
    return [{'params': reg}, {'params': noreg, 'weight_decay': 0.}]


@torch.no_grad()
def clip_gradients(model, clip):
    """Per-tensor clipping (`DN:utils.py:132-141`): every gradient of norm n > clip is scaled by
    clip / (n + 1e-6). Returns the norms before clipping (a tensor, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    coef = clip / (norms + 1e-6)
    torch._foreach_mul_(grads, list(torch.where(coef < 1, coef, torch.ones_like(coef)).unbind()))
    return norms


def cancel_last_layer_grads(model, epoch, freeze_epochs):
    """No update of the head's last layer in the first `freeze_epochs` epochs: its grads are dropped,
    so the optimizer skips it, weight decay and AdamW state included (`DN:utils.py:144-149`)."""
    if epoch < freeze_epochs:
        for name, p in model.named_parameters():
            if 'last_layer' in name:
                p.grad = None


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'dino')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    vit = is_vit(args)
    if vit:
        patch = args.patch_size or default_patch_size(args.crop_size)
        for flag, size in (('--crop-size', args.crop_size), ('--local-crop-size', args.local_crop_size)):
            if size % patch:
                raise SystemExit(f'{flag} {size} is not a multiple of the patch size {patch}; change one of them')
    if args.warmup_epochs > args.epochs:
        raise SystemExit(f'--warmup-epochs {args.warmup_epochs} is longer than the run (--epochs {args.epochs})')
    if args.local_crops_number < 0:
        raise SystemExit(f'--local-crops-number {args.local_crops_number} must be 0 or more')
    blur = args.crop_size >= 64 if args.blur is None else args.blur  # no blur on 32-px data
    views = augment.dino(args.crop_size, args.local_crop_size, args.local_crops_number,
                         tuple(args.global_crops_scale), tuple(args.local_crops_scale), blur)
    train_set, sampler, loader = train_loader(args.data, views, args.batch_size, rank, world, args.seed,
                                              args.workers, device, args.device_aug, prefetch=args.aug_prefetch)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({args.batch_size // world} per process), crops 2x{args.crop_size} + '
              f'{args.local_crops_number}x{args.local_crop_size}, blur {"on" if blur else "off"}')

    # ============ model ============
    def make_backbone(student):
        if vit:
            return build_backbone(args, drop_path_rate=args.drop_path_rate if student else 0., init='dino',
                                  pos_embed='learned')
        return build_backbone(args)

    model = DINO(make_backbone, args.out_dim, 2 + args.local_crops_number, 2, args.use_bn_in_head,
                 args.norm_last_layer, args.student_temp, args.center_momentum)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    sync_bn = has_bn and world > 1 and device.type == 'cuda' if args.sync_bn is None else args.sync_bn
    if sync_bn and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA devices; drop it on CPU')
    # SyncBN: DN:main_dino.py:196-201; the centre stays identical by its all-reduce, BN statistics per process
    model, core = dist.place(model, device, sync_bn, channels_last=not vit)

    # ============ optimizer, schedules, resume ============
    groups = param_groups(core.student)
    if args.optimizer == 'adamw':
        optimizer = torch.optim.AdamW(groups)  # lr and wd are set every iteration
    else:
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    lr = optim.scaled_lr(args.lr, args.batch_size)
    n_reg, n_noreg = (sum(p.numel() for p in g['params']) for g in groups)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256; {n_reg} regularised and {n_noreg} '
              f'unregularised parameters')
    schedules = (cosine_schedule(lr, args.min_lr, args.epochs, iters, args.warmup_epochs),
                 cosine_schedule(args.wd, args.wd_end, args.epochs, iters),
                 cosine_schedule(args.momentum_teacher, 1, args.epochs, iters))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'teacher.backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.student, core.teacher, loader)  # --compile
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, core, optimizer, scaler, schedules, epoch, run.start_iter, iters, args,
                           device, log, run):
            break  # --max-steps
        run.start_iter = 0
        run.epoch_end(epoch)
    run.finish()
    return core


def train_one_epoch(loader, model, core, optimizer, scaler, schedules, epoch, start_iter, iters, args, device,
                    log, run):
    """One epoch from `start_iter`; returns True when --max-steps was reached."""
    model.train()
    lr_s, wd_s, m_s = schedules
    temp = teacher_temp_at(epoch, args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs)
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device) if not is_vit(args) else torch.contiguous_format
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        step = epoch * iters + it  # global iteration, the index of the schedules
        lr, wd, m = float(lr_s[step]), float(wd_s[step]), float(m_s[step])  # plain floats in checkpoints
        for i, g in enumerate(optimizer.param_groups):
            g['lr'] = lr
            if i == 0:  # only the regularised group
                g['weight_decay'] = wd
        crops = [im.to(device, non_blocking=True, memory_format=fmt) for im in images]
        with autocast(args, device):
            loss = model(crops, temp)
        if not math.isfinite(loss.item()):
            raise SystemExit(f'loss is {loss.item()} at epoch {epoch} iteration {it}; stopping (lower --lr, '
                             f'--teacher-temp or --amp off)')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients
            clip_gradients(core.student, args.clip_grad)
        cancel_last_layer_grads(core.student, epoch, args.freeze_last_layer)
        scaler.step(optimizer)
        scaler.update()
        core.update_teacher(m)  # after the student's step
        meter.step(it, lr, loss=loss, wd=wd, momentum=m, teacher_temp=temp,
                   emb_std=core.emb_std)
        if run.step_end(step + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
