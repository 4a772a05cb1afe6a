#!/usr/bin/env python
"""Converts the backbone of any checkpoint eval/ accepts to another library's format.

  python scripts/convert.py output/moco/checkpoint_last.pth moco_r50_tv.pth --to torchvision
  python scripts/convert.py output/moco/checkpoint_last.pth moco_r50_timm.pth --to timm
  python scripts/convert.py output/moco/checkpoint_last.pth moco_r50.pkl --to detectron2

torchvision: a state dict with torchvision.models.resnetXX names and no fc. When torchvision has
  the architecture (resnet18-152, width 64, ImageNet stem, RGB) it is strictly loaded into
  torchvision.models.<arch>() with fc = Identity; otherwise (resnet10, other widths, CIFAR stem,
  Sobel input) strictly into common.resnet's network, and the note says how to rebuild it.
timm: the same tensors under the same names: timm's ResNet (timm/models/resnet.py) names its
  layers as torchvision does (conv1, bn1, layer1-4 with conv1/bn1/... and downsample.0/.1, fc; its
  default resnet18 weights are torchvision's own file). Load with
  timm.create_model('resnet50', num_classes=0).load_state_dict(sd); checked against timm when
  it is installed.
detectron2: eval/detection/convert_to_detectron2.py (see eval/detection/README.md).

ViT backbones (common.vit, timm names; also MoCo v3 and DINO checkpoints, methods-modern.md §0b.4):
torchvision: renamed for torchvision.models.VisionTransformer (common.vit.to_torchvision) and
  strictly loaded into one of the same size with heads = Identity. The number of heads is not in
  the weights: build it with the run's (ViT-S: 6 for DINO, 12 for MoCo v3).
timm: the same tensors under the same names, strictly loaded into timm's VisionTransformer when timm
  is installed. detectron2: ResNets only.
Every conversion fails with the key names when a tensor is left over or missing.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # finds common/ and eval/

import torch.nn as nn  # noqa: E402

from common import checkpoint  # noqa: E402
from common.features import build_backbone  # noqa: E402
from common.resnet import infer_resnet_config  # noqa: E402
from common.vit import (holds_vit, infer_vit_config, to_torchvision, torchvision_vit,  # noqa: E402
                        vit_backbone_state_dict)
from eval.detection.convert_to_detectron2 import convert as convert_detectron2  # noqa: E402

TORCHVISION_ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')


def strict_load(model, sd, what):
    """load_state_dict(strict=True) with a one-line error naming the leftover/missing keys."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f'{what}: missing keys {list(missing)[:20]}, leftover keys {list(unexpected)[:20]}')
    return model


def torchvision_compatible(cfg):
    return (cfg['arch'] in TORCHVISION_ARCHS and cfg['width'] == 64 and not cfg['cifar_stem']
            and cfg['in_channels'] == 3)


def check_torchvision(sd, cfg):
    """Strict load into torchvision's network (or ours when torchvision cannot build it); returns a note."""
    if torchvision_compatible(cfg):
        import torchvision
        model = getattr(torchvision.models, cfg['arch'])()  # weights=None: nothing is downloaded
        model.fc = nn.Identity()
        strict_load(model, sd, f'torchvision.models.{cfg["arch"]}')
        return f'loads strictly into torchvision.models.{cfg["arch"]}() with fc = Identity'
    strict_load(build_backbone(cfg), sd, f'common.resnet {cfg}')
    sobel = ', behind the Sobel front end' if cfg['in_channels'] == 2 else ''
    return (f'torchvision cannot build {cfg}; the names are torchvision\'s and it loads strictly into '
            f'common.features.build_backbone({cfg}){sobel}')


def check_timm(sd, cfg):
    try:
        import timm
    except ImportError:
        return check_torchvision(sd, cfg) + ' (timm is not installed: timm itself not checked)'
    if not torchvision_compatible(cfg):
        return check_torchvision(sd, cfg) + ' (no timm equivalent)'
    strict_load(timm.create_model(cfg['arch'], pretrained=False, num_classes=0), sd, f'timm {cfg["arch"]}')
    return f'loads strictly into timm.create_model({cfg["arch"]!r}, num_classes=0)'


def convert_vit(sd, to):
    """(state dict in the target's names, note) for a ViT backbone with timm names."""
    cfg = infer_vit_config(sd, num_heads=1)  # heads change no shape: any number checks the names and shapes
    size = (f'img_size={cfg["img_size"]}, patch_size={cfg["patch_size"]}, embed_dim={cfg["embed_dim"]}, '
            f'depth={cfg["depth"]}')
    heads = 'num_heads as in training (not stored in the weights)'
    if to == 'torchvision':
        out = to_torchvision(sd)
        strict_load(torchvision_vit(cfg), out, f'torchvision VisionTransformer ({size})')
        return out, (f'loads strictly into torchvision.models.VisionTransformer(image_size={cfg["img_size"]}, '
                     f'patch_size={cfg["patch_size"]}, num_layers={cfg["depth"]}, hidden_dim={cfg["embed_dim"]}, '
                     f'mlp_dim={int(cfg["embed_dim"] * cfg["mlp_ratio"])}, {heads}) with heads = Identity')
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return sd, f'timm names already (timm is not installed: timm itself not checked; {size})'
    model = VisionTransformer(img_size=cfg['img_size'], patch_size=cfg['patch_size'], in_chans=cfg['in_chans'],
                              num_classes=0, embed_dim=cfg['embed_dim'], depth=cfg['depth'],
                              num_heads=cfg['num_heads'], mlp_ratio=cfg['mlp_ratio'], qkv_bias=cfg['qkv_bias'])
    strict_load(model, sd, f'timm VisionTransformer ({size})')
    return sd, f'loads strictly into timm.models.vision_transformer.VisionTransformer({size}, num_classes=0, {heads})'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', help='selfsup checkpoint, backbone.pth, moco / MoCo v3 / DINO checkpoint, or a '
                   'torchvision ResNet or timm ViT state dict')
    p.add_argument('output', help='file to write')
    p.add_argument('--to', required=True, choices=['torchvision', 'timm', 'detectron2'], help='target format')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    args = p.parse_args(argv)
    try:
        if args.to == 'detectron2':
            n, overrides = convert_detectron2(args.input, args.output, not args.unsafe_load)
            print(f'{n} tensors written to {args.output} (detectron2 names); options for this backbone: ' +
                  ' '.join(f'{k} {v}' for k, v in overrides.items()))
            return
        ckpt = checkpoint.load(args.input, weights_only=not args.unsafe_load)
        if holds_vit(ckpt):
            sd, note = convert_vit(vit_backbone_state_dict(ckpt), args.to)
        else:
            sd = checkpoint.backbone_state_dict(ckpt)
            cfg = infer_resnet_config(sd)
            note = check_torchvision(sd, cfg) if args.to == 'torchvision' else check_timm(sd, cfg)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'{args.input}: {e}') from None
    checkpoint.save_atomic({k: v.contiguous() for k, v in sd.items()}, args.output)
    print(f'{len(sd)} tensors written to {args.output} ({args.to} names); {note}')


if __name__ == '__main__':
    main()
