#!/usr/bin/env python
"""Frozen-backbone features of any layer, saved as .npy (OSS tools/extract.py, methods.md §9.1-9.2).

For every image of a dataset (in its order) the backbone runs in eval mode and each chosen layer is
pooled: with the fixed multi-layer pooling of the benchmarks (--pool multi: ~9k dims per layer at
224 px; our analogous table at 32 px, see common/features.py) or globally (--pool avg). Layers:
feat1 (stem, alias `stem`), feat2..feat5 (layer1..layer4), avgpool (global-pooled layer4).

  python eval/extract.py --pretrained output/moco/checkpoint_last.pth /data/imagenet --split val
  torchrun --nproc_per_node=8 eval/extract.py --pretrained backbone.pth /data/imagenet --layers feat5 avgpool
  python eval/extract.py --pretrained output/moco_demo/backbone.pth data/cifar10_sample --pool avg

Writes to --output-dir (default: features/ beside --pretrained), for split S:
  S_<layer>.npy   N x D float32, row i = image i of the dataset
  S_labels.npy    N int64 (-1 for unlabelled images)
  S_files.txt     the image paths in row order
  S_meta.json     checkpoint, layers, dims, pooling, transform, ...
Rows are streamed to disk (numpy memmap) on rank 0, so the features need not fit in memory.

A ViT backbone (read off the weights, as in eval/knn.py) offers other layers, all after the final
LayerNorm in eval mode: cls (the normed [CLS] token, D; the default), patch_avg (the mean of the
normed patch tokens, D) and cls_lastN (the normed cls tokens of the last N blocks concatenated, N*D:
DINO's linear feature, methods-modern.md §16.7); --pool does not apply. Its view is DINO's bicubic
Resize + CenterCrop (--view center) or the warp view; --num-heads as in eval/knn.py.

  python eval/extract.py --pretrained output/dino/backbone.pth /data/imagenet --layers cls cls_last4
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/extract.py` finds common/

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import augment, checkpoint, dist  # noqa: E402
from common.data import build_dataset  # noqa: E402
from common.features import (LAYERS, StagePool, any_layer_name, default_crop, describe_backbone,  # noqa: E402
                             feature_dims, iter_features, load_eval_backbone, stage_feature_fn, vit_eval_transform,
                             vit_feature_fn, vit_layer)
from common.log import Logger  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description='Extract frozen-backbone features to .npy',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='ImageNet-layout root, folder of class folders, image folder or image-list file')
    p.add_argument('--pretrained', required=True,
                   help='selfsup checkpoint, backbone.pth, facebookresearch/moco checkpoint or torchvision '
                        'ResNet state dict')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    p.add_argument('--split', default='train', help='sub-folder of an ImageNet-layout root (ignored otherwise)')
    p.add_argument('--layers', type=any_layer_name, nargs='+', default=None,
                   help='ResNet: feat1..feat5 (aliases stem, layer1..layer4) and/or avgpool; None = feat1..feat5. '
                        'ViT: cls, patch_avg, cls_lastN; None = cls')
    p.add_argument('--pool', choices=['multi', 'avg'], default=None,
                   help='ResNet layers: multi (fixed multi-layer pooling of the benchmarks; the default) or avg '
                        '(global average pooling); not for a ViT')
    p.add_argument('--crop-size', type=int, default=None,
                   help='None = 32 for a CIFAR-stem backbone, a ViT\'s own size, else 224')
    p.add_argument('--num-heads', type=int, default=None,
                   help='ViT attention heads (not in the weights); None = the checkpoint\'s args, 12 for a MoCo v3 '
                        'ViT-Small, else the size\'s default')
    p.add_argument('--view', choices=['center', 'warp'], default='center',
                   help='center: Resize(size*256/224) + CenterCrop; warp: Resize(size*256/224) then warp to '
                        'size x size (the VOC07 SVM view)')
    p.add_argument('-b', '--batch-size', type=int, default=256, help='batch per process')
    p.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision (features stored fp32)')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='auto: CUDA when visible')
    p.add_argument('--output-dir', default=None, help='None = features/ beside --pretrained')
    return p


def check_layers(args, cfg, crop):
    """The unique requested layers, refused in one line where the backbone lacks them; for a ResNet
    also the StagePool that pools them (None for a ViT)."""
    vit = bool(cfg.get('vit'))
    layers = list(dict.fromkeys(args.layers or (['cls'] if vit else list(LAYERS[:5]))))  # unique, in order
    if vit:
        wrong = [n for n in layers if n in LAYERS]
        if wrong:
            raise SystemExit(f'--layers {" ".join(wrong)}: a ViT has no ResNet stages; it offers cls, patch_avg and '
                             f'cls_lastN (the last N blocks\' cls tokens)')
        if args.pool:
            raise SystemExit(f'--pool {args.pool}: pools ResNet feature maps; a ViT\'s features (--layers cls, '
                             f'patch_avg, cls_lastN) are pooled by definition')
        if max(vit_layer(n) for n in layers) > cfg['depth']:
            raise SystemExit(f'--layers: the ViT has {cfg["depth"]} blocks, fewer than {" ".join(layers)} asks for')
        return layers, None
    wrong = [n for n in layers if n not in LAYERS]
    if wrong:
        raise SystemExit(f'--layers {" ".join(wrong)}: ViT features; a ResNet offers {", ".join(LAYERS)} '
                         f'(aliases stem, layer1..layer4)')
    args.pool = args.pool or 'multi'
    try:
        return layers, StagePool(layers, crop, args.pool)
    except ValueError as e:
        raise SystemExit(f'--pool {args.pool}: {e}') from None


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, device = dist.init_distributed(args.device)
    log = Logger()
    pretrained = Path(args.pretrained).resolve()
    out = Path(args.output_dir) if args.output_dir else pretrained.parent / 'features'
    # ============ backbone ============
    try:
        model, _, cfg, _ = load_eval_backbone(pretrained, weights_only=not args.unsafe_load, allow_vit=True,
                                              num_heads=args.num_heads)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'--pretrained {pretrained}: {e}') from None
    vit = bool(cfg.get('vit'))
    crop = args.crop_size or default_crop(cfg)
    layers, pool = check_layers(args, cfg, crop)
    model = model.to(device).eval()
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')

    # ============ data ============
    if args.view == 'warp':
        tf = augment.warp_transform(crop)
    else:
        tf = vit_eval_transform(crop) if vit else augment.eval_transform(crop)
    try:
        dataset = build_dataset(args.data, tf, args.split)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    if vit:
        dims = {n: cfg['embed_dim'] * max(vit_layer(n), 1) for n in layers}
        meta = dict(pretrained=str(pretrained), data=str(args.data), split=args.split, images=len(dataset),
                    layers=layers, dims=dims, pool='none (ViT tokens after the final LayerNorm)', crop_size=crop,
                    **describe_backbone(cfg))
    else:
        dims = feature_dims(model, layers, crop, args.pool)
        meta = dict(pretrained=str(pretrained), data=str(args.data), split=args.split, images=len(dataset),
                    layers=layers, dims=dims, pool=args.pool, crop_size=crop, arch=cfg['arch'], width=cfg['width'],
                    cifar_stem=cfg['cifar_stem'], sobel=cfg['in_channels'] == 2)
    meta.update(transform=' + '.join(repr(t) for t in tf.transforms), amp=args.amp, world_size=world,
                git=checkpoint.git_commit())
    log.print('extracting: ' + json.dumps(meta, indent=1))

    # ============ extract, streaming rows to disk ============
    arrays = {}
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        arrays = {n: np.lib.format.open_memmap(out / f'{args.split}_{n}.npy', 'w+', np.float32, (len(dataset), d))
                  for n, d in dims.items()}
        labels = np.full(len(dataset), -1, np.int64)
    fn = vit_feature_fn(model, layers, amp) if vit else stage_feature_fn(model, pool, amp)
    for idx, feats, lab in iter_features(fn, dataset, args.batch_size, args.workers, device, f'{args.split} features'):
        if dist.is_main():
            for n, v in feats.items():
                arrays[n][idx.numpy()] = v.numpy()
            labels[idx.numpy()] = lab.numpy()
    if dist.is_main():
        for a in arrays.values():
            a.flush()
        np.save(out / f'{args.split}_labels.npy', labels)
        (out / f'{args.split}_files.txt').write_text(''.join(f'{p}\n' for p, _ in getattr(dataset, 'samples', [])))
        (out / f'{args.split}_meta.json').write_text(json.dumps(meta, indent=1) + '\n')
    log.print(f'{len(dataset)} x {dims} features written to {out}/{args.split}_*.npy')
    dist.cleanup()


if __name__ == '__main__':
    main()
