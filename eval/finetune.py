#!/usr/bin/env python
"""End-to-end fine-tuning of any backbone of the repo (ViT or ResNet) with the MAE/DeiT recipe.

He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377 (fine-tuning recipe
of DeiT/BEiT); reference code facebookresearch/mae at efb2a80 (main_finetune.py, engine_finetune.py,
util/lr_decay.py, util/lr_sched.py, util/datasets.py, models_vit.py, FINETUNE.md). Spec:
methods-modern.md §17.4; the shared pieces (classifier, layer decay, mixing, epoch) are common/finetune.py.

  python eval/finetune.py --pretrained output/mae/checkpoint_last.pth /data/imagenet      # one process
  torchrun --nproc_per_node=8 eval/finetune.py --pretrained CKPT -b 1024 /data/imagenet   # ViT-B recipe
  torchrun --nproc_per_node=8 eval/finetune.py --pretrained CKPT --accum-iter 4 -b 256 ... # 1024 in 4 steps
  python eval/finetune.py --pretrained output/mocov3_demo/backbone.pth data/cifar10_sample --epochs 10 -b 128

--pretrained takes whatever eval/lincls.py takes (any checkpoint or backbone.pth of this repo, a
facebookresearch/moco, moco-v3 or dino checkpoint, a torchvision ResNet state dict); the
architecture is read off the weights. --random-init keeps the architecture and drops the weights
(the from-scratch baseline).

Recipe (§17.4 table and "Common", `MAE:FINETUNE.md:59-133`; defaults by the backbone, flags win):
  ViT-B (and other ViTs but ViT-L): 100 epochs, blr 5e-4, layer decay 0.65, drop path 0.1;
  ViT-L: 50 epochs, blr 1e-3, layer decay 0.75, drop path 0.2; ResNet: the ViT-B values, but layer
  decay 1.0 (MAE defines none; --layer-decay applies per stage, common/finetune.py) and no drop path.
  All: AdamW (betas 0.9, 0.999), lr = blr x batch x accum-iter / 256, batch 1024, wd 0.05 (0 for 1-D
  parameters, pos_embed, cls_token), warm-up 5 epochs then cosine to min_lr 1e-6 per iteration;
  mixup 0.8 / cutmix 1.0, one per batch (switch prob 0.5), label smoothing 0.1; RandomResizedCrop
  (bicubic) + flip + RandAugment + random erasing 0.25; ViT: mean patch token -> fc_norm -> head
  (trunc-normal 2e-5), pos_embed learnable; no gradient clipping; val Resize(256, bicubic) +
  CenterCrop(224). Top-1/top-5 on val after every --eval-every epochs and at the end.
Output: <output-dir>/finetune.json (top-1/top-5, the per-epoch log, the protocol), checkpoint_last.pth
(+ checkpoint_EEEE.pth every --save-freq epochs; it resumes bitwise), backbone.pth (the fine-tuned
backbone), log.jsonl. The folder rules are the training programs' (common/checkpoint.py
claim_output_dir): a folder that holds a run is refused unless --resume auto continues it or
--overwrite deletes it; SIGTERM/SIGUSR1 checkpoint and stop; --max-steps, --save-iters.

Deviations from facebookresearch/mae (torchvision instead of timm):
  * RandAugment: torchvision's T.RandAugment(2, 9, num_magnitude_bins=11) (magnitude 9 on timm's
    0..10 scale, bicubic, fill = the mean pixel), not timm's rand-m9-mstd0.5-inc1: every chosen op is
    applied (timm: each with probability 0.5), the magnitude is fixed (timm: Gaussian noise std 0.5),
    the op set has Identity and lacks Invert and SolarizeAdd, posterize keeps 4 bits at m9 (timm's
    increasing variant keeps 1);
  * MixUp/CutMix: torchvision.transforms.v2 (one per batch as timm's batch mode with prob 1); an
    image is mixed with its batch neighbour (roll) instead of the reversed batch (flip), lam drawn by
    torch; label smoothing is the loss's (the same targets: common/finetune.py batch_mixing);
  * RandomErasing: torchvision's (p 0.25, scale 0.02-1/3, ratio 0.3-3.3, per-pixel N(0, 1) values
    on the normalised tensor, 10 attempts, 1 box) - timm's pixel mode, up to its RNG;
  * 32-px data (CIFAR-stem ResNet or --crop-size < 64): padded RandomCrop + flip instead of the
    RandomResizedCrop, and val resize only, as the other evaluations of the repo;
  * mixed precision is off unless --amp bf16|fp16 (MAE always runs fp16 autocast);
  * each process draws its own mixing and drop path (seed + rank, as MAE), and the checkpoint holds
    every process's RNG, so a resumed run continues bitwise (MAE's resume restarts the epoch).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/finetune.py` finds common/

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision.transforms as T  # noqa: E402

from common import augment, checkpoint, dist, optim  # noqa: E402
from common import finetune as ft  # noqa: E402
from common.features import describe_backbone, vit_eval_transform  # noqa: E402
from common.log import start_run  # noqa: E402
from common.run import Run, add_run_args, compile_modules, positive  # noqa: E402
from eval.lincls import (backbone_weights, describe, save_or_stop, validate, weights_fingerprint,  # noqa: E402
                         write_json)

# §17.4 table (MAE:FINETUNE.md:59-133); 'vit' serves every ViT but ViT-L, 'resnet' is our choice
RECIPES = {
    'vit': dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    'vit_large': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    'resnet': dict(epochs=100, blr=5e-4, layer_decay=1.0, drop_path=0.0),
}
MEAN_PIXEL = [124, 116, 104]  # ImageNet mean x 255: timm's RandAugment fill

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='End-to-end fine-tuning (MAE/DeiT recipe)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='ImageNet-layout root with train/<class>/ and val/<class>/ folders')
    p.add_argument('--pretrained', required=True, help='any checkpoint or backbone.pth eval/lincls.py takes')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    p.add_argument('--num-heads', type=positive(int), default=None,
                   help='ViT attention heads (not in the weights); None = as eval/lincls.py reads them')
    p.add_argument('--random-init', action='store_true',
                   help='fine-tune the architecture of --pretrained from a random init (the baseline)')
    g = p.add_argument_group('optimisation (None = the recipe of the backbone, see the docstring)')
    g.add_argument('--epochs', type=positive(int), default=None, help='None = 100 (ViT-L 50)')
    g.add_argument('-b', '--batch-size', type=positive(int), default=1024, help='GLOBAL batch per step, all processes')
    g.add_argument('--accum-iter', type=positive(int), default=1, help='batches accumulated per optimizer step')
    g.add_argument('--blr', type=positive(float), default=None, help='LR per 256 images; None = 5e-4 (ViT-L 1e-3)')
    g.add_argument('--lr', type=positive(float), default=None, help='absolute LR; None = blr x batch x accum / 256')
    g.add_argument('--min-lr', type=float, default=1e-6, help='end of the cosine')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear warm-up from 0')
    g.add_argument('--wd', type=float, default=0.05, help='AdamW weight decay (0 for 1-D, pos_embed, cls_token)')
    g.add_argument('--layer-decay', type=positive(float), default=None,
                   help='layer-wise LR decay; None = 0.65 ViT (ViT-L 0.75), 1.0 ResNet')
    g.add_argument('--drop-path', type=float, default=None, help='ViT stochastic depth; None = 0.1 (ViT-L 0.2)')
    g = p.add_argument_group('regularisation (MAE main_finetune.py defaults of the recipe)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--mixup', type=float, default=0.8, help='MixUp Beta alpha (0 = off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='CutMix Beta alpha (0 = off)')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of CutMix when both are on')
    g.add_argument('--randaug-n', type=int, default=2, help='RandAugment ops per image (0 = off)')
    g.add_argument('--randaug-m', type=int, default=9, help='RandAugment magnitude, 0..10 (timm scale)')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    d = add_run_args(p, output_dir=None)
    d.add_argument('--crop-size', type=int, default=None,
                   help='None = the backbone\'s (32 CIFAR stem, a ViT\'s own, 224)')
    d.add_argument('--eval-every', type=positive(int), default=1, help='val top-1 every N epochs (and at the end)')
    p.set_defaults(save_freq=20)
    return p


def parse_args(argv, cfg):
    """The flags with the recipe of the backbone `cfg` for what was left at None."""
    args = get_parser().parse_args(argv)
    recipe = RECIPES['resnet' if not cfg.get('vit') else 'vit_large' if cfg['arch'] == 'vit_large' else 'vit']
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.drop_path and not cfg.get('vit'):
        raise SystemExit(f'--drop-path {args.drop_path}: stochastic depth is for ViT backbones; --pretrained '
                         f'{args.pretrained} holds a ResNet')
    for flag, v, ok in (('--mixup-switch-prob', args.mixup_switch_prob, 0 <= args.mixup_switch_prob <= 1),
                        ('--reprob', args.reprob, 0 <= args.reprob <= 1), ('--smoothing', args.smoothing,
                                                                          0 <= args.smoothing < 1),
                        ('--randaug-m', args.randaug_m, 0 <= args.randaug_m <= 10),
                        ('--drop-path', args.drop_path, 0 <= args.drop_path < 1),
                        ('--mixup', args.mixup, args.mixup >= 0), ('--cutmix', args.cutmix, args.cutmix >= 0),
                        ('--randaug-n', args.randaug_n, args.randaug_n >= 0), ('--wd', args.wd, args.wd >= 0)):
        if not ok:
            raise SystemExit(f'{flag} {v}: out of range (see --help)')
    args.pretrained = str(Path(args.pretrained).resolve())
    args.crop_size = args.crop_size or (cfg['img_size'] if cfg.get('vit') else 32 if cfg['cifar_stem'] else 224)
    if args.output_dir is None:
        args.output_dir = str(Path(args.pretrained).parent / ('finetune_random' if args.random_init else 'finetune'))
    return args


def pretrained_of(argv):
    """(--pretrained path, --unsafe-load, --num-heads) before the recipe is known (argparse errors as usual)."""
    a, _ = get_parser().parse_known_args(argv)
    return Path(a.pretrained).resolve(), a.unsafe_load, a.num_heads


# ============ augmentation ============


def train_transform(args):
    """RandomResizedCrop(bicubic) + flip + RandAugment + ToTensor + normalise + RandomErasing
    (`MAE:util/datasets.py:34-49`, timm create_transform; torchvision ops, see Deviations); below
    64 px the padded RandomCrop + flip of the repo's 32-px recipes replaces the crop."""
    size = args.crop_size
    if size < 64:
        ops = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=4)]
    else:
        ops = [T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC)]
    ops.append(T.RandomHorizontalFlip())
    if args.randaug_n:
        ops.append(T.RandAugment(args.randaug_n, args.randaug_m, num_magnitude_bins=11,
                                 interpolation=T.InterpolationMode.BICUBIC, fill=MEAN_PIXEL))
    ops += [T.ToTensor(), augment.normalize]
    if args.reprob:
        ops.append(T.RandomErasing(p=args.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value='random'))
    return T.Compose(ops)


# ============ fine-tuning ============


def main(argv=None):
    path, unsafe, heads = pretrained_of(argv)
    sd, cfg = backbone_weights(path, weights_only=not unsafe, num_heads=heads)  # before any file is written
    args = parse_args(argv, cfg)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    fingerprint = weights_fingerprint(sd)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'finetune')
    old = (ckpt or {}).get('extra', {}).get('pretrained_fingerprint', fingerprint)
    if old != fingerprint:
        raise SystemExit(f'--resume {ckpt_path}: --pretrained {args.pretrained} holds other weights ({old} -> '
                         f'{fingerprint}) than the run fine-tuned; resume with those, or start over')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    train_tf = train_transform(args)
    val_tf = vit_eval_transform(args.crop_size)  # Resize(256, bicubic) + CenterCrop(224); resize only < 64 px
    train_set, val_set = ft.open_data(args.data, train_tf, val_tf, args.seed)
    sampler, loader = ft.train_loader(train_set, args.batch_size, rank, world, args.seed, args.workers, device)
    val_loader = ft.val_loader(val_set, args.batch_size // world, rank, world, args.workers, device)
    num_classes, iters = len(train_set.classes), sampler.iters

    # ============ model, optimizer, resume ============
    model, core = build_model(args, sd, cfg, num_classes, world, device)
    lr = args.lr or args.blr * args.batch_size * args.accum_iter / 256  # MAE:main_finetune.py:267-270
    optimizer = torch.optim.AdamW(ft.param_groups(core, args.wd, args.layer_decay), lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    torch.manual_seed(args.seed + rank)  # own mixing and drop path per process (MAE:main_finetune.py:167)
    run = Run(args, core, 'backbone', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core)  # --compile
    del ckpt
    history = run.ckpt_extra.get('history', [])
    run.extra = dict(pretrained_fingerprint=fingerprint, history=history)
    protocol = describe_protocol(args, cfg, core, lr, train_set, val_set, train_tf, val_tf, world)
    log.record(type='finetune_protocol', **protocol)
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch, {len(val_set)} val images, '
              f'{num_classes} classes; AdamW lr {lr:g}, {len(optimizer.param_groups)} parameter groups '
              f'(layer decay {args.layer_decay:g})')

    # ============ training loop ============
    mix = ft.batch_mixing(num_classes, args.mixup, args.cutmix, args.mixup_switch_prob)
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')
    steps = iters // args.accum_iter  # optimizer steps per epoch
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if ft.train_one_epoch(model, loader, optimizer, scaler,
                              lambda it: optim.warmup_cosine(lr, epoch + it / iters, args.warmup_epochs, args.epochs,
                                                             args.min_lr),
                              run.train_meter(epoch, iters, args.batch_size), device, amp, run.start_iter, mix,
                              args.smoothing, args.accum_iter,
                              lambda it: run.step_end(epoch * steps + (it + 1) // args.accum_iter, epoch, it, iters)):
            run.finish()  # --max-steps: checkpoint written, no result yet
            return None
        run.start_iter = 0
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            history.append(evaluate(val_loader, core, device, amp, epoch, log))
        run.epoch_end(epoch)
    result = write_result(args, history, protocol, git, log) if history else None
    run.finish()
    return result


def build_model(args, sd, cfg, num_classes, world, device):
    """(model to train: DDP-wrapped with several processes, the bare Classifier)."""
    try:
        core = ft.build_classifier(sd, cfg, num_classes, args.drop_path, args.random_init)
    except ValueError as e:
        raise SystemExit(f'--pretrained {args.pretrained}: {e}') from None
    if world > 1 and device.type == 'cuda' and not core.vit:
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    core = core.to(device)
    if device.type == 'cuda':
        core = core.to(memory_format=torch.channels_last)
    return (dist.ddp(core, device) if world > 1 else core), core


def evaluate(val_loader, core, device, amp, epoch, log):
    """Top-1/top-5 and loss on the whole val set (every process; eval.lincls.validate), logged."""
    t0 = time.perf_counter()
    top1, top5, loss = (v[0] for v in validate(val_loader, core, device, amp))
    log.print(f'epoch {epoch}: val top-1 {top1:.2f}  top-5 {top5:.2f}  loss {loss:.4f}')
    rec = dict(epoch=epoch, top1=top1, top5=top5, val_loss=loss, val_time=time.perf_counter() - t0)
    log.record(type='finetune_eval', **rec)
    return rec


def describe_protocol(args, cfg, core, lr, train_set, val_set, train_tf, val_tf, world):
    """What finetune.json records about the run."""
    return dict(protocol='end-to-end fine-tuning (MAE main_finetune.py recipe, methods-modern.md §17.4)',
                pretrained=args.pretrained, random_init=args.random_init, **describe_backbone(cfg),
                feature='mean patch token -> fc_norm' if core.vit else 'global-average-pooled layer4',
                head_init='trunc-normal std 2e-5, bias 0', num_classes=len(train_set.classes), data=str(args.data),
                train_images=len(train_set), val_images=len(val_set), epochs=args.epochs, batch_size=args.batch_size,
                accum_iter=args.accum_iter, world_size=world, blr=args.blr, lr=lr, min_lr=args.min_lr,
                warmup_epochs=args.warmup_epochs, optimizer='AdamW (0.9, 0.999)', wd=args.wd,
                layer_decay=args.layer_decay, layer_ids='ViT: 0 embeddings, i+1 block i, depth+1 rest; '
                'ResNet: 0 stem, 1-4 layer1-4, 5 head', drop_path=args.drop_path, smoothing=args.smoothing,
                mixup=args.mixup, cutmix=args.cutmix, mixup_switch_prob=args.mixup_switch_prob,
                crop_size=args.crop_size, train_aug=describe(train_tf), val_aug=describe(val_tf), amp=args.amp,
                seed=args.seed)


def write_result(args, history, protocol, git, log):
    """<output-dir>/finetune.json: the last evaluation's top-1/top-5, the best, every evaluation."""
    last, best = history[-1], max(history, key=lambda r: r['top1'])
    result = dict(pretrained=args.pretrained, top1=last['top1'], top5=last['top5'], epoch=last['epoch'],
                  best=dict(epoch=best['epoch'], top1=best['top1'], top5=best['top5']), history=history,
                  protocol=protocol, git=git)
    out = Path(args.output_dir) / 'finetune.json'
    save_or_stop(lambda: write_json(out, result), 'the checkpoints are kept')
    log.print(f'fine-tuning: top-1 {last["top1"]:.2f}  top-5 {last["top5"]:.2f} after epoch {last["epoch"]} '
              f'(best top-1 {best["top1"]:.2f} at epoch {best["epoch"]}); written to {out}')
    return result


if __name__ == '__main__':
    main()
