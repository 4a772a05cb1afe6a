#!/usr/bin/env python
"""Linear classification on a frozen backbone: the MoCo protocol (methods.md §1.5, §9.1 "last").

He et al., arXiv:1911.05722 §4.1; reference code facebookresearch/moco main_lincls.py. A fresh fc
on the global-average-pooled layer4 feature is trained with SGD (lr 30, wd 0, 100 epochs, x0.1 at
60 and 80) while the whole network, BN included, stays in eval mode.

  python eval/lincls.py --pretrained output/moco/checkpoint_last.pth /data/imagenet
  torchrun --nproc_per_node=8 eval/lincls.py --pretrained output/moco/backbone.pth /data/imagenet
  python eval/lincls.py --pretrained output/moco_demo/backbone.pth data/cifar10_sample   # 32-px recipe

--pretrained takes any training checkpoint of this repo, its backbone.pth, a facebookresearch/moco
checkpoint or a torchvision ResNet state dict; arch, width and stem are read off the weights. The
result (top-1/top-5 on val, last and best epoch) and the protocol go to <pretrained>.lincls.json.

Deviations from main_lincls.py:
  * --lr is per 256 images and scaled linearly with the global batch (the same at batch 256);
  * 32-px data (CIFAR-stem backbone or --crop-size < 64): RandomCrop(pad 4)+flip, val resize only;
  * val counts every image exactly once over all processes (DistributedSampler pads);
  * the backbone-unchanged check runs after the last epoch, over weights *and* BN statistics.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/lincls.py` finds common/

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms as T  # noqa: E402

from common import augment, checkpoint, dist, optim  # noqa: E402
from common.data import EpochSampler, build_dataset, has_split, loader_kwargs  # noqa: E402
from common.log import Logger, Meter, peak_memory_mb, progress  # noqa: E402
from common.resnet import build_resnet, infer_resnet_config  # noqa: E402

CKPT_NAME = 'lincls_checkpoint.pth'

# ============ arguments ============


def get_parser():
    p = argparse.ArgumentParser(description='Linear classification on a frozen backbone (MoCo protocol)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='ImageNet-layout root with train/<class>/ and val/<class>/ folders')
    p.add_argument('--pretrained', required=True,
                   help='selfsup checkpoint, backbone.pth, facebookresearch/moco checkpoint or torchvision '
                        'ResNet state dict')
    p.add_argument('--unsafe-load', action='store_true',
                   help='torch.load with weights_only=False (only for files you trust)')
    g = p.add_argument_group('optimisation (MoCo main_lincls.py defaults)')
    g.add_argument('--epochs', type=int, default=100, help='training epochs')
    g.add_argument('-b', '--batch-size', type=int, default=256,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=float, default=30.0, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[60, 80], help='x0.1 at these epochs')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--wd', type=float, default=0.0, help='weight decay')
    g = p.add_argument_group('data and speed')
    g.add_argument('--crop-size', type=int, default=None,
                   help='crop size; None = 32 for a CIFAR-stem backbone, else 224. Below 64 the 32-px '
                        'recipe is used (RandomCrop pad 4 + flip; val resize only)')
    g.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    g.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision')
    g.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='auto: CUDA when visible')
    g.add_argument('--seed', type=int, default=None,
                   help='seed of fc init, shuffling and augmentation; None = 0, or the resumed run\'s')
    g = p.add_argument_group('checkpoints and logging')
    g.add_argument('--output-dir', default=None,
                   help=f'for {CKPT_NAME}, lincls_log.jsonl and the result JSON; None = the folder of '
                        f'--pretrained (result JSON beside it)')
    g.add_argument('--resume', default='', help=f"{CKPT_NAME} to continue, or 'auto' for output-dir/{CKPT_NAME} "
                   f"if it exists")
    g.add_argument('--print-freq', type=int, default=10, help='iterations between progress lines')
    return p


# ============ backbone loading and checks ============


def backbone_weights(path, weights_only=True):
    """(backbone state dict with torchvision names and no fc, its ResNet config) from any checkpoint
    common.checkpoint.backbone_state_dict understands. SystemExit naming the problem otherwise."""
    try:
        sd = checkpoint.backbone_state_dict(checkpoint.load(path, weights_only=weights_only))
        return sd, infer_resnet_config(sd)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'--pretrained {path}: {e}') from None


def build_linear_model(sd, cfg, num_classes):
    """ResNet with a fresh num_classes fc and every other tensor loaded from `sd`.

    Loads with strict=False and then insists that exactly fc.weight/fc.bias are missing and nothing
    is unexpected, as main_lincls.py does: a renamed or partial backbone must not train silently.
    """
    model = build_resnet(cfg['arch'], num_classes, cfg['width'], cfg['cifar_stem'], cfg['in_channels'])
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise SystemExit(f'backbone does not match {cfg}: {" ".join(str(e).split())[:500]}') from None
    if set(missing) != {'fc.weight', 'fc.bias'} or unexpected:
        extra_missing = [k for k in missing if k not in ('fc.weight', 'fc.bias')]
        raise SystemExit(f'backbone does not match {cfg}: missing keys {extra_missing[:20]}, '
                         f'unexpected keys {unexpected[:20]} (only fc.weight/fc.bias may be missing)')
    return model


def check_backbone_unchanged(model, ref):
    """Raises RuntimeError naming the tensors of `model` that differ bitwise from `ref`, the backbone
    state dict it was loaded from (fc excluded). BN statistics are in `ref` too, so this also catches
    a backbone that ran in train mode."""
    cur = model.state_dict()
    changed = [k for k, v in ref.items() if not torch.equal(cur[k].cpu(), v.to(cur[k].dtype))]
    if changed:
        raise RuntimeError(f'{len(changed)} frozen backbone tensors changed during linear training: '
                           f'{changed[:10]}')


def train_transform(size):
    """Linear-eval training augmentation: RandomResizedCrop + flip (main_lincls.py); for 32-px data
    the CIFAR recipe, a 4-px padded RandomCrop + flip (resized first so larger images work too)."""
    if size < 64:
        ops = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=4)]
    else:
        ops = [T.RandomResizedCrop(size)]
    return T.Compose(ops + [T.RandomHorizontalFlip(), T.ToTensor(), augment.normalize])


def describe(tf):
    return ' + '.join(repr(t) for t in tf.transforms)


# ============ linear training ============


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.epochs < 1:
        raise SystemExit('--epochs must be at least 1')
    rank, world, device = dist.init_distributed(args.device)
    pretrained = Path(args.pretrained).resolve()
    out_dir = Path(args.output_dir) if args.output_dir else pretrained.parent
    result_path = out_dir / (pretrained.name + '.lincls.json')  # beside the checkpoint by default
    ckpt_path = out_dir / CKPT_NAME if args.resume == 'auto' else Path(args.resume) if args.resume else None
    state = None
    if ckpt_path and (args.resume != 'auto' or ckpt_path.is_file()):
        try:
            state = checkpoint.load(ckpt_path)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f'--resume: {e}') from None
        if state['pretrained'] != str(pretrained):
            raise SystemExit(f'--resume {ckpt_path} trained a linear classifier on {state["pretrained"]}, '
                             f'not on {pretrained}')
    if args.seed is None:  # a resumed run keeps its seed: shuffling and augmentation depend on it
        args.seed = state['args']['seed'] if state else 0
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    sd, cfg = backbone_weights(pretrained, weights_only=not args.unsafe_load)  # before any file is written
    log = Logger(out_dir, filename='lincls_log.jsonl')
    git = checkpoint.git_commit()
    log.print(f'git {git}  world size {world}  device {device}')
    log.print('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))

    # ============ data ============
    if args.batch_size % world:
        raise SystemExit(f'--batch-size {args.batch_size} is the global batch and must be divisible by '
                         f'the number of processes ({world})')
    local_bs = args.batch_size // world
    crop = args.crop_size or (32 if cfg['cifar_stem'] else 224)
    train_tf, val_tf = train_transform(crop), augment.eval_transform(crop)
    if not has_split(args.data, 'val'):
        raise SystemExit(f'data: {args.data} needs train/<class>/ and val/<class>/ folders (ImageNet layout)')
    try:
        train_set = build_dataset(args.data, train_tf, 'train', seed=args.seed)
        val_set = build_dataset(args.data, val_tf, 'val')
        sampler = EpochSampler(len(train_set), args.batch_size, rank, world, args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    if not train_set.classes or train_set.classes != val_set.classes:
        raise SystemExit(f'data: train and val must have the same class folders; got {len(train_set.classes)} '
                         f'train and {len(val_set.classes)} val classes')
    num_classes = len(train_set.classes)
    loader = torch.utils.data.DataLoader(train_set, batch_size=local_bs, sampler=sampler, drop_last=True,
                                         **loader_kwargs(args.workers, device))
    # every val image exactly once: process r scores images r, r+world, ... and the counts are summed
    val_share = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=local_bs, shuffle=False,
                                             **loader_kwargs(args.workers, device))
    iters = sampler.iters

    # ============ model ============
    model = build_linear_model(sd, cfg, num_classes)
    for name, p in model.named_parameters():  # freeze all but the classifier
        p.requires_grad = name in ('fc.weight', 'fc.bias')
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != 2:
        raise SystemExit(f'expected 2 trainable tensors (fc.weight, fc.bias), found {len(params)}')
    model = model.to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    core = model
    if world > 1:  # only fc has gradients; BN statistics are frozen, so no buffer broadcast
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                                    broadcast_buffers=False)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    optimizer = torch.optim.SGD(params, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    start_epoch, best, last = 0, None, None
    if state:
        core.fc.load_state_dict(state['fc'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        start_epoch, best, last = state['epoch'], state['best'], state['last']
        log.print(f'resumed from {ckpt_path} after epoch {start_epoch - 1}')
        del state

    protocol = dict(
        protocol='MoCo linear classification (main_lincls.py)', pretrained=str(pretrained),
        arch=cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'], in_channels=cfg['in_channels'],
        feat_dim=core.feat_dim, num_classes=num_classes, data=str(args.data), train_images=len(train_set),
        val_images=len(val_set), epochs=args.epochs, lr=args.lr, effective_lr=lr, batch_size=args.batch_size,
        world_size=world, momentum=args.momentum, wd=args.wd, schedule=args.schedule, gamma=0.1,
        lr_schedule='step, per epoch', crop_size=crop, train_aug=describe(train_tf), val_aug=describe(val_tf),
        bn='frozen: whole model in eval mode during training', trainable='fc.weight, fc.bias',
        fc_init='N(0, 0.01), bias 0', amp=args.amp, seed=args.seed)
    log.print('protocol: ' + json.dumps(protocol, indent=1))
    log.record(type='lincls_protocol', **protocol)
    log.print(f'effective LR {lr:g} = {args.lr:g} x {args.batch_size}/256; {len(train_set)} training images, '
              f'{iters} iterations/epoch, {len(val_set)} val images, {num_classes} classes')

    # ============ training loop ============
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss, train_acc = train_one_epoch(loader, model, optimizer, scaler, epoch, iters, lr, args,
                                                device, amp, log)
        top1, top5, val_loss = validate(val_loader, core, device, amp)
        last = dict(epoch=epoch, top1=top1, top5=top5)
        if best is None or top1 > best['top1']:
            best = dict(last)
        log.print(f'epoch {epoch}: val top-1 {top1:.2f}  top-5 {top5:.2f}  loss {val_loss:.4f}  '
                  f'(best top-1 {best["top1"]:.2f} at epoch {best["epoch"]})')
        log.record(step=(epoch + 1) * iters, type='lincls', epoch=epoch, train_loss=train_loss,
                   train_acc=train_acc, val_top1=top1, val_top5=top5, val_loss=val_loss,
                   lr=optim.lr_at(lr, epoch, 0, iters, args.epochs, milestones=args.schedule),
                   epoch_time=time.perf_counter() - t0, peak_mem_mb=peak_memory_mb(device))
        if dist.is_main():
            checkpoint.save_atomic(dict(fc=core.fc.state_dict(), optimizer=optimizer.state_dict(),
                                        scaler=scaler.state_dict(), epoch=epoch + 1, best=best, last=last,
                                        pretrained=str(pretrained), args=vars(args), protocol=protocol, git=git),
                                   out_dir / CKPT_NAME)

    # ============ sanity check and result ============
    try:
        check_backbone_unchanged(core, sd)
    except RuntimeError as e:
        raise SystemExit(f'sanity check failed: {e}') from None
    log.print('sanity check passed: backbone weights and BN statistics unchanged')
    if dist.is_main():
        result = dict(pretrained=str(pretrained), top1=last['top1'], top5=last['top5'], last=last, best=best,
                      protocol=protocol, lincls_checkpoint=str(out_dir / CKPT_NAME), git=git)
        result_path.write_text(json.dumps(result, indent=1) + '\n')
    log.print(f'linear classification: top-1 {last["top1"]:.2f}  top-5 {last["top5"]:.2f} after epoch '
              f'{last["epoch"]} (best top-1 {best["top1"]:.2f} at epoch {best["epoch"]}); written to {result_path}')
    log.close()
    dist.cleanup()


def train_one_epoch(loader, model, optimizer, scaler, epoch, iters, base_lr, args, device, amp, log):
    """One epoch; returns (mean loss, top-1 accuracy in %) on this process's training batches."""
    meters = [Meter('Time', ':.3f'), Meter('Data', ':.3f'), Meter('Loss', ':.4e'), Meter('Acc@1', ':.2f')]
    batch_time, data_time, losses, top1 = meters
    model.eval()  # the whole network, BN included: the backbone is a fixed feature extractor (§1.5)
    fmt = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    n = 0
    end = time.perf_counter()
    for it, (images, target, _) in enumerate(loader):
        data_time.update(time.perf_counter() - end)
        lr = optim.lr_at(base_lr, epoch, it, iters, args.epochs, milestones=args.schedule)
        optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with torch.autocast(**amp):
            output = model(images)  # NxC
        loss = F.cross_entropy(output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        hits = (output.argmax(1) == target).sum()
        loss_sum += loss.detach() * target.shape[0]  # kept on device: no sync per iteration
        correct += hits
        n += target.shape[0]
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:  # .item() syncs: only when printing
            losses.update(loss.item(), target.shape[0])
            top1.update(100.0 * hits.item() / target.shape[0], target.shape[0])
            batch_time.update(time.perf_counter() - end)
            log.print(progress(epoch, it + 1, iters, meters) + f'  lr {lr:g}')
        else:
            batch_time.update(time.perf_counter() - end)
        end = time.perf_counter()
    return loss_sum.item() / max(n, 1), 100.0 * correct.item() / max(n, 1)


@torch.no_grad()
def validate(loader, model, device, amp):
    """(top-1 %, top-5 %, mean loss) over the whole val set. `loader` holds this process's strided share;
    the counts are summed over processes. Call with the bare model, not DDP: shares may differ by one
    batch, and DDP forwards are collective."""
    model.eval()
    fmt = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, target, _ in loader:
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with torch.autocast(**amp):
            output = model(images).float()  # NxC
        hit = output.topk(min(5, output.shape[1]), dim=1).indices == target.view(-1, 1)  # Nx5
        stats[0] += hit[:, 0].sum()
        stats[1] += hit.any(1).sum()
        stats[2] += F.cross_entropy(output, target, reduction='sum')
        stats[3] += target.shape[0]
    dist.all_reduce_sum(stats)
    c1, c5, loss, n = stats.tolist()
    return 100.0 * c1 / n, 100.0 * c5 / n, loss / n


if __name__ == '__main__':
    main()
