#!/usr/bin/env python
"""MAE: masked autoencoders are scalable vision learners.

He, Chen, Xie, Li, Dollar and Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(arXiv:2111.06377). Reference code: facebookresearch/mae at efb2a80 (models_mae.py, main_pretrain.py,
engine_pretrain.py, util/pos_embed.py, util/lr_sched.py, PRETRAIN.md). Spec: methods-modern.md §0a,
§0b (the ViT) and §17; citations `MAE:file:lines` below are to that commit.

  python mae.py                                      # demo: shipped CIFAR-10 sample, CPU (see DEMO)
  torchrun --nnodes=8 --nproc_per_node=8 ... mae.py --amp fp16 /data/imagenet   # PRETRAIN.md: ViT-L, 4096
  torchrun --nproc_per_node=8 mae.py --amp fp16 -b 512 --accum-iter 8 /data/imagenet   # the same, 8 GPUs
  torchrun --nproc_per_node=8 mae.py --amp fp16 --arch vit_base -b 512 --accum-iter 8 /data/imagenet

The method, as facebookresearch/mae (PRETRAIN.md's recipe):
  * encoder: a ViT of common/vit.py (timm names; MAE's init, fixed sin-cos table) that sees only the
    visible patches: patch embedding + pos_embed[1:], per-sample random masking of 75% of the patches
    by sorting uniform noise, then cls + pos_embed[0] prepended, the blocks and the final norm
    (`MAE:models_mae.py:123-170`);
  * decoder: Linear(D -> 512), a learned mask token for every removed patch, the tokens put back in
    patch order, a fixed sin-cos table, 8 blocks of width 512 with 16 heads, a norm and Linear(512 ->
    p*p*3) (`MAE:models_mae.py:45-58,172-196`);
  * loss: MSE on the removed patches only, against the patches of the normalised input, each
    normalised by its own mean and variance (--norm-pix-loss) (`MAE:models_mae.py:95-107,198-214`);
  * AdamW betas (0.9, 0.95), wd 0.05 except biases and 1-D parameters (timm's add_weight_decay; the
    cls and mask tokens are decayed), lr 1.5e-4 x 4096/256 (effective batch: -b x --accum-iter), 40
    warm-up epochs then a cosine to --min-lr 0, per iteration; 800 epochs; no clipping
    (`MAE:main_pretrain.py:163-180`, `MAE:util/lr_sched.py:9-21`, `MAE:engine_pretrain.py:39-60`);
  * augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip (`MAE:main_pretrain.py:123-127`).
backbone.pth is the encoder (a common.vit VisionTransformer, timm names, pos_embed 'sincos_mae'), read
by eval/knn.py, eval/lincls.py and eval/extract.py. Every --vis-every epochs, and at the start and the
end, vis_EEEE.png shows fixed validation images (the first train images without a val split) under a
fixed mask: original / masked input / reconstruction with the visible patches pasted back.

Deviations from facebookresearch/mae:
  * -b is the global batch of one forward over all processes (the reference: per GPU); the LR scales
    with the effective batch -b x --accum-iter as there;
  * --norm-pix-loss is on by default (PRETRAIN.md passes it; the reference's argparse default is off);
  * --amp defaults to off as in every program here (the reference always runs fp16 autocast);
  * one process (no torchrun) is supported; with several, micro-batches of an accumulation window
    skip DDP's all-reduce until the last (the same gradient as the reference's all-reduce of each);
  * the mask noise of each process comes from its own seed (seed + rank), drawn in the training
    loop's RNG stream, which checkpoints save (the reference: torch.rand inside the model).
"""
import argparse
import contextlib
import math
import os

import torch
import torch.nn as nn
import torchvision.transforms as T
from torchvision.utils import save_image

from common import augment, checkpoint, dist, optim
from common.data import SAMPLE_DATA, build_dataset, has_split, train_loader
from common.log import start_run
from common.run import Run, add_run_args, autocast, compile_modules, positive
from common.vit import ARCHS, Block, build_vit, sincos_pos_embed

# ============ arguments ============


def ratio(text):
    """argparse type: a fraction in (0, 1)."""
    v = float(text)
    if not 0 < v < 1:
        raise ValueError
    return v


ratio.__name__ = 'fraction in (0, 1)'


def get_parser():
    p = argparse.ArgumentParser(description='MAE pre-training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', default=None,
                   help='ImageNet-layout root (train/<class>/...), image folder, or image-list file; '
                        'omit to run the demo on the shipped CIFAR-10 sample')
    g = p.add_argument_group('model')
    g.add_argument('--arch', default='vit_large', choices=list(ARCHS),
                   help='encoder (PRETRAIN.md recommends vit_large; vit_base for ViT-B/16)')
    g.add_argument('--patch-size', type=positive(int), default=None, help='default 16, and 4 from --crop-size 64 down')
    g.add_argument('--decoder-dim', type=positive(int), default=512, help='decoder width')
    g.add_argument('--decoder-depth', type=positive(int), default=8, help='decoder blocks')
    g.add_argument('--decoder-heads', type=positive(int), default=16, help='decoder attention heads')
    g = p.add_argument_group('MAE')
    g.add_argument('--mask-ratio', type=ratio, default=0.75, help='fraction of the patches removed')
    g.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction, default=True,
                   help='targets: each patch normalised by its own mean and variance')
    g.add_argument('--vis-every', type=int, default=20,
                   help='reconstruction PNG every N epochs (0 = at the start and the end only)')
    g.add_argument('--vis-images', type=positive(int), default=8, help='validation images in the PNG')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive(int), default=800)
    g.add_argument('-b', '--batch-size', type=positive(int), default=4096,
                   help='GLOBAL batch of one forward over all processes (each process takes batch/world)')
    g.add_argument('--accum-iter', '--accum-steps', type=positive(int), default=1,
                   help='batches whose gradients are summed per optimizer step, effective batch -b x this '
                        '(--accum-steps: the other programs\' spelling)')
    g.add_argument('--lr', type=positive(float), default=1.5e-4,
                   help='base LR (the reference\'s blr) for an effective batch of 256, scaled linearly')
    g.add_argument('--min-lr', type=float, default=0., help='end of the cosine')
    g.add_argument('--wd', type=float, default=0.05, help='weight decay (not on biases and 1-D parameters)')
    g.add_argument('--warmup-epochs', type=float, default=40, help='linear warm-up from 0, per iteration')
    g = add_run_args(p, 'output/mae')
    g.add_argument('--crop-size', type=positive(int), default=224, help='training crop (32 for CIFAR)')
    g.add_argument('--crop-min', type=float, default=0.2, help='smallest RandomResizedCrop scale')
    return p


# demo: ViT-Tiny at 32 px with patch 4 (8x8 patches, 16 visible + cls in the encoder) and a 2-block,
# 128-d decoder, ~0.7 GFLOP per image and step: ~50 s an epoch on 2 idle cores. A 10x base LR for a run
# of 20 epochs (3 make the PNGs but not a backbone that fine-tunes better than random init); no kNN
# monitor (MAE's kNN is low by design); the evidence is the loss, vis_*.png and eval/finetune.py
DEMO = dict(data=str(SAMPLE_DATA), arch='vit_tiny', crop_size=32, patch_size=4, decoder_dim=128, decoder_depth=2,
            decoder_heads=4, batch_size=128, lr=1.5e-3, warmup_epochs=1, epochs=20, workers=2, knn_every=0,
            vis_every=1, save_freq=1, output_dir='output/mae_demo', seed=0)


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.data is None:  # demo defaults, still overridable by explicit flags
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    args.patch_size = args.patch_size or (4 if args.crop_size <= 64 else 16)  # common/vit.default_patch_size
    patches = (args.crop_size // args.patch_size) ** 2
    if args.crop_size % args.patch_size:
        raise SystemExit(f'--crop-size {args.crop_size} is not a multiple of --patch-size {args.patch_size}')
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        raise SystemExit(f'--decoder-dim {args.decoder_dim} must be divisible by 4 (the sin-cos table) and by '
                         f'--decoder-heads {args.decoder_heads}')
    if int(patches * (1 - args.mask_ratio)) == 0:
        raise SystemExit(f'--mask-ratio {args.mask_ratio} leaves no visible patch of {patches}')
    return args


# ============ model and loss ============


def patchify(imgs, p):
    """NxCxHxW -> NxLx(p*p*C), patches in row-major order, each flattened as (row in patch, column in
    patch, channel) (`MAE:models_mae.py:95-107`)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, grid, c=3):
    """NxLx(p*p*C) -> NxCxHxW on a (rows, columns) grid: the inverse of patchify."""
    (gh, gw), n = grid, x.shape[0]
    x = x.reshape(n, gh, gw, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, gh * p, gw * p)


def random_masking(x, mask_ratio, noise):
    """Per-sample random masking (`MAE:models_mae.py:123-148`): the patches with the smallest noise are
    kept. x: NxLxD, noise: NxL. Returns the kept tokens Nx(L_keep)xD in ascending-noise order, the
    mask NxL (1 = removed) in patch order, and ids_restore NxL (the shuffle's inverse)."""
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # NxL, ascending: small noise = kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, length, dtype=x.dtype, device=x.device)
    mask[:, :keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def pixel_target(imgs, p, norm_pix=True):
    """NxLx(p*p*3) targets: the patches of the (normalised) input, each minus its mean over its p*p*3
    values and divided by sqrt(unbiased variance + 1e-6) with norm_pix (`MAE:models_mae.py:204-208`)."""
    target = patchify(imgs, p)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** .5
    return target


def mae_loss(pred, target, mask):
    """Mean over the removed patches of each patch's mean squared error (`MAE:models_mae.py:210-214`).
    pred, target: NxLxK; mask: NxL, 1 = removed."""
    per_patch = ((pred - target) ** 2).mean(-1)  # NxL
    return (per_patch * mask).sum() / mask.sum()


class MAE(nn.Module):
    """Masked autoencoder: `encoder` (common.vit VisionTransformer, the saved backbone) on the visible
    patches, and a narrow decoder (`MAE:models_mae.py:22-63`). forward(imgs, noise) -> (loss, pred
    NxLx(p*p*3), mask NxL); noise NxL uniform (drawn here when None) chooses the kept patches."""

    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                 norm_pix_loss=True):
        super().__init__()
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        pe = encoder.patch_embed
        self.patch_size, self.grid = pe.patch_size, pe.grid_size
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = sincos_pos_embed(decoder_dim, self.grid, cols_first=True)  # MAE's table (§0b.1)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, pe.patch_size ** 2 * pe.proj.in_channels)
        self._init_decoder()

    @torch.no_grad()
    def _init_decoder(self):
        """MAE's init of the decoder (`MAE:models_mae.py:78-93`): Xavier-uniform Linears with zero bias,
        LayerNorm 1/0, the mask token N(0, 0.02). The encoder's is common.vit init 'mae'."""
        for name, m in self.named_modules():
            if name.startswith('encoder'):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=.02)

    def forward_encoder(self, imgs, noise):
        """The encoder's blocks on cls + the visible patches (`MAE:models_mae.py:150-170`)."""
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]  # NxLxD, positions added before masking
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.pos_drop(torch.cat([cls, x], 1))  # Nx(1+L_keep)xD
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """Nx(1+L_keep)xD latents -> NxLx(p*p*3) predictions (`MAE:models_mae.py:172-196`)."""
        x = self.decoder_embed(x)  # Nx(1+L_keep)xD'
        n, length = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length + 1 - x.shape[1], -1)], 1)  # NxLxD'
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # patch order
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # cls row dropped

    def forward(self, imgs, noise=None):
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.grid[0] * self.grid[1], device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # under AMP the loss is float32
        target = pixel_target(imgs.to(dtype), self.patch_size, self.norm_pix_loss)
        return mae_loss(pred.to(dtype), target, mask.to(dtype)), pred, mask


def weight_decay_groups(model, wd):
    """timm's add_weight_decay as MAE calls it (`MAE:main_pretrain.py:178-180`): biases and 1-D
    parameters without weight decay, every other trainable parameter (cls and mask tokens included)
    with `wd`; frozen ones (the sin-cos tables) left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.), dict(params=decay, weight_decay=wd)]


def augmentation(size=224, crop_min=0.2):
    """MAE's only augmentation (`MAE:main_pretrain.py:123-127`): bicubic RandomResizedCrop, flip."""
    return T.Compose([T.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), augment.normalize])


def build_model(args):
    """MAE of the flags (parse_args checked that the sizes fit): the --arch ViT with MAE's init and table."""
    encoder = build_vit(args.arch, args.patch_size, img_size=args.crop_size, init='mae', pos_embed='sincos_mae')
    return MAE(encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads, args.mask_ratio, args.norm_pix_loss)


# ============ reconstruction PNG ============


class Visualizer:
    """Fixed images (the first `n` of val, else train, deterministic view) and a fixed mask (seed 0),
    so that successive PNGs compare. write(core, name) saves a 3-row grid (original / masked input /
    reconstruction with the visible patches pasted back) and returns the loss on these images. With
    norm-pix targets the prediction is shown with each patch's true mean and variance put back."""

    def __init__(self, data, size, n, output_dir, device):
        split = 'val' if has_split(data, 'val') else 'train'
        tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                        augment.normalize])
        try:
            dataset = build_dataset(data, tf, split)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f'data: {e}') from None
        n = min(n, len(dataset))
        self.images = torch.stack([dataset[i][0] for i in range(n)]).to(device)
        self.noise, self.dir, self.split = None, output_dir, split
        self.mean = torch.tensor(augment.normalize.mean, device=device)[:, None, None]
        self.std = torch.tensor(augment.normalize.std, device=device)[:, None, None]

    @torch.no_grad()
    def write(self, core, name):
        x, p = self.images, core.patch_size
        if self.noise is None:  # NxL, the same mask in every PNG of the run
            g = torch.Generator().manual_seed(0)
            self.noise = torch.rand(x.shape[0], core.grid[0] * core.grid[1], generator=g).to(x.device)
        was_training = core.training
        core.eval()
        loss, pred, mask = core(x, self.noise)
        core.train(was_training)
        pred = pred.float()
        if core.norm_pix_loss:  # back to the input's scale, with the true patch statistics
            t = patchify(x, p)
            pred = pred * (t.var(-1, keepdim=True) + 1e-6) ** .5 + t.mean(-1, keepdim=True)
        m = unpatchify(mask[..., None].expand(-1, -1, p * p * 3).float(), p, core.grid)  # NxCxHxW, 1 = removed
        rec = unpatchify(pred, p, core.grid)
        shown = [x, x * (1 - m), x * (1 - m) + rec * m]  # masked patches 0 = the mean colour
        grid = torch.cat([(y * self.std + self.mean).clamp(0, 1) for y in shown])
        path = os.path.join(self.dir, name)
        save_image(grid.cpu(), path, nrow=x.shape[0], padding=1)
        return loss.item(), path


# ============ training ============


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    ckpt_path, ckpt = checkpoint.open_resume(args, 'mae')
    dist.seed_all(args.seed, args.deterministic)
    log, git = start_run(args, world, device)

    # ============ data ============
    train_set, sampler, loader = train_loader(args.data, augmentation(args.crop_size, args.crop_min), args.batch_size,
                                              rank, world, args.seed, args.workers, device)
    iters = sampler.iters
    eff_batch = args.batch_size * args.accum_iter
    log.print(f'{len(train_set)} training images, {iters} iterations/epoch ({iters // args.accum_iter} optimizer '
              f'steps), global batch {args.batch_size} ({args.batch_size // world} per process) x --accum-iter '
              f'{args.accum_iter} = effective batch {eff_batch}')

    # ============ model ============
    model, core = dist.place(build_model(args), device, channels_last=False)  # no BN: no buffers to sync
    torch.manual_seed(args.seed + rank)  # the mask noise differs between processes (MAE seeds seed + rank)
    log.print(f'encoder {args.arch}/{core.patch_size} at {args.crop_size} px ({core.grid[0]}x{core.grid[1]} patches, '
              f'{int(core.grid[0] * core.grid[1] * (1 - args.mask_ratio))} visible), decoder {args.decoder_depth} '
              f'blocks of {args.decoder_dim} with {args.decoder_heads} heads, norm-pix loss '
              f'{"on" if args.norm_pix_loss else "off"}')

    # ============ optimizer / resume ============
    lr = args.lr * eff_batch / 256  # MAE:main_pretrain.py:163-166
    groups = weight_decay_groups(core, args.wd)
    optimizer = torch.optim.AdamW(groups, lr, betas=(0.9, 0.95))
    log.print(f'AdamW (0.9, 0.95): effective LR {lr:g} = {args.lr:g} x {eff_batch}/256, wd {args.wd:g} on '
              f'{len(groups[1]["params"])} tensors, none on {len(groups[0]["params"])} (biases, 1-D)')
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    run = Run(args, core, 'encoder', optimizer, scaler, ckpt, ckpt_path, git, log, device, train_set)
    compile_modules(args, core)  # --compile
    vis = Visualizer(args.data, args.crop_size, args.vis_images, args.output_dir, device)  # rank 0 writes
    if not run.resumed:
        visualize(vis, core, run.start_epoch, log)
    del ckpt

    # ============ training loop ============
    for epoch in range(run.start_epoch, args.epochs):
        sampler.set_epoch(epoch, run.start_iter)
        if train_one_epoch(loader, model, core, optimizer, scaler, epoch, run.start_iter, iters, lr, args,
                           device, run):
            break  # --max-steps
        run.start_iter = 0
        if (args.vis_every and (epoch + 1) % args.vis_every == 0) or epoch + 1 == args.epochs:
            visualize(vis, core, epoch + 1, log)
        run.epoch_end(epoch)
    run.finish()
    return core


def visualize(vis, core, epoch, log):
    """The PNG after `epoch` epochs (rank 0) and its loss as a log record."""
    if dist.is_main():
        loss, path = vis.write(core, f'vis_{epoch:04d}.png')
        log.print(f'reconstructions after {epoch} epochs: {path} (loss on the {vis.images.shape[0]} fixed '
                  f'{vis.split} images {loss:.4f})')
        log.record(type='vis', epoch=epoch, vis_loss=loss, path=path)


def train_one_epoch(loader, model, core, optimizer, scaler, epoch, start_iter, iters, base_lr, args, device, run):
    """One epoch from `start_iter`; returns True when --max-steps was reached. The gradients of
    --accum-iter batches are summed per step (each loss / accum-iter); a window the epoch's end cuts
    short is dropped, as the reference's zero_grad at every epoch start does."""
    model.train()
    accum = args.accum_iter
    steps_per_epoch = iters // accum
    meter = run.train_meter(epoch, iters, args.batch_size)
    optimizer.zero_grad(set_to_none=True)
    lr = base_lr
    for it, (images, _, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        if it % accum == 0:  # LR per iteration, at the window's first batch (MAE:engine_pretrain.py:42-43)
            lr = optim.warmup_cosine(base_lr, epoch + it / iters, args.warmup_epochs, args.epochs, args.min_lr)
            for g in optimizer.param_groups:
                g['lr'] = lr
        update = (it + 1) % accum == 0
        images = images.to(device, non_blocking=True)
        sync = model.no_sync() if not update and model is not core else contextlib.nullcontext()
        with sync:
            with autocast(args, device):
                loss, _, _ = model(images)
            if not math.isfinite(loss.item()):
                raise SystemExit(f'loss is {loss.item()} at epoch {epoch} iteration {it}; stopping (lower --lr or '
                                 f'--amp off)')
            scaler.scale(loss / accum).backward()
        if update:
            scaler.step(optimizer)  # no clipping (MAE:util/misc.py:257-270 with clip_grad None)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        meter.step(it, lr, loss=loss)
        if (update or it + 1 == iters) and run.step_end(epoch * steps_per_epoch + (it + 1) // accum, epoch, it, iters):
            return True
    meter.epoch_end()
    return False


if __name__ == '__main__':
    main()
