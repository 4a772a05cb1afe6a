#!/usr/bin/env python
"""Weighted k-nearest-neighbour classification with a frozen backbone (NPID protocol; DINO's for a ViT).

Wu et al., arXiv:1805.01978 §3.4; reference code zhirongw/lemniscate.pytorch test.py. The pooled
layer4 features (eval mode, deterministic eval transform) of the train split form the bank, the val
split is the query set; similarities are cosines, and each of the k nearest bank images votes for
its class with weight exp(sim / T), T = 0.07. See common/knn.py.

  python eval/knn.py --pretrained output/moco/checkpoint_last.pth /data/imagenet
  torchrun --nproc_per_node=8 eval/knn.py --pretrained output/moco/backbone.pth /data/imagenet
  python eval/knn.py --pretrained output/moco_demo/backbone.pth data/cifar10_sample

--pretrained takes the same checkpoints as eval/lincls.py (a 2-channel conv1 runs behind DeepCluster's
Sobel front end). Results and protocol go to
<pretrained>.knn.json.

A ViT backbone (common/vit.py; a selfsup mocov3.py/dino.py checkpoint or backbone.pth, a
facebookresearch/dino or moco-v3 checkpoint, read off the weights) gets DINO's protocol
(methods-modern.md §16.6, `DN:eval_knn.py`): the normed [CLS] token in eval mode (of the teacher for
a DINO checkpoint), L2-normalised; train and val both Resize(256, bicubic) + CenterCrop(224)
(below 64 px only the bicubic resize); cosine similarity to every bank image, top k, weights
exp(sim / T), votes summed per class, T = 0.07, k in {10, 20, 100, 200} (DINO reports k = 20). The
vote is common/knn.py's, which is DINO's `knn_classifier` as well; DINO's top-5 for k < 5 counts
only k predictions, ours 5 classes. The number of heads is not in the weights: --num-heads, else
the checkpoint's args, else 12 for a MoCo v3 ViT-Small, else the size's default (6 for ViT-Small).

  python eval/knn.py --pretrained output/dino/checkpoint_last.pth /data/imagenet
  python eval/knn.py --pretrained dino_deitsmall16_pretrain.pth /data/imagenet
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/knn.py` finds common/

import torch  # noqa: E402

from common import augment, checkpoint, dist  # noqa: E402
from common.data import build_dataset, has_split  # noqa: E402
from common.features import default_crop, describe_backbone, load_eval_backbone, vit_eval_transform  # noqa: E402
from common.knn import knn_eval  # noqa: E402
from common.log import Logger  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description='Weighted kNN evaluation of a frozen backbone (NPID protocol)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', help='ImageNet-layout root with train/<class>/ (the bank) and val/<class>/ (queries)')
    p.add_argument('--pretrained', required=True,
                   help='selfsup checkpoint, backbone.pth, facebookresearch/moco checkpoint or torchvision '
                        'ResNet state dict')
    p.add_argument('--unsafe-load', action='store_true',
                   help='torch.load with weights_only=False (only for files you trust)')
    p.add_argument('--k', type=int, nargs='+', default=None,
                   help='numbers of neighbours; None = 200 20 (NPID), for a ViT 10 20 100 200 (DINO)')
    p.add_argument('--t', type=float, default=0.07, help='temperature of the exp(sim / T) vote weights')
    p.add_argument('--crop-size', type=int, default=None,
                   help='eval transform size; None = 32 for a CIFAR-stem backbone, a ViT\'s own size, else 224')
    p.add_argument('--num-heads', type=int, default=None,
                   help='ViT attention heads (not in the weights); None = the checkpoint\'s args, 12 for a MoCo v3 '
                        'ViT-Small, else the size\'s default')
    p.add_argument('-b', '--batch-size', type=int, default=256, help='feature extraction batch per process')
    p.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision features')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='auto: CUDA when visible')
    p.add_argument('--output-dir', default=None, help='where the result JSON goes; None = beside --pretrained')
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, device = dist.init_distributed(args.device)
    log = Logger()  # stdout on rank 0
    pretrained = Path(args.pretrained).resolve()
    result_path = (Path(args.output_dir) if args.output_dir else pretrained.parent) / (pretrained.name + '.knn.json')
    git = checkpoint.git_commit()
    log.print(f'git {git}  world size {world}  device {device}')

    # ============ backbone ============
    try:
        model, _, cfg, _ = load_eval_backbone(pretrained, weights_only=not args.unsafe_load, allow_vit=True,
                                              num_heads=args.num_heads)  # Sobel front end included
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'--pretrained {pretrained}: {e}') from None
    model = model.to(device).eval()
    fmt = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    if device.type == 'cuda':
        model = model.to(memory_format=fmt)
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')

    vit = bool(cfg.get('vit'))
    ks = args.k or ([10, 20, 100, 200] if vit else [200, 20])  # DN:eval_knn.py --nb_knn; NPID's 200

    def features(x):  # NxD pooled layer4 feature, or a ViT's normed cls token (knn_eval L2-normalises it)
        with torch.autocast(**amp):
            return model.pooled(x.to(memory_format=fmt))

    # ============ data ============
    crop = args.crop_size or default_crop(cfg)
    tf = vit_eval_transform(crop) if vit else augment.eval_transform(crop)
    if not has_split(args.data, 'val'):
        raise SystemExit(f'data: {args.data} needs train/<class>/ and val/<class>/ folders (ImageNet layout)')
    try:
        bank_set, query_set = build_dataset(args.data, tf, 'train'), build_dataset(args.data, tf, 'val')
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    if not bank_set.classes or bank_set.classes != query_set.classes:
        raise SystemExit(f'data: train and val must have the same class folders; got {len(bank_set.classes)} '
                         f'train and {len(query_set.classes)} val classes')
    protocol = dict(
        protocol=('weighted kNN (DINO eval_knn.py), cosine similarity, exp(sim/T) votes' if vit else
                  'weighted kNN (NPID), cosine similarity, exp(sim/T) votes'), pretrained=str(pretrained),
        **describe_backbone(cfg), feat_dim=model.feat_dim,
        feature=('normed [CLS] token, L2-normalised, eval mode' if vit else
                 'global-average-pooled layer4, L2-normalised, eval mode'),
        k=ks, t=args.t,
        data=str(args.data), bank_images=len(bank_set), query_images=len(query_set),
        num_classes=len(bank_set.classes), crop_size=crop, transform=' + '.join(repr(t) for t in tf.transforms),
        amp=args.amp, world_size=world)
    log.print('protocol: ' + json.dumps(protocol, indent=1))
    if max(ks) > len(bank_set):
        log.print(f'note: k > bank size {len(bank_set)}: those k use the whole bank')

    # ============ evaluate ============
    res = knn_eval(features, bank_set, query_set, ks, args.t, args.batch_size, args.workers, device)
    log.print(f'{"k":>6} {"top-1":>7} {"top-5":>7}')
    for k, (top1, top5) in res.items():
        log.print(f'{k:>6} {top1:>7.2f} {top5:>7.2f}')
    if dist.is_main():
        results = {str(k): dict(top1=round(a1, 4), top5=round(a5, 4)) for k, (a1, a5) in res.items()}
        result = dict(pretrained=str(pretrained), results=results, protocol=protocol, git=git)
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1) + '\n')
    log.print(f'written to {result_path}')
    dist.cleanup()


if __name__ == '__main__':
    main()
