#!/usr/bin/env python
"""Linear classification on a frozen backbone: the MoCo protocol (methods.md §1.5, §9.1 "last"), or
with --layers the multi-head protocol of Goyal et al. 2019 (methods.md §9.1 "multi-head").

He et al., arXiv:1911.05722 §4.1; reference code facebookresearch/moco main_lincls.py. A fresh fc
on the global-average-pooled layer4 feature is trained with SGD (lr 30, wd 0, 100 epochs, x0.1 at
60 and 80) while the whole network, BN included, stays in eval mode.

  python eval/lincls.py --pretrained output/moco/checkpoint_last.pth /data/imagenet
  torchrun --nproc_per_node=8 eval/lincls.py --pretrained output/moco/backbone.pth /data/imagenet
  python eval/lincls.py --pretrained output/moco_demo/backbone.pth data/cifar10_sample   # 32-px recipe

--pretrained takes any training checkpoint of this repo, its backbone.pth, a facebookresearch/moco
checkpoint or a torchvision ResNet state dict; arch, width and stem are read off the weights (a
2-channel conv1 runs behind DeepCluster's fixed Sobel front end). The result (top-1/top-5 on val,
last and best epoch) and the protocol go to <pretrained>.lincls.json.

Multi-head mode (OSS benchmarks/linear_classification/imagenet/r50_multihead.py), all heads in one pass:
  python eval/lincls.py --pretrained CKPT /data/imagenet --layers feat1 feat2 feat3 feat4 feat5
Each layer of the frozen backbone (eval mode) is average-pooled with the benchmark's fixed kernels
(~9k dims at 224 px; common/features.py) into its own BN(affine=False, train mode) + Linear head; the
losses are summed. --layers switches the defaults to that protocol (MULTIHEAD below; explicit flags
still win) and the train augmentation to RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4) +
lighting. Result: top-1/top-5 per layer.

ViT backbones (common/vit.py; read off the weights of a selfsup mocov3.py/dino.py checkpoint or
backbone.pth, or of a facebookresearch/moco-v3 or dino checkpoint) get one of three protocols,
--protocol mocov3, dino or mae (default: the method the checkpoint names, else mocov3). They freeze the
whole ViT in eval mode, train one Linear (mocov3, dino: N(0, 0.01)/0 with SGD momentum 0.9, wd 0, a
per-epoch cosine to 0), RandomResizedCrop(224) + flip, and check that the backbone did not change:
  * mocov3 (methods-modern.md §15.6, `M3:main_lincls.py`): the normed [CLS] token (timm's head on it);
    lr 3 per 256 (12 at batch 1024), batch 1024, 90 epochs; val Resize(256) + CenterCrop(224).
  * dino (§16.7, `DN:eval_linear.py`): the normed cls tokens of the last --n-last-blocks blocks
    concatenated (4 by default: 4 x 384 for ViT-S); for ViT-B 1 block plus the mean patch token
    (--avgpool-patchtokens, interleaved with the cls token dimension by dimension as in DINO, n = 1
    only); lr 0.001 per 256, batch 1024, 100 epochs; val Resize(256, bicubic) + CenterCrop(224).
  * mae (§17.5, `MAE:main_linprobe.py`; also --bn-head): the normed cls token through BatchNorm1d(affine
    =False, eps 1e-6, in train mode) into the Linear (trunc-normal std 0.01), FAIR LARS (MAE's
    util/lars.py) lr 0.1 per 256 (6.4 at batch 16384), wd 0, 10 warm-up epochs then a cosine to 0 per
    iteration (MAE's lr_sched), 90 epochs (ViT-B). Deviation: torchvision's RandomResizedCrop
    (bilinear, 10 tries) instead of MAE's one-shot bicubic TF-style crop (`MAE:util/crop.py`).
The recipe's values are the defaults; explicit flags still win. At 32 px the CIFAR augmentation
below replaces RandomResizedCrop. The number of heads is not in the weights: --num-heads, else the
checkpoint's args, else 12 for a MoCo v3 ViT-Small, else the size's default (6 for ViT-Small).

ResNet backbones may take SimSiam's LARS protocol instead, --protocol simsiam (methods-modern.md §12.5,
`SS:main_lincls.py`): the same frozen ResNet in eval mode and fc N(0, 0.01)/0, trained by SGD momentum
0.9, wd 0, lr 0.1 per 256 (1.6 at batch 4096) wrapped in apex LARC (trust 0.001, clip off:
common.optim.LARC), 90 epochs, per-epoch cosine to 0; explicit flags still win.

Deviations from main_lincls.py:
  * --lr is per 256 images and scaled linearly with the global batch (the same at batch 256);
  * 32-px data (CIFAR-stem backbone or --crop-size < 64): RandomCrop(pad 4)+flip, val resize only;
  * val counts every image exactly once over all processes (DistributedSampler pads);
  * the backbone-unchanged check runs after the last epoch, over weights *and* BN statistics.

Output folder (default: the training run's folder, which holds files that are not lincls's): one
that holds a linear run (lincls_checkpoint.pth or lincls_log.jsonl) is refused unless --resume auto
continues it or --overwrite deletes lincls's own files there (checkpoint, log, this --pretrained's
result JSON), nothing else. A resumed run must be on the same pretrained weights (a fingerprint of
the tensors, since a new training run replaces backbone.pth under the same name), the same training
images and the same run-defining flags; --epochs, workers, printing, device, amp and paths may change.
"""
import argparse
import contextlib
import hashlib
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
from common.run import data_fingerprint, positive  # noqa: E402
from common.data import EpochSampler, build_dataset, has_split, loader_kwargs  # noqa: E402
from common.log import Logger, Meter, peak_memory_mb, progress  # noqa: E402
from common.features import (STAGE, StagePool, build_backbone, default_crop, describe_backbone,  # noqa: E402
                             feature_dims, layer_name, sobel_flag, stage_channels, vit_eval_transform)
from common.resnet import infer_resnet_config  # noqa: E402
from common.vit import is_vit_state_dict  # noqa: E402

CKPT_NAME = 'lincls_checkpoint.pth'
LOG_NAME = 'lincls_log.jsonl'
# Flags that may change when a linear run is resumed: speed, logging, the length of the run (--epochs
# extends it), where the images live (their list is fingerprinted). --pretrained is compared by
# check_resume, as a resolved path and by a fingerprint of its weights.
MAY_CHANGE = {'epochs', 'workers', 'print_freq', 'output_dir', 'device', 'resume', 'overwrite', 'amp',
              'unsafe_load', 'dist_timeout', 'pretrained', 'data'}
# defaults of the multi-head protocol (OSS r50_multihead.py), applied when --layers is given
MULTIHEAD = dict(epochs=90, lr=0.01, schedule=[30, 60, 90], wd=1e-4, nesterov=True)
# defaults of the ViT protocols, applied when --pretrained holds a ViT (see the docstring)
VIT_RECIPES = {
    'mocov3': dict(epochs=90, lr=3.0, batch_size=1024, schedule=[], cos=True, wd=0.0),   # M3:CONFIG.md:141-149
    'dino': dict(epochs=100, lr=0.001, batch_size=1024, schedule=[], cos=True, wd=0.0),  # DN:eval_linear.py
    # MAE:main_linprobe.py:44-66, MAE:FINETUNE.md:138-155 (ViT-B: 90 epochs; batch 512 x 32 GPUs)
    'mae': dict(epochs=90, lr=0.1, batch_size=16384, schedule=[], cos=True, wd=0.0, warmup_epochs=10),
}
# defaults of SimSiam's LARS protocol for ResNets (--protocol simsiam), SS:main_lincls.py:44-57 and its README
RESNET_RECIPES = {'simsiam': dict(epochs=90, lr=0.1, batch_size=4096, schedule=[], cos=True, wd=0.0)}

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
    g.add_argument('--epochs', type=positive(int), default=100, help='training epochs')
    g.add_argument('-b', '--batch-size', type=positive(int), default=256,
                   help='GLOBAL batch over all processes (each process takes batch/world)')
    g.add_argument('--lr', type=positive(float), default=30.0, help='LR for a global batch of 256; scaled linearly')
    g.add_argument('--schedule', type=int, nargs='*', default=[60, 80], help='x0.1 at these epochs')
    g.add_argument('--cos', action=argparse.BooleanOptionalAction, default=False,
                   help='per-epoch cosine from the LR to 0 instead of --schedule (the ViT protocols\' schedule)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--wd', type=float, default=0.0, help='weight decay')
    g.add_argument('--nesterov', action=argparse.BooleanOptionalAction, default=False, help='Nesterov momentum')
    g.add_argument('--warmup-epochs', type=float, default=0,
                   help='linear LR warm-up from 0 (per iteration); with it the cosine runs per iteration over the '
                        'epochs after the warm-up, as MAE\'s lr_sched (--protocol mae: 10)')
    g = p.add_argument_group('multi-head mode (Goyal et al. 2019; OSS r50_multihead.py)')
    g.add_argument('--layers', type=layer_name, nargs='+', default=None,
                   help='one BN(affine=False) + linear head per layer on its fixed-pooled features: feat1..feat5 '
                        '(aliases stem, layer1..layer4) and/or avgpool; sets the defaults to ' +
                        ', '.join(f'{k}={v}' for k, v in MULTIHEAD.items()))
    g = p.add_argument_group('ViT backbones (methods-modern.md §15.6, §16.7)')
    g.add_argument('--protocol', choices=['mocov3', 'dino', 'mae', 'simsiam'], default=None,
                   help='ViT protocol and its defaults: mocov3 (normed cls token; ' +
                        ', '.join(f'{k}={v}' for k, v in VIT_RECIPES['mocov3'].items()) + ') or dino (last blocks\' '
                        'cls tokens; ' + ', '.join(f'{k}={v}' for k, v in VIT_RECIPES['dino'].items()) + ') or mae '
                        '(--bn-head); '
                        'None = the method the checkpoint names, else mocov3. ResNet: simsiam (LARC around SGD; ' +
                        ', '.join(f'{k}={v}' for k, v in RESNET_RECIPES['simsiam'].items()) + '); None = MoCo\'s')
    g.add_argument('--bn-head', action='store_true',
                   help='MAE\'s linear probe (= --protocol mae): normed cls token -> BatchNorm1d(affine=False, eps '
                        '1e-6) in train mode -> Linear, FAIR LARS; ' +
                        ', '.join(f'{k}={v}' for k, v in VIT_RECIPES['mae'].items()))
    g.add_argument('--n-last-blocks', type=positive(int), default=None,
                   help='dino: concatenate the normed cls tokens of the last n blocks; None = 1 for ViT-Base, else 4')
    g.add_argument('--avgpool-patchtokens', action=argparse.BooleanOptionalAction, default=None,
                   help='dino: also the mean patch token (n = 1 only); None = on for ViT-Base only')
    g.add_argument('--num-heads', type=positive(int), default=None,
                   help='ViT attention heads (not in the weights); None = the checkpoint\'s args, 12 for a MoCo v3 '
                        'ViT-Small, else the size\'s default')
    g = p.add_argument_group('data and speed')
    g.add_argument('--crop-size', type=int, default=None,
                   help='crop size; None = 32 for a CIFAR-stem backbone, a ViT\'s own size, else 224. Below 64 the '
                        '32-px recipe is used (RandomCrop pad 4 + flip; val resize only)')
    g.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    g.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision')
    g.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='auto: CUDA when visible')
    g.add_argument('--seed', type=int, default=None,
                   help='seed of fc init, shuffling and augmentation; None = 0, or the resumed run\'s')
    add_dist_timeout(g)
    g = p.add_argument_group('checkpoints and logging')
    g.add_argument('--output-dir', default=None,
                   help=f'for {CKPT_NAME}, {LOG_NAME} and the result JSON; None = the folder of '
                        f'--pretrained (result JSON beside it). One that holds a linear run is refused unless '
                        f'--resume auto continues it or --overwrite replaces it')
    g.add_argument('--resume', default='', help=f"{CKPT_NAME} to continue, or 'auto' for output-dir/{CKPT_NAME} "
                   f"(a fresh run when there is none)")
    g.add_argument('--overwrite', action='store_true',
                   help=f'delete the linear run in --output-dir ({CKPT_NAME}, {LOG_NAME}, result JSON; '
                        f'nothing else) and start over')
    g.add_argument('--print-freq', type=int, default=10, help='iterations between progress lines')
    return p


def add_dist_timeout(g):
    g.add_argument('--dist-timeout', type=positive(float), default=10, metavar='MIN',
                   help='minutes a process waits for the others in a collective before the run fails '
                        '(a stalled or dead process then ends the run instead of hanging it)')


def parse_args(argv=None, recipe=None):
    """The flags, with the multi-head defaults when --layers is given, or those of `recipe` (a
    VIT_RECIPES entry) for a ViT; explicit flags win over both."""
    p = get_parser()
    if p.parse_known_args(argv)[0].layers:
        p.set_defaults(**MULTIHEAD)
    if recipe:
        p.set_defaults(**recipe)
    return p.parse_args(argv)


def vit_protocol(argv, args, cfg):
    """For a ViT backbone: the flags re-read with its protocol's defaults (VIT_RECIPES), protocol,
    n_last_blocks and avgpool_patchtokens settled. SystemExit (one line) for ResNet-only flags and
    impossible combinations."""
    if args.layers:
        raise SystemExit(f'--layers {" ".join(args.layers)}: the multi-head protocol takes ResNet stages; a ViT offers '
                         f'--protocol mocov3 (normed cls token) or --protocol dino (--n-last-blocks N cls tokens, '
                         f'--avgpool-patchtokens)')
    if args.protocol == 'simsiam':
        raise SystemExit('--protocol simsiam is SimSiam\'s ResNet protocol; a ViT takes --protocol mocov3 or dino')
    if args.bn_head and args.protocol not in (None, 'mae'):
        raise SystemExit(f'--bn-head is the mae protocol; drop --protocol {args.protocol} or --bn-head')
    protocol = 'mae' if args.bn_head else args.protocol or cfg['method'] or 'mocov3'
    args = parse_args(argv, VIT_RECIPES[protocol])
    args.protocol, args.bn_head = protocol, protocol == 'mae'
    base = cfg['arch'] == 'vit_base'  # DN:eval_linear.py help, DN:README.md:332-345
    if protocol in ('mocov3', 'mae'):
        if args.n_last_blocks or args.avgpool_patchtokens:
            raise SystemExit(f'--n-last-blocks/--avgpool-patchtokens choose DINO\'s feature; the {protocol} protocol is '
                             f'the normed cls token: add --protocol dino')
        args.n_last_blocks, args.avgpool_patchtokens = 1, False
        return args
    if args.n_last_blocks is None:
        args.n_last_blocks = 1 if base else 4
    if args.avgpool_patchtokens is None:
        args.avgpool_patchtokens = base and args.n_last_blocks == 1
    if args.avgpool_patchtokens and args.n_last_blocks != 1:
        raise SystemExit(f'--avgpool-patchtokens works with --n-last-blocks 1 only (as in DINO), '
                         f'not {args.n_last_blocks}')
    if args.n_last_blocks > cfg['depth']:
        raise SystemExit(f'--n-last-blocks {args.n_last_blocks}: the ViT has {cfg["depth"]} blocks')
    return args


def resnet_protocol(argv, args, pretrained):
    """For a ResNet backbone: ViT-only flags refused in one line; --protocol simsiam re-reads the flags
    with its defaults (RESNET_RECIPES) and refuses what it cannot combine with."""
    vit_only = (('--protocol', args.protocol if args.protocol != 'simsiam' else None),
                ('--n-last-blocks', args.n_last_blocks), ('--avgpool-patchtokens', args.avgpool_patchtokens),
                ('--num-heads', args.num_heads), ('--bn-head', args.bn_head or None))
    given = [f for f, v in vit_only if v is not None]
    if given:
        raise SystemExit(f'{"/".join(given)}: for ViT backbones; --pretrained {pretrained} holds a ResNet')
    if args.protocol != 'simsiam':
        return args
    if args.layers or args.nesterov:
        raise SystemExit(f'--protocol simsiam trains one fc with LARC around plain SGD; drop '
                         f'{"--layers" if args.layers else "--nesterov"}')
    args = parse_args(argv, RESNET_RECIPES['simsiam'])
    args.protocol = 'simsiam'
    return args


def build_optimizer(params, lr, args):
    """(optimizer, description): SGD over the fc, wrapped in apex LARC for --protocol simsiam
    (SS:main_lincls.py:226-232: trust coefficient 0.001, clip=False; every tensor adapted)."""
    sgd = dict(momentum=args.momentum, weight_decay=args.wd)
    if args.protocol == 'mae':  # MAE:util/lars.py, FAIR LARS (1-D tensors: no decay, no adaptation)
        return optim.FairLARS(params, lr, **sgd), 'LARS (FAIR / MAE util/lars.py, trust 0.001)'
    if args.protocol == 'simsiam':
        return optim.LARC(params, lr, eta=0.001, **sgd), 'LARC (apex, trust 0.001, clip off) around SGD'
    return torch.optim.SGD(params, lr, nesterov=args.nesterov, **sgd), 'SGD'


def lr_of(base_lr, epoch, it, iters, args):
    """LR of iteration `it` of `epoch`: with --warmup-epochs MAE's lr_sched (linear warm-up, then a
    cosine to 0 over the rest, per iteration: MAE:util/lr_sched.py:9-21), else per-epoch cosine or steps."""
    if getattr(args, 'warmup_epochs', 0):
        return optim.warmup_cosine(base_lr, epoch + it / iters, args.warmup_epochs, args.epochs)
    return optim.lr_at(base_lr, epoch, it, iters, args.epochs, getattr(args, 'cos', False), milestones=args.schedule)


# ============ backbone loading and checks ============


def backbone_weights(path, weights_only=True, num_heads=None):
    """(backbone state dict with torchvision names and no fc, its ResNet config) from any checkpoint
    common.checkpoint.backbone_state_dict understands; for a ViT (timm names, no head) the config of
    common.checkpoint.vit_config (vit=True; heads: `num_heads`, the args, MoCo v3's 12 for ViT-S, the
    size's default), checked by building it. SystemExit naming the problem otherwise."""
    try:
        ckpt = checkpoint.load(path, weights_only=weights_only)
        sd = checkpoint.backbone_state_dict(ckpt, allow_vit=True)
        if is_vit_state_dict(sd):
            cfg = checkpoint.vit_config(sd, ckpt, num_heads, path)
            checkpoint.build_vit_backbone(sd, cfg)  # the weights fit the config
            return sd, cfg
        cfg = infer_resnet_config(sd)
        sobel_flag(cfg, ckpt.get('args') if isinstance(ckpt, dict) else None)  # args and conv1 must agree
        return sd, cfg
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'--pretrained {path}: {e}') from None


def build_linear_model(sd, cfg, num_classes):
    """ResNet with a fresh num_classes fc and every other tensor loaded from `sd`.

    Loads with strict=False and then insists that exactly fc.weight/fc.bias are missing and nothing
    is unexpected, as main_lincls.py does: a renamed or partial backbone must not train silently.
    A 2-channel backbone comes behind the Sobel front end (common.resnet.SobelResNet).
    """
    model = build_backbone(cfg, num_classes)
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


class ViTLinear(nn.Module):
    """Frozen ViT -> the protocol's feature -> `fc` (Linear, the only trainable tensors; named fc as in
    the ResNet mode, so checkpoints save core.fc). mocov3: the normed cls token (`M3:main_lincls.py`,
    timm's head on forward_features' cls token); dino: VisionTransformer.linear_features, the normed
    cls tokens of the last n blocks concatenated, with avgpool the mean patch token interleaved
    (`DN:eval_linear.py:166-170`), dim D x (n + avgpool). train() keeps the backbone in eval mode."""

    def __init__(self, backbone, num_classes, protocol='mocov3', n_last_blocks=1, avgpool=False):
        super().__init__()
        self.backbone, self.protocol, self.n, self.avgpool = backbone, protocol, n_last_blocks, avgpool
        self.feat_dim = backbone.embed_dim * (n_last_blocks + int(avgpool))
        self.bn_head = protocol == 'mae'  # MAE:main_linprobe.py:218-227: BN without affine before the head
        linear = nn.Linear(self.feat_dim, num_classes)
        self.fc = nn.Sequential(nn.BatchNorm1d(self.feat_dim, affine=False, eps=1e-6), linear) if self.bn_head \
            else linear

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x):
        if self.protocol in ('mocov3', 'mae'):
            return self.backbone.pooled(x, 'cls')
        return self.backbone.linear_features(x, self.n, self.avgpool)

    def forward(self, x):
        with torch.no_grad():  # frozen: no graph through the backbone
            f = self.features(x)
        return self.fc(f)


RESNET_TITLES = {'simsiam': 'SimSiam linear classification with LARS (main_lincls.py --lars; methods-modern.md §12.5)'}
VIT_TITLES = {'mocov3': 'MoCo v3 linear classification of a ViT (main_lincls.py; methods-modern.md §15.6)',
              'mae': 'MAE linear probing of a ViT (main_linprobe.py; methods-modern.md §17.5)',
              'dino': 'DINO linear classification of a ViT (eval_linear.py; methods-modern.md §16.7)'}


def vit_feature_text(args):
    """What ViTLinear feeds its fc, for the protocol record."""
    if args.protocol == 'mocov3':
        return 'normed [CLS] token (after the final LayerNorm)'
    if args.protocol == 'mae':
        return 'normed [CLS] token -> BatchNorm1d(affine=False, eps 1e-6, train mode) -> Linear'
    text = (f'normed [CLS] tokens of the last {args.n_last_blocks} blocks, concatenated' if args.n_last_blocks > 1
            else 'normed [CLS] token of the last block')
    return text + (', interleaved with the mean normed patch token' if args.avgpool_patchtokens else '')


def build_vit_linear_model(sd, cfg, num_classes, protocol, n_last_blocks=1, avgpool=False):
    """ViTLinear on the ViT of `cfg` loaded strictly from `sd` (no head, so nothing but fc is new)."""
    try:
        backbone = checkpoint.build_vit_backbone(sd, cfg)
    except ValueError as e:
        raise SystemExit(f'--pretrained: {e}') from None
    return ViTLinear(backbone, num_classes, protocol, n_last_blocks, avgpool)  # main() inits fc as for a ResNet


class MultiHeadLinear(nn.Module):
    """Frozen backbone -> fixed pooling of each chosen layer -> per layer BN2d(affine=False) over the
    pooled map's channels + Linear (OSS MultiClsHead). forward(x) -> HxNxC logits, one row per head.
    The heads live in `fc` (so checkpoints save core.fc as in the single-head mode); train() keeps
    the backbone in eval mode, so only the heads' BN statistics move."""

    def __init__(self, backbone, layers, num_classes, input_size):
        super().__init__()
        self.backbone, self.layers, self.feat_dim = backbone, list(layers), backbone.feat_dim
        self.pool = StagePool(self.layers, input_size)
        self.dims, ch = feature_dims(backbone, self.layers, input_size), stage_channels(backbone)
        self.fc = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(ch[STAGE[n]], affine=False, momentum=0.1), nn.Flatten(),
                                              nn.Linear(self.dims[n], num_classes)) for n in self.layers)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x):
        with torch.no_grad():  # frozen: no graph through the backbone
            maps = self.pool(self.backbone.forward_stages(x))
        return torch.stack([head(m) for head, m in zip(self.fc, maps)])  # HxNxC


def build_multihead_model(sd, cfg, num_classes, layers, input_size):
    """MultiHeadLinear on the backbone loaded strictly from `sd` (no fc), heads N(0, 0.01), bias 0."""
    backbone = build_backbone(cfg)
    try:
        backbone.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f'backbone does not match {cfg}: {" ".join(str(e).split())[:500]}') from None
    try:
        model = MultiHeadLinear(backbone, layers, num_classes, input_size)
    except ValueError as e:
        raise SystemExit(f'--layers: {e}') from None
    for m in model.fc.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)
    return model


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


# ============ output folder and resume checks (shared with eval/semi.py) ============

PROGRAMS = {'lincls': ('eval/lincls.py', 'linear-classification'), 'semi': ('eval/semi.py', 'semi-supervised')}


def weights_fingerprint(sd):
    """16 hex digits of sha1 over the names, dtypes, shapes and bytes of a backbone state dict: what
    a resumed run checks its pretrained weights by, since a new training run replaces backbone.pth
    under the same path. About 0.25 s for a ResNet-50 on one CPU core."""
    h = hashlib.sha1()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f'{k} {t.dtype} {tuple(t.shape)}\n'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class Outputs:
    """The files one evaluation program owns in its output `folder`: the checkpoint --resume
    continues, its log and its results. Only these count as a run there and only these are deleted
    by --overwrite: the folder is often a training run's, whose files are not the program's.
    `default`: the folder was not given with --output-dir (said so in messages)."""

    def __init__(self, kind, folder, ckpt, log, results=(), default=False):
        self.kind, self.folder, self.default = kind, Path(folder), default
        self.ckpt, self.log = self.folder / ckpt, self.folder / log
        self.results = [self.folder / r for r in results]
        self.title = PROGRAMS[kind][1]

    def held(self):
        return [p for p in (self.ckpt, self.log) if p.is_file()]

    def where(self):
        return f'{self.folder} (the default --output-dir)' if self.default else f'--output-dir {self.folder}'

    def clear(self):
        """--overwrite: deletes the program's own files (and a .tmp a failed save left)."""
        own = (self.ckpt, self.log, *self.results)
        gone = [q for p in own for q in (p, p.with_name(p.name + '.tmp')) if q.is_file() or q.is_symlink()]
        for p in gone:
            p.unlink()
        if gone:
            print(f'--overwrite: deleted {", ".join(p.name for p in gone)} in {self.folder}', flush=True)

    def held_message(self):
        """One line: what the folder holds, and the flags that continue it or start over."""
        state = None
        with contextlib.suppress(Exception):  # a message only: an unreadable file is named, not loaded
            state = torch.load(self.ckpt, map_location='cpu', weights_only=True, mmap=True)
        if isinstance(state, dict) and 'epoch' in state:
            what = (f'{self.ckpt.name}: trained on {state.get("pretrained", "?")}, {state["epoch"]} of '
                    f'{state.get("args", {}).get("epochs", "?")} epochs done')
        else:
            what = ', '.join(p.name for p in self.held()) + ' of a run that saved no checkpoint it can continue'
        return (f'{self.where()} already holds a {self.title} run ({what}); continue it with --resume auto, or '
                f'start over with --overwrite (deletes {self.ckpt.name}, {self.log.name} and the results), or '
                f'choose another --output-dir')


def checkpoint_kind(state):
    """'lincls', 'semi', 'training', 'backbone', 'moco' or None: what a loaded file is. Checkpoints
    written before 'kind' was stored are told apart by their keys."""
    if not isinstance(state, dict):
        return None
    if state.get('kind') in PROGRAMS:
        return state['kind']
    if 'model' in state and 'backbone_prefix' in state:
        return 'training'
    if {'fc', 'pretrained', 'epoch'} <= state.keys():
        return 'lincls'
    if {'model', 'optimizer', 'epoch'} <= state.keys():
        return 'semi'
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return 'backbone'
    return 'moco' if 'state_dict' in state else None


def load_eval_checkpoint(path, kind):
    """The `kind` checkpoint at --resume `path`, or SystemExit saying in one line what it is instead."""
    path, (prog, title) = Path(path), PROGRAMS[kind]
    if not path.exists():
        raise SystemExit(f'--resume {path} does not exist')
    if not path.is_file():
        raise SystemExit(f'--resume {path} is a folder, not a {title} checkpoint')
    with open(path, 'rb') as f:  # torch.load takes a text file for a pickle and blames its contents
        head = f.read(4)
    if not head.startswith((b'PK\x03\x04', b'\x80')):  # torch.save writes a zip, legacy files a pickle
        raise SystemExit(f'--resume {path} is not a {title} checkpoint (not a PyTorch file: '
                         f'{"it is empty" if not head else f"it starts with {head!r}"})')
    try:
        state = checkpoint.load(path, unsafe_flag=None)  # our checkpoints never need --unsafe-load
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f'--resume {path} is not a {title} checkpoint ({str(e).split(": ", 1)[-1]})') from None
    found = checkpoint_kind(state)
    if found == kind:
        return state
    method = state.get('method') or state.get('args', {}).get('method') if found == 'training' else None
    what = {'training': f'a {method}.py training checkpoint' if method else 'a training checkpoint',
            'backbone': 'a backbone file', 'moco': 'a facebookresearch/moco-style checkpoint'}.get(found)
    if what:
        raise SystemExit(f'--resume {path} is {what}, not a {title} checkpoint: pass it as --pretrained')
    if found in PROGRAMS:
        other = PROGRAMS[found][0]
        raise SystemExit(f'--resume {path} is a checkpoint of {other}, not of {prog}: continue it with {other}')
    keys = list(state)[:10] if isinstance(state, dict) else f'a {type(state).__name__}'
    raise SystemExit(f'--resume {path} is not a {title} checkpoint (it holds {keys})')


def claim(args, files, fingerprint, may_change):
    """Rank 0, before anything is written: the checkpoint this run continues (a path string), or None
    for a fresh run. SystemExit (one line) where the run would replace files it was not told to."""
    checkpoint.check_writable(files.folder)
    if not args.resume or (args.resume == 'auto' and not files.ckpt.is_file()):
        if args.resume == 'auto':  # a log without a checkpoint (killed in its first epoch) is appended to
            print(f'--resume auto: no {files.ckpt.name} in {files.folder}; starting a fresh run', flush=True)
        elif files.held() and not args.overwrite:
            raise SystemExit(files.held_message())
        if args.overwrite:
            files.clear()
        return None
    path = files.ckpt if args.resume == 'auto' else Path(args.resume)
    state = load_eval_checkpoint(path, files.kind)
    if args.overwrite and path.resolve().parent == files.folder.resolve():
        raise SystemExit(f'--overwrite would delete {path}, which --resume continues; drop one of the two')
    if path.resolve() != files.ckpt.resolve() and files.held():  # its next save would replace this run
        if not args.overwrite:
            raise SystemExit(files.held_message())
        files.clear()
    check_resume(state, path, args, fingerprint, may_change)
    return str(path)


def check_resume(state, path, args, fingerprint, may_change):
    """SystemExit naming each difference (both values) between the run `state` saved and this one:
    other pretrained weights, a run-defining flag, fewer --epochs than it has done. The flags that
    may change and do are printed."""
    saved = state.get('args', {})
    now = argparse.Namespace(**vars(args))
    if now.seed is None:  # lincls: a resumed run keeps its seed
        now.seed = saved.get('seed')
    bad, soft = checkpoint.changed_args(saved, now, may_change)
    old, pretrained = state.get('pretrained_fingerprint'), str(Path(args.pretrained).resolve())
    if state.get('pretrained', pretrained) != pretrained:  # the result JSON is named after the file, too
        bad.insert(0, f'it trained on {state["pretrained"]}, not on --pretrained {pretrained}')
    if old is None:  # written before fingerprints
        print(f'--resume {path} holds no fingerprint of its pretrained weights; they cannot be checked', flush=True)
    elif old != fingerprint:
        bad.insert(0, f'pretrained weights {old} -> {fingerprint}: {pretrained} holds other weights than it '
                      f'trained on (replaced by a new training run?)')
    if args.epochs < state['epoch']:
        bad.append(f'--epochs {args.epochs} < the {state["epoch"]} epochs it has done')
    if bad:
        raise SystemExit(f'--resume {path} differs from this run: {"; ".join(bad)}; resume with the checkpoint\'s '
                         f'weights and flags, or start over (without --resume, with --overwrite)')
    soft = [c for c in soft if not c.startswith(('--resume ', '--overwrite '))]  # how it was asked, not a change
    if soft:
        print(f'--resume {path}: continuing with changed flags: {"; ".join(soft)}', flush=True)


def check_data(state, train_set, path):
    """The training images' fingerprint (common.run.data_fingerprint); on resume, every process
    stops alike when it differs from the checkpoint's."""
    new = data_fingerprint(train_set)
    old = state.get('data') if state else None
    if old is not None and old != new:
        dist.exit_all(f'--resume {path}: other training images ({old["images"]} images, fingerprint '
                      f'{old["fingerprint"]} -> {new["images"]}, {new["fingerprint"]}); resume on the same data')
    return new


def save_or_stop(write, kept):
    """write() on rank 0; when it fails (full disk, folder gone) every process stops with one line
    naming the file, the OS error and what is `kept` (save_atomic leaves the previous file and
    removes its .tmp)."""
    def attempt():
        try:
            write()
        except OSError as e:
            raise SystemExit(f'{e}; {kept}; free space or fix the folder, then continue with --resume auto') from None
    dist.on_main(attempt)


def kept(epochs_done):
    """What a failed save leaves, for its message."""
    return f'the last checkpoint (epochs done: {epochs_done}) is kept' if epochs_done else 'no checkpoint was written before'


def write_json(path, obj):
    """A result file, atomically (a full disk leaves the previous one); OSError names the file."""
    tmp = Path(str(path) + '.tmp')
    try:
        tmp.write_text(json.dumps(obj, indent=1) + '\n')
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(f'cannot write {path}: {checkpoint.os_reason(e)}') from None


# ============ linear training ============


def lincls_data(args, cfg, vit, state, ckpt_path, rank, world, device):
    """Transforms, datasets, sampler and loaders: (train_set, val_set, sampler, loader, val_loader,
    heads, crop, train_tf, val_tf, data fingerprint)."""
    if args.batch_size % world:
        raise SystemExit(f'--batch-size {args.batch_size} is the global batch and must be divisible by '
                         f'the number of processes ({world})')
    local_bs = args.batch_size // world
    crop = args.crop_size or default_crop(cfg)
    multi = bool(args.layers)
    heads = list(dict.fromkeys(args.layers)) if multi else ['fc']
    train_tf = augment.goyal_linear(crop) if multi and crop >= 64 else train_transform(crop)
    # DINO evaluates on a bicubic resize (DN:eval_linear.py), MoCo v3 on torchvision's default bilinear
    val_tf = vit_eval_transform(crop) if vit and args.protocol == 'dino' else augment.eval_transform(crop)
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
    data = check_data(state, train_set, ckpt_path)
    loader = torch.utils.data.DataLoader(train_set, batch_size=local_bs, sampler=sampler, drop_last=True,
                                         **loader_kwargs(args.workers, device))
    # every val image exactly once: process r scores images r, r+world, ... and the counts are summed
    val_share = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=local_bs, shuffle=False,
                                             **loader_kwargs(args.workers, device))
    return train_set, val_set, sampler, loader, val_loader, heads, crop, train_tf, val_tf, data


def lincls_model(sd, cfg, args, vit, heads, num_classes, crop, device, world):
    """The frozen backbone with its classifier(s): (model, possibly DDP-wrapped; core; trainable params)."""
    multi = bool(args.layers)
    if multi:
        model = build_multihead_model(sd, cfg, num_classes, heads, crop)
    elif vit:
        model = build_vit_linear_model(sd, cfg, num_classes, args.protocol, args.n_last_blocks,
                                       args.avgpool_patchtokens)
    else:
        model = build_linear_model(sd, cfg, num_classes)
    for name, p in model.named_parameters():  # freeze all but the classifier(s)
        p.requires_grad = name.startswith('fc.') and name.endswith(('weight', 'bias'))
    if not multi:
        if getattr(model, 'bn_head', False):  # MAE:main_linprobe.py:223: trunc_normal_(std=0.01)
            linear = model.fc[1]
            nn.init.trunc_normal_(linear.weight, std=0.01)
        else:
            linear = model.fc
            nn.init.normal_(linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(linear.bias)
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != 2 * len(heads):
        raise SystemExit(f'expected {2 * len(heads)} trainable tensors (weight and bias of each fc), found {len(params)}')
    # only fc has gradients; BN statistics are frozen (multi-head: per process, rank 0's saved)
    model, core = dist.place(model, device)
    return model, core, params


def protocol_record(args, cfg, vit, heads, core, pretrained, optimizer_text, lr, world, crop, train_tf, val_tf,
                    n_train, n_val, num_classes):
    """What the result file and the log record about the protocol."""
    multi = bool(args.layers)
    protocol = dict(
        protocol='multi-head linear classification (Goyal et al. 2019; OSS r50_multihead.py)' if multi else
        VIT_TITLES[args.protocol] if vit else RESNET_TITLES.get(args.protocol, 'MoCo linear classification '
                                                                               '(main_lincls.py)'),
        pretrained=str(pretrained), optimizer=optimizer_text,
        **(describe_backbone(cfg) if vit else dict(arch=cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'],
                                                   in_channels=cfg['in_channels'])),
        feat_dim=core.feat_dim, num_classes=num_classes, data=str(args.data), train_images=n_train,
        val_images=n_val, epochs=args.epochs, lr=args.lr, effective_lr=lr, batch_size=args.batch_size,
        world_size=world, momentum=args.momentum, nesterov=args.nesterov, wd=args.wd, schedule=args.schedule,
        gamma=0.1, lr_schedule='cosine to 0, per epoch' if args.cos else 'step, per epoch', crop_size=crop,
        train_aug=describe(train_tf),
        val_aug=describe(val_tf), bn='frozen: whole model in eval mode during training', trainable='fc.weight, fc.bias',
        fc_init='N(0, 0.01), bias 0', amp=args.amp, seed=args.seed)
    if multi:
        protocol.update(layers=heads, feat_dims=core.dims, pooling='fixed avg-pool kernels, common/features.py',
                        bn='backbone frozen in eval mode; each head BatchNorm2d(affine=False, momentum 0.1) in train mode',
                        trainable='weight and bias of one Linear per layer', loss='sum of the heads\' cross-entropies')
    if vit:
        protocol.update(feature=vit_feature_text(args), n_last_blocks=args.n_last_blocks,
                        avgpool_patchtokens=args.avgpool_patchtokens)
    if args.warmup_epochs:
        protocol.update(lr_schedule=f'linear warm-up {args.warmup_epochs:g} epochs, then cosine to 0, per iteration')
    if getattr(args, 'bn_head', False):
        protocol.update(bn='backbone frozen in eval mode; head BatchNorm1d(affine=False, eps 1e-6) in train mode',
                        trainable='fc.1.weight, fc.1.bias', fc_init='trunc-normal std 0.01, bias 0')
    return protocol


def log_epoch(log, heads, multi, epoch, iters, top1, top5, val_loss, train_loss, train_acc, best, last, lr, args,
              t0, device):
    """Updates last/best per head after an evaluation, prints it and writes the epoch's record."""
    for i, h in enumerate(heads):
        last[h] = dict(epoch=epoch, top1=top1[i], top5=top5[i])
        best[h] = best[h] if h in best and best[h]['top1'] >= top1[i] else dict(last[h])
        log.print(f'epoch {epoch}: {"" if h == "fc" else h + " "}val top-1 {top1[i]:.2f}  top-5 {top5[i]:.2f}  '
                  f'loss {val_loss[i]:.4f}  (best top-1 {best[h]["top1"]:.2f} at epoch {best[h]["epoch"]})')
    vals = {k: dict(zip(heads, v)) if multi else v[0] for k, v in
            dict(val_top1=top1, val_top5=top5, val_loss=val_loss).items()}
    log.record(step=(epoch + 1) * iters, type='lincls', epoch=epoch, train_loss=train_loss,
               train_acc=train_acc, **vals,
               lr=lr_of(lr, epoch, 0, iters, args),
               epoch_time=time.perf_counter() - t0, peak_mem_mb=peak_memory_mb(device))


def final_result(core, sd, heads, multi, vit, pretrained, last, best, log):
    """The sanity check (backbone unchanged) and the result: per layer (multi-head) or top-1/top-5."""
    try:
        check_backbone_unchanged(core.backbone if multi or vit else core, sd)
    except RuntimeError as e:
        raise SystemExit(f'sanity check failed: {e}') from None
    log.print('sanity check passed: backbone weights unchanged' if vit else
              'sanity check passed: backbone weights and BN statistics unchanged')
    if multi:
        result = dict(pretrained=str(pretrained), layers={h: dict(top1=last[h]['top1'], top5=last[h]['top5'])
                                                           for h in heads}, last=last, best=best)
        log.print(f'{"layer":>8} {"dims":>6} {"top-1":>7} {"top-5":>7} {"best top-1 (epoch)":>20}')
        for h in heads:
            log.print(f'{h:>8} {core.dims[h]:>6} {last[h]["top1"]:>7.2f} {last[h]["top5"]:>7.2f} '
                      f'{best[h]["top1"]:>12.2f} ({best[h]["epoch"]})')
        return result
    last, best = last['fc'], best['fc']
    log.print(f'linear classification: top-1 {last["top1"]:.2f}  top-5 {last["top5"]:.2f} after epoch '
              f'{last["epoch"]} (best top-1 {best["top1"]:.2f} at epoch {best["epoch"]})')
    return dict(pretrained=str(pretrained), top1=last['top1'], top5=last['top5'], last=last, best=best)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed(args.device, args.dist_timeout)
    pretrained = Path(args.pretrained).resolve()
    out_dir = Path(args.output_dir) if args.output_dir else pretrained.parent
    result_path = out_dir / (pretrained.name + '.lincls.json')  # beside the checkpoint by default
    sd, cfg = backbone_weights(pretrained, not args.unsafe_load, args.num_heads)  # before any file is written
    vit = bool(cfg.get('vit'))
    args = vit_protocol(argv, args, cfg) if vit else resnet_protocol(argv, args, pretrained)
    fingerprint = weights_fingerprint(sd)
    files = Outputs('lincls', out_dir, CKPT_NAME, LOG_NAME, [result_path.name], default=not args.output_dir)
    ckpt_path = dist.on_main(lambda: claim(args, files, fingerprint, MAY_CHANGE))
    state = checkpoint.load(ckpt_path) if ckpt_path else None  # checked by claim() on rank 0
    if args.seed is None:  # a resumed run keeps its seed: shuffling and augmentation depend on it
        args.seed = state['args']['seed'] if state else 0
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    log = Logger(out_dir, filename=LOG_NAME)
    git = checkpoint.git_commit()
    log.print(f'git {git}  world size {world}  device {device}')
    log.print('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))

    # ============ data, model ============
    train_set, val_set, sampler, loader, val_loader, heads, crop, train_tf, val_tf, data = lincls_data(
        args, cfg, vit, state, ckpt_path, rank, world, device)
    multi, num_classes, iters = bool(args.layers), len(train_set.classes), sampler.iters
    model, core, params = lincls_model(sd, cfg, args, vit, heads, num_classes, crop, device, world)

    # ============ optimizer / resume ============
    lr = optim.scaled_lr(args.lr, args.batch_size)
    optimizer, optimizer_text = build_optimizer(params, lr, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    start_epoch, best, last = 0, {}, {}  # per head: {epoch, top1, top5}
    if state:
        core.fc.load_state_dict(state['fc'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        start_epoch, best, last = state['epoch'], state['best'], state['last']
        log.print(f'resumed from {ckpt_path} after epoch {start_epoch - 1}')
        del state
    protocol = protocol_record(args, cfg, vit, heads, core, pretrained, optimizer_text, lr, world, crop, train_tf,
                               val_tf, len(train_set), len(val_set), num_classes)
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
        top1, top5, val_loss = validate(val_loader, core, device, amp, len(heads))  # one entry per head
        log_epoch(log, heads, multi, epoch, iters, top1, top5, val_loss, train_loss, train_acc, best, last, lr, args,
                  t0, device)
        ckpt = dict(kind='lincls', fc=core.fc.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), epoch=epoch + 1, best=best, last=last, pretrained=str(pretrained),
                    pretrained_fingerprint=fingerprint, data=data, args=vars(args), protocol=protocol, git=git)
        save_or_stop(lambda: checkpoint.save_atomic(ckpt, files.ckpt), kept(epoch))

    # ============ sanity check and result ============
    result = final_result(core, sd, heads, multi, vit, pretrained, last, best, log)
    result.update(protocol=protocol, lincls_checkpoint=str(files.ckpt), git=git)
    save_or_stop(lambda: write_json(result_path, result), kept(args.epochs))
    log.print(f'written to {result_path}')
    log.close()
    dist.cleanup()


def train_one_epoch(loader, model, optimizer, scaler, epoch, iters, base_lr, args, device, amp, log):
    """One epoch; returns (mean loss, top-1 accuracy in %) on this process's training batches."""
    meters = [Meter('Time', ':.3f'), Meter('Data', ':.3f'), Meter('Loss', ':.4e'), Meter('Acc@1', ':.2f')]
    batch_time, data_time, losses, top1 = meters
    # the whole network, BN included, in eval mode: the backbone is a fixed feature extractor (§1.5);
    # a MultiHeadLinear keeps its backbone in eval mode itself and trains its heads' BN statistics
    # (MAE's BN head trains its statistics too: ViTLinear keeps the backbone in eval mode itself)
    core = getattr(model, 'module', model)
    model.train(isinstance(core, MultiHeadLinear) or getattr(core, 'bn_head', False))
    fmt = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    n = 0
    end = time.perf_counter()
    for it, (images, target, _) in enumerate(loader):
        data_time.update(time.perf_counter() - end)
        lr = lr_of(base_lr, epoch, it, iters, args)
        optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with torch.autocast(**amp):
            output = model(images)  # NxC, or HxNxC for H heads
        if output.dim() == 3:  # multi-head: the heads' losses are summed (OSS MultiClsHead); acc of the last
            loss = sum(F.cross_entropy(o.float(), target) for o in output)
            output = output[-1]
        else:
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
def validate(loader, model, device, amp, n_heads=1):
    """([top-1 %], [top-5 %], [mean loss]) over the whole val set, one entry per head (one for a single
    fc). `loader` holds this process's strided share; the counts are summed over processes. Call with
    the bare model, not DDP: shares may differ by one batch, and DDP forwards are collective."""
    model.eval()
    fmt = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    stats = torch.zeros(n_heads, 4, dtype=torch.float64, device=device)  # per head: correct@1, correct@5, loss sum, count
    for images, target, _ in loader:
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with torch.autocast(**amp):
            output = model(images).float()  # NxC or HxNxC
        output = output if output.dim() == 3 else output.unsqueeze(0)
        hit = output.topk(min(5, output.shape[2]), dim=2).indices == target.view(1, -1, 1)  # HxNx5
        stats[:, 0] += hit[:, :, 0].sum(1)
        stats[:, 1] += hit.any(2).sum(1)
        stats[:, 2] += torch.stack([F.cross_entropy(o, target, reduction='sum') for o in output])
        stats[:, 3] += target.shape[0]
    dist.all_reduce_sum(stats)
    c1, c5, loss, n = stats.T.tolist()
    return ([100.0 * a / m for a, m in zip(c1, n)], [100.0 * a / m for a, m in zip(c5, n)],
            [a / m for a, m in zip(loss, n)])


if __name__ == '__main__':
    main()
