#!/usr/bin/env python
"""Semi-supervised evaluation: fine-tune the whole network on a labelled 1% / 10% of the training
set (methods.md §9.3; OSS benchmarks/semi_classification/imagenet_{1,10}percent).

  python eval/semi.py --pretrained CKPT /data/imagenet --split-file splits/1percent.txt
  python eval/semi.py --pretrained CKPT /data/imagenet --fraction 0.1 --lr 0.01 --head-lr-mult 10
  torchrun --nproc_per_node=4 eval/semi.py --pretrained CKPT /data/imagenet --split-file 1percent.txt --grid

Protocol (OSS): the pre-trained backbone plus a new fc (N(0, 0.01), bias 0) are fine-tuned
together, BN in train mode (SyncBN under torchrun on GPUs); RandomResizedCrop + flip (32-px data:
padded RandomCrop + flip); SGD momentum 0.9, batch 256, 20 epochs, LR x0.2 at epochs 12 and 16;
weight decay 5e-4 for 1% and 1e-4 for 10% (default: 5e-4 below 5% labelled, else 1e-4); the fc
learns at --lr x --head-lr-mult. The protocol reports the best of the grid lr in {0.001, 0.01, 0.1}
x head multiplier in {1, 10, 100}: --grid runs those 9 fine-tunings one after the other and prints
the table. Top-1/top-5 on the full val split after the last epoch.

Labelled subset: --split-file takes our lists (scripts/make_splits.py: `class/file` per line,
also OSS's `class/file label`) or SimCLR's ImageNet lists (`n01440764_10026.JPEG` per line, class
= the part before '_'); --fraction draws a class-balanced subset on the fly (common.data.balanced_subset,
as make_splits.py). --lr is per 256 images and scaled linearly with the global batch.
Results go to <output-dir>/semi.json (grid: one folder per setting and grid.json).

Output folders: one that holds a fine-tuning (semi_checkpoint.pth or semi_log.jsonl; with --grid,
any setting's folder) is refused at start unless --resume auto continues it or --overwrite deletes
semi.py's own files there. A resumed run must be on the same pretrained weights (fingerprinted),
labelled images and run-defining flags, as in eval/lincls.py.

The epoch and the evaluation are eval/finetune.py's (common/finetune.py train_one_epoch and data
loaders, eval.lincls.validate); this file adds the protocol: the labelled subset, SGD with the
head's LR multiplier, the step schedule, plain cross-entropy without mixing, the grid.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/semi.py` finds common/

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common import augment, checkpoint, dist, optim  # noqa: E402
from common import finetune as ft  # noqa: E402
from common.data import balanced_subset, read_split_file  # noqa: E402
from common.log import Logger, TrainMeter  # noqa: E402
from common.run import positive  # noqa: E402
from eval.lincls import (MAY_CHANGE as LINCLS_MAY_CHANGE, Outputs, add_dist_timeout, backbone_weights,  # noqa: E402
                         build_linear_model, check_data, claim, describe, kept, save_or_stop, train_transform, validate,
                         weights_fingerprint, write_json)

CKPT_NAME = 'semi_checkpoint.pth'
LOG_NAME = 'semi_log.jsonl'
# as eval/lincls.py, and: the grid flags (each setting is a run of its own, in a folder of its own),
# the split file's path (the labelled images themselves are fingerprinted), --deterministic
MAY_CHANGE = LINCLS_MAY_CHANGE | {'grid', 'grid_lr', 'grid_head_lr_mult', 'split_file', 'deterministic'}
GRID_LR, GRID_HEAD = (0.001, 0.01, 0.1), (1.0, 10.0, 100.0)


def get_parser():
    p = argparse.ArgumentParser(description='Semi-supervised fine-tuning on a labelled fraction (OSS protocol)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='ImageNet-layout root with train/<class>/ and val/<class>/ folders')
    p.add_argument('--pretrained', required=True,
                   help='selfsup checkpoint, backbone.pth, facebookresearch/moco checkpoint or torchvision state dict')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--split-file', help='labelled images: our/OSS list (class/file) or SimCLR list (file per line)')
    g.add_argument('--fraction', type=float, help='labelled fraction drawn class-balanced on the fly, e.g. 0.01')
    p.add_argument('--split-seed', type=int, default=0, help='seed of the --fraction draw')
    g = p.add_argument_group('optimisation (OSS semi_classification defaults)')
    g.add_argument('--epochs', type=positive(int), default=20)
    g.add_argument('-b', '--batch-size', type=positive(int), default=256, help='GLOBAL batch over all processes')
    g.add_argument('--lr', type=positive(float), default=0.01,
                   help='backbone LR for a global batch of 256; scaled linearly')
    g.add_argument('--head-lr-mult', type=positive(float), default=1.0, help='the new fc learns at lr x this')
    g.add_argument('--schedule', type=int, nargs='*', default=[12, 16], help='LR x --gamma at these epochs')
    g.add_argument('--gamma', type=float, default=0.2, help='LR decay factor')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', type=float, default=None, help='weight decay; None = 5e-4 below 5%% labelled, else 1e-4')
    g.add_argument('--grid', action='store_true', help='run every --grid-lr x --grid-head-lr-mult and print the table')
    g.add_argument('--grid-lr', type=positive(float), nargs='+', default=list(GRID_LR))
    g.add_argument('--grid-head-lr-mult', type=positive(float), nargs='+', default=list(GRID_HEAD))
    g = p.add_argument_group('data, speed, output')
    g.add_argument('--crop-size', type=int, default=None, help='None = 32 for a CIFAR-stem backbone, else 224')
    g.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    g.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision')
    g.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto')
    g.add_argument('--seed', type=int, default=0, help='seed of fc init, shuffling and augmentation')
    g.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower on GPU)')
    add_dist_timeout(g)
    g.add_argument('--output-dir', default=None,
                   help='None = semi_<split>/ beside --pretrained. One that holds a fine-tuning is refused unless '
                        '--resume auto continues it or --overwrite replaces it')
    g.add_argument('--resume', default='', help=f"{CKPT_NAME} to continue, or 'auto' for output-dir/{CKPT_NAME} "
                   f"(a fresh run when there is none; with --grid, each setting's folder)")
    g.add_argument('--overwrite', action='store_true',
                   help=f'delete the fine-tuning in --output-dir ({CKPT_NAME}, {LOG_NAME}, semi.json; with --grid '
                        f'those of every setting and grid.json; nothing else) and start over')
    g.add_argument('--print-freq', type=int, default=10)
    return p


class KeyedSubset(torch.utils.data.Dataset):
    """The images `indices` of `dataset`, passing EpochSampler's (index, epoch) keys through, so each
    image's augmentation stays seeded by its own index (torch's Subset takes plain indices only)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    @property
    def samples(self):  # (path, label) of the labelled images: what common.run.data_fingerprint hashes
        return [self.dataset.samples[i] for i in self.indices]

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, None)
        return self.dataset[(self.indices[i], epoch) if epoch is not None else self.indices[i]]


def default_wd(fraction):
    """OSS: 5e-4 for the 1% subset, 1e-4 for 10%; the line is drawn at 5% labelled."""
    return 5e-4 if fraction < 0.05 else 1e-4


def labelled_indices(args, train_set, root):
    """(indices of the labelled training images, description of where they come from)."""
    if args.split_file:
        return read_split_file(args.split_file, train_set.samples, root), f'split file {args.split_file}'
    return (balanced_subset(train_set.samples, args.fraction, args.split_seed),
            f'class-balanced {args.fraction:g} (seed {args.split_seed})')


def main(argv=None):
    args = get_parser().parse_args(argv)
    _, world, device = dist.init_distributed(args.device, args.dist_timeout)
    pretrained = Path(args.pretrained).resolve()
    tag = Path(args.split_file).stem if args.split_file else f'{args.fraction * 100:g}percent'
    out = Path(args.output_dir) if args.output_dir else pretrained.parent / f'semi_{tag}'
    if args.grid and args.resume not in ('', 'auto'):
        raise SystemExit(f'--resume {args.resume}: --grid continues each setting from its own folder; use '
                         f'--resume auto')
    sd, cfg = backbone_weights(pretrained, weights_only=not args.unsafe_load)  # before any file is written
    if cfg.get('vit'):
        raise SystemExit(f'--pretrained {pretrained} holds a ViT backbone; eval/semi.py fine-tunes ResNets only '
                         f'(fine-tune it with eval/finetune.py; eval/lincls.py and eval/knn.py evaluate it frozen)')
    weights = (sd, cfg, weights_fingerprint(sd))
    cells = [(args, out)] if not args.grid else [
        (argparse.Namespace(**{**vars(args), 'lr': lr, 'head_lr_mult': mult}), out / f'lr{lr:g}_head{mult:g}')
        for lr in args.grid_lr for mult in args.grid_head_lr_mult]
    resumes = dist.on_main(lambda: claim_all(cells, args, out, weights[2]))  # every folder, before any runs
    results = {(a.lr, a.head_lr_mult): run(a, o, world, device, weights, r) for (a, o), r in zip(cells, resumes)}
    if args.grid:
        report_grid(results, args, out)
    dist.cleanup()


def claim_all(cells, args, out, fingerprint):
    """eval.lincls.claim for the folder of every (args, folder) cell; with --grid --overwrite also
    deletes the old grid.json. Returns the checkpoint each continues (or None)."""
    resumes = [claim(a, Outputs('semi', o, CKPT_NAME, LOG_NAME, ['semi.json'], default=not args.output_dir),
                     fingerprint, MAY_CHANGE) for a, o in cells]
    if args.grid and args.overwrite and (out / 'grid.json').is_file():
        (out / 'grid.json').unlink()
    return resumes


def report_grid(results, args, out):
    """Prints the lr x head-multiplier table of top-1 and writes grid.json (rank 0)."""
    log = Logger()
    best = max(results, key=lambda k: results[k]['top1'])
    log.print(f'top-1 (top-5) after {args.epochs} epochs; rows: lr, columns: head LR multiplier')
    log.print(f'{"lr":>8} ' + ' '.join(f'{"x" + format(m, "g"):>16}' for m in args.grid_head_lr_mult))
    for lr in args.grid_lr:
        cells = [f'{results[(lr, m)]["top1"]:6.2f} ({results[(lr, m)]["top5"]:6.2f})' +
                 ('*' if (lr, m) == best else ' ') for m in args.grid_head_lr_mult]
        log.print(f'{lr:>8g} ' + ' '.join(f'{c:>16}' for c in cells))
    log.print(f'best: lr {best[0]:g}, head x{best[1]:g}: top-1 {results[best]["top1"]:.2f}')
    grid = [dict(lr=k[0], head_lr_mult=k[1], top1=r['top1'], top5=r['top5']) for k, r in results.items()]
    report = dict(grid=grid, best=dict(lr=best[0], head_lr_mult=best[1], **results[best]))
    save_or_stop(lambda: write_json(out / 'grid.json', report), 'every setting\'s semi.json is kept')


def run(args, out, world, device, weights, ckpt_path):
    """One fine-tuning of `weights` (sd, cfg, fingerprint), continuing `ckpt_path` (None: a fresh
    run); returns {'top1', 'top5'} (and writes out/semi.json on rank 0). The epoch and the
    evaluation are eval/finetune.py's (common.finetune.train_one_epoch, eval.lincls.validate) with
    this protocol's optimizer, schedule, plain cross-entropy and no mixing."""
    dist.seed_all(args.seed, args.deterministic)
    sd, cfg, fingerprint = weights
    state = checkpoint.load(ckpt_path) if ckpt_path else None  # checked by claim() on rank 0
    log = Logger(out, filename=LOG_NAME)
    git = checkpoint.git_commit()
    log.print(f'git {git}  world size {world}  device {device}  output {out}')
    log.print('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    d = labelled_data(args, cfg, world, device, state, ckpt_path)
    model, core, optimizer, scaler, lr = build_training(args, sd, cfg, len(d.train_all.classes), world, device,
                                                        d.wd)
    start_epoch = 0
    if state:
        core.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        start_epoch = state['epoch']
        log.print(f'resumed from {ckpt_path} after epoch {start_epoch - 1}')
    protocol = describe_protocol(args, cfg, d, lr, world, device)
    log.record(type='semi_protocol', **protocol)
    log.print(f'{len(d.idx)} labelled images ({100 * d.frac:.2f}% of {len(d.train_all)}, {d.source}), '
              f'{d.sampler.iters} iterations/epoch, effective LR {lr:g} (fc x{args.head_lr_mult:g}), wd {d.wd:g}')

    # ============ fine-tuning ============
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')
    iters = d.sampler.iters
    for epoch in range(start_epoch, args.epochs):
        d.sampler.set_epoch(epoch)
        meter = TrainMeter(log, epoch, iters, args.batch_size, device, args.print_freq)
        ft.train_one_epoch(model, d.loader, optimizer, scaler,
                           lambda it: optim.lr_at(lr, epoch, it, iters, args.epochs, milestones=args.schedule,
                                                  gamma=args.gamma), meter, device, amp)
        ckpt = dict(kind='semi', model=core.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), epoch=epoch + 1, pretrained=str(Path(args.pretrained).resolve()),
                    pretrained_fingerprint=fingerprint, data=d.data, args=vars(args), git=git)
        save_or_stop(lambda: checkpoint.save_atomic(ckpt, out / CKPT_NAME), kept(epoch))
    return evaluate(args, out, core, d.val_loader, device, amp, protocol, git, log)


def labelled_data(args, cfg, world, device, state, ckpt_path):
    """The labelled training subset and the val set, their loaders (common.finetune, as
    eval/finetune.py) and the weight decay of the labelled fraction, as a namespace."""
    rank = dist.get_rank()
    crop = args.crop_size or (32 if cfg['cifar_stem'] else 224)
    train_tf, val_tf = train_transform(crop), augment.eval_transform(crop)
    train_all, val_set = ft.open_data(args.data, train_tf, val_tf, args.seed)
    try:
        idx, source = labelled_indices(args, train_all, Path(args.data) / 'train')
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    train_set = KeyedSubset(train_all, idx)
    sampler, loader = ft.train_loader(train_set, args.batch_size, rank, world, args.seed, args.workers, device)
    frac = len(idx) / len(train_all)
    return argparse.Namespace(
        crop=crop, train_tf=train_tf, val_tf=val_tf, train_all=train_all, val_set=val_set, idx=idx, source=source,
        frac=frac, sampler=sampler, loader=loader, data=check_data(state, train_set, ckpt_path),
        wd=args.wd if args.wd is not None else default_wd(frac),
        val_loader=ft.val_loader(val_set, args.batch_size // world, rank, world, args.workers, device))


def build_training(args, sd, cfg, num_classes, world, device, wd):
    """(model to train, bare model, SGD, GradScaler, effective LR): the pre-trained ResNet with a new
    fc N(0, 0.01)/0, SyncBN under torchrun on GPUs, the fc at --head-lr-mult x the LR."""
    model = build_linear_model(sd, cfg, num_classes)  # backbone loaded, fc fresh
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    if world > 1 and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, core = dist.place(model, device, sync_buffers=True, channels_last=False)
    lr = optim.scaled_lr(args.lr, args.batch_size)
    head = [p for n, p in core.named_parameters() if n.startswith('fc.')]
    body = [p for n, p in core.named_parameters() if not n.startswith('fc.')]
    optimizer = torch.optim.SGD([dict(params=body, lr_mult=1.0), dict(params=head, lr_mult=args.head_lr_mult)],
                                lr, momentum=args.momentum, weight_decay=wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    return model, core, optimizer, scaler, lr


def describe_protocol(args, cfg, d, lr, world, device):
    """What semi.json and the log record about the run."""
    return dict(protocol='semi-supervised fine-tuning (OSS semi_classification)', pretrained=str(args.pretrained),
                arch=cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'], sobel=cfg['in_channels'] == 2,
                labelled=d.source, labelled_images=len(d.idx), train_images=len(d.train_all), fraction=d.frac,
                val_images=len(d.val_set), num_classes=len(d.train_all.classes), epochs=args.epochs, lr=args.lr,
                effective_lr=lr, head_lr_mult=args.head_lr_mult, batch_size=args.batch_size, momentum=args.momentum,
                wd=d.wd, schedule=args.schedule, gamma=args.gamma, crop_size=d.crop, train_aug=describe(d.train_tf),
                val_aug=describe(d.val_tf),
                bn='train mode' + (', SyncBN' if world > 1 and device.type == 'cuda' else ''),
                fc_init='N(0, 0.01), bias 0', amp=args.amp, seed=args.seed, world_size=world)


def evaluate(args, out, core, val_loader, device, amp, protocol, git, log):
    """Top-1/top-5 on the full val split after the last epoch; out/semi.json on rank 0."""
    t0 = time.perf_counter()
    top1, top5, val_loss = (v[0] for v in validate(val_loader, core, device, amp))
    log.print(f'semi-supervised (lr {args.lr:g}, head x{args.head_lr_mult:g}): top-1 {top1:.2f}  '
              f'top-5 {top5:.2f}  val loss {val_loss:.4f}')
    log.record(type='semi', top1=top1, top5=top5, val_loss=val_loss, val_time=time.perf_counter() - t0)
    result = dict(pretrained=str(args.pretrained), top1=top1, top5=top5, protocol=protocol, git=git)
    save_or_stop(lambda: write_json(out / 'semi.json', result), kept(args.epochs))
    log.close()
    return dict(top1=top1, top5=top5)


if __name__ == '__main__':
    main()
