#!/usr/bin/env python
"""SimSiam: simple Siamese networks, no negatives, no momentum encoder, a stop-gradient.

Chen and He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv:2011.10566).
Reference code: facebookresearch/simsiam at a7bc177 (main_simsiam.py, simsiam/builder.py,
simsiam/loader.py; linear evaluation main_lincls.py). Spec: methods-modern.md §0a, §12.

  python simsiam.py                                   # demo: shipped CIFAR-10 sample, CPU (see DEMO)
  torchrun --nproc_per_node=8 simsiam.py /data/imagenet            # R50, 100 epochs, batch 512 (SS:README.md)
  torchrun --nproc_per_node=8 simsiam.py -b 256 /data/imagenet     # batch 256: 68.3 % in the README's table
  python simsiam.py --arch resnet18 --cifar-stem --crop-size 32 --proj-layers 2 --lr 0.03 --wd 5e-4 \\
      --epochs 800 -b 512 /data/cifar10                            # the paper's CIFAR variant (§12.7)
  python eval/lincls.py --protocol simsiam --pretrained output/simsiam/backbone.pth /data/imagenet  # §12.5

The recipe (§12.1-12.4; every default is the reference's ImageNet one):
  * ResNet-50 with zero-init residuals and torchvision's fan_out init (SS:simsiam/builder.py:22-24);
    projector Linear(no bias)-BN-ReLU-Linear(no bias)-BN-ReLU-Linear-BN(no affine), all 2048 wide,
    the last Linear's bias frozen (a BN follows it) (:26-36); --proj-layers 2 drops the middle
    layer (the paper's CIFAR projector); predictor Linear(2048->512, no bias)-BN-ReLU-Linear(512->2048)
    (:38-42);
  * L = -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2, each view its own BN batch (SS:main_simsiam.py:294-295);
  * SGD momentum 0.9, wd 1e-4 on every parameter, lr 0.05 x B/256 at batch 512 (:157, :193-201), a
    per-EPOCH cosine to 0 without warm-up (:359-366), the predictor at the initial lr (--fix-pred-lr,
    the README's recipe); drop_last; SyncBN over all processes (:161);
  * MoCo v2's augmentation, two draws of one pipeline (:228-243).
Deviations from facebookresearch/simsiam:
  * --fix-pred-lr is on by default (the reference's flag is off unless given; its README passes it);
  * blur is off below 64 px crops (the CIFAR practice of §12.7; --blur forces it);
  * one process (no torchrun) and CPU are supported (the reference raises NotImplementedError); SyncBN
    only with several CUDA processes; the BN running statistics stay per process (rank 0's saved);
  * ResNets are this repo's (torchvision names and init, --width/--cifar-stem); --amp, --compile and
    --device-aug (MoCo v2's recipe batched on the device) are opt-in; the reference runs fp32 PIL.
"""
import argparse
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, train_loader
from common.log import start_run
from common.resnet import build_resnet
from common.run import Run, add_backbone_args, add_run_args, autocast, compile_modules, memory_format, positive

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='SimSiam pre-training',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    add_backbone_args(g)
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm over all processes (the reference\'s); None = on with several CUDA processes')
    g = p.add_argument_group('SimSiam')
    g.add_argument('--dim', type=positive(int), default=2048, help='projector output (and predictor output) width')
    g.add_argument('--pred-dim', type=positive(int), default=512, help='hidden (bottleneck) width of the predictor')
    g.add_argument('--proj-layers', type=int, choices=[2, 3], default=3,
                   help='projector depth: 3 = ImageNet (SS:simsiam/builder.py), 2 = the paper\'s CIFAR variant')
    g.add_argument('--proj-hidden-dim', type=positive(int), default=None,
                   help='hidden width of the projector; None = the backbone\'s feature width (the reference\'s)')
    g.add_argument('--fix-pred-lr', action=argparse.BooleanOptionalAction, default=True,
                   help='the predictor keeps the initial LR (no cosine), as the README\'s recipe')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=100)
    g.add_argument('-b', '--batch-size', type=positive(int), default=512,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=0.05, help='LR for a global batch of 256, scaled linearly')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--wd', type=float, default=1e-4, help='weight decay on every parameter (BN and biases too)')
    optim.add_param_group_arg(g)
    g = add_run_args(p, 'output/simsiam', device_aug=True)
    g.add_argument('--crop-size', type=int, default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--blur', action=argparse.BooleanOptionalAction, default=None,
                   help='Gaussian blur in the views; None = on from 64 px crops')
    return p


# demo: lightly's CIFAR-10 SimSiam (methods-modern.md §12.7, §18.2: 2-layer projector, SGD wd 5e-4; its
# unscaled lr 0.06 is --lr 0.06 at batch 256) with smaller heads for 2 CPU cores; resnet10 width 32 as
# the other demos
DEMO = dict(data=str(SAMPLE_DATA), arch='resnet10', width=32, cifar_stem=True, crop_size=32, batch_size=256,
            proj_layers=2, proj_hidden_dim=512, dim=512, pred_dim=128, lr=0.06, wd=5e-4, epochs=12, workers=2,
            knn_every=3, save_freq=6, output_dir='output/simsiam_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    return p.parse_args(argv)


# ============ model and loss ============


def projector(in_dim, hidden_dim, out_dim, num_layers=3):
    """SimSiam's projector (SS:simsiam/builder.py:26-36): (num_layers - 1) x [Linear without bias, BN,
    ReLU], then Linear and BN without affine parameters. The last Linear's bias is frozen at its init
    (the BN after it removes it anyway). Sequential indices as the reference's encoder.fc."""
    layers = []
    for i in range(num_layers - 1):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                   nn.ReLU(inplace=True)]
    last = nn.Linear(hidden_dim if num_layers > 1 else in_dim, out_dim)
    last.bias.requires_grad = False
    return nn.Sequential(*layers, last, nn.BatchNorm1d(out_dim, affine=False))


def predictor(dim, pred_dim):
    """Bottleneck predictor (SS:simsiam/builder.py:38-42): Linear(dim->pred_dim, no bias), BN, ReLU,
    Linear(pred_dim->dim) with bias and no BN after it."""
    return nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


def negative_cosine(p, z):
    """-mean_i cos(p_i, sg(z_i)): p NxD predictions (gradient flows), z NxD targets (stop-gradient).
    Half precision (AMP) is computed in fp32; eps 1e-8 as nn.CosineSimilarity's."""
    dtype = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)
    return -F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1, eps=1e-8).mean()


def simsiam_loss(p1, p2, z1, z2):
    """Symmetric loss of §12.2: (D(p1, z2) + D(p2, z1)) / 2, in [-1, 1]; -1 is also what collapse reaches."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


class SimSiam(nn.Module):
    """Encoder f (backbone + projector) and predictor h (SS:simsiam/builder.py).

    `backbone` maps images to NxF features (common.resnet.ResNet with fc Identity). forward(x1, x2)
    -> loss; each view is forwarded as its own batch (BN statistics per view), as the reference.
    """

    def __init__(self, backbone, dim=2048, pred_dim=512, proj_layers=3, proj_hidden_dim=None, feat_dim=None):
        super().__init__()
        feat_dim = feat_dim or backbone.feat_dim
        head = projector(feat_dim, proj_hidden_dim or feat_dim, dim, proj_layers)
        self.encoder = nn.Sequential(OrderedDict(backbone=backbone, projector=head))
        self.predictor = predictor(dim, pred_dim)
        self.emb_std = None  # per-dimension std of the last batch's normalised z1 (collapse monitor, §12.8.5)

    def forward(self, x1, x2):
        z1, z2 = self.encoder(x1), self.encoder(x2)  # NxD each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # NxD each
        with torch.no_grad():  # ~1/sqrt(D) when healthy, -> 0 on collapse
            self.emb_std = F.normalize(z1.detach().float(), dim=1).std(0, correction=0).mean()
        return simsiam_loss(p1, p2, z1, z2)


def lr_at(init_lr, epoch, epochs):
    """Cosine LR of epoch `epoch` (SS:main_simsiam.py:359-366): init_lr at 0, 0 at `epochs`; per epoch."""
    return init_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def set_epoch_lr(optimizer, init_lr, epoch, epochs):
    """Every group to lr_at(epoch) x lr_mult, except the predictor's with --fix-pred-lr (fix_lr), which
    stays at init_lr x lr_mult. Returns the scheduled LR."""
    lr = lr_at(init_lr, epoch, epochs)
    for g in optimizer.param_groups:
        g['lr'] = (init_lr if g.get('fix_lr') else lr) * g.get('lr_mult', 1.0)
    return lr


def build_optimizer(core, args, init_lr, log=print):
    """SGD over every trainable parameter with wd on all of them (SS:main_simsiam.py:193-201); with
    --fix-pred-lr the predictor's parameters form groups marked fix_lr. --param-group rules apply."""
    rules = list(args.param_group) + ([(r'^predictor\.', {'fix_lr': True})] if args.fix_pred_lr else [])
    groups = optim.param_groups(core, rules, log)  # the frozen projector bias is left out
    return torch.optim.SGD(groups, init_lr, momentum=args.momentum, weight_decay=args.wd)


def build_model(args):
    """SimSiam of the flags: the --arch ResNet with torchvision's fan_out init and zero-init residuals."""
    backbone = build_resnet(args.arch, 0, args.width, args.cifar_stem, init='fan_out', zero_init_residual=True)
    return SimSiam(backbone, args.dim, args.pred_dim, args.proj_layers, args.proj_hidden_dim)


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'simsiam')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    sync_bn = (world > 1 and device.type == 'cuda') if args.sync_bn is None else args.sync_bn
    if sync_bn and device.type != 'cuda':
        raise SystemExit('--sync-bn needs CUDA devices; drop it on CPU')
    blur = args.crop_size >= 64 if args.blur is None else args.blur  # no blur on 32-px data
    aug = augment.moco_v2(args.crop_size, blur=blur)  # two draws of one pipeline (SS:simsiam/loader.py)
    train_set, sampler, loader = train_loader(args.data, augment.MultiView(aug, aug), args.batch_size, rank, world,
                                              args.seed, args.workers, device, args.device_aug,
                                              prefetch=args.aug_prefetch)
    iters = sampler.iters
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, global batch {args.batch_size} '
              f'({args.batch_size // world} per process and view), BN {"synchronised" if sync_bn else "per process"}, '
              f'blur {"on" if blur else "off"}')

    # ============ model ============
    model = build_model(args)
    model, core = dist.place(model, device, sync_bn)  # BN running statistics per process; rank 0's saved

    # ============ optimizer / resume ============
    init_lr = optim.scaled_lr(args.lr, args.batch_size)
    log.print(f'SGD: effective LR {init_lr:g} = {args.lr:g} x {args.batch_size}/256, per-epoch cosine, wd {args.wd:g}, '
              f'predictor LR {"fixed" if args.fix_pred_lr else "on the cosine"}')
    optimizer = build_optimizer(core, args, init_lr, log.print)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'encoder.backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core.encoder, core.predictor, loader)  # --compile
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        lr = set_epoch_lr(optimizer, init_lr, epoch, args.epochs)  # per epoch (SS:main_simsiam.py:257)
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, lr, args, device,
                           run):
            break  # --max-steps
        run.start_iter = 0
        run.epoch_end(epoch)
    run.finish()
    return core


def train_one_epoch(loader, model, core, optimizer, scaler, epoch, start_iter, iters, lr, args, device, run):
    """One epoch from `start_iter` at the epoch's LR `lr`; returns True when --max-steps was reached."""
    model.train()
    meter = run.train_meter(epoch, iters, args.batch_size)
    fmt = memory_format(device)
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        x1 = images[0].to(device, non_blocking=True, memory_format=fmt)  # two draws of MoCo v2's views
        x2 = images[1].to(device, non_blocking=True, memory_format=fmt)
        with autocast(args, device):
            loss = model(x1, x2)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        meter.step(it, lr, loss=loss, emb_std=core.emb_std)
        if run.step_end(epoch * iters + it + 1, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
