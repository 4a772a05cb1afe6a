#!/usr/bin/env python
"""Converts a backbone of this repo (any checkpoint eval/ accepts) to a detectron2 weights file.

  python eval/detection/convert_to_detectron2.py output/moco/checkpoint_last.pth moco_r50.pkl

Renames torchvision ResNet keys to detectron2's ResNet keys (detectron2/modeling/backbone/resnet.py):
  conv1 / bn1                     -> stem.conv1 / stem.conv1.norm
  layerL.B.convI / layerL.B.bnI   -> res{L+1}.B.convI / res{L+1}.B.convI.norm
  layerL.B.downsample.0 / .1      -> res{L+1}.B.shortcut / res{L+1}.B.shortcut.norm
drops BN's num_batches_tracked (detectron2's FrozenBN has none) and writes a pickle
{"model": {name: numpy array}, "__author__": "selfsup", "matching_heuristics": True}, the format of
detectron2's own .pkl model files; matching_heuristics lets detectron2 find res5 inside the C4 ROI
head (roi_heads.res5). Weights use torchvision's convention: stride in the 3x3 conv and RGB input
normalised with the ImageNet mean/std, hence MODEL.RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB and
the PIXEL_MEAN/PIXEL_STD of configs/Base-RCNN-C4-BN.yaml. See README.md in this folder.
Fails, naming the keys, when a tensor is left over or missing, or when detectron2 cannot build the
network (CIFAR stem, 2-channel Sobel input, no detectron2 depth).
"""
import argparse
import pickle
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # finds common/

from common import checkpoint  # noqa: E402
from common.resnet import infer_resnet_config  # noqa: E402

D2_DEPTH = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101, 'resnet152': 152}
D2_KEY = re.compile(r'^(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))\.'
                    r'(weight|norm\.(weight|bias|running_mean|running_var))$')
NORM = ('weight', 'bias', 'running_mean', 'running_var')


def rename(key):
    """torchvision ResNet key -> detectron2 ResNet key."""
    m = re.match(r'layer([1-4])\.(.*)$', key)
    k = f'res{int(m.group(1)) + 1}.{m.group(2)}' if m else 'stem.' + key
    k = re.sub(r'(^|\.)bn([1-3])\.', r'\1conv\2.norm.', k)
    return k.replace('downsample.0.', 'shortcut.').replace('downsample.1.', 'shortcut.norm.')


def detectron2_state(sd, cfg):
    """{detectron2 key: numpy array} from a backbone state dict with torchvision names (no fc).
    Raises ValueError naming leftover/missing keys or why detectron2 cannot build the network."""
    if cfg['cifar_stem']:
        raise ValueError('CIFAR-stem backbone (3x3 conv1, no max-pool): detectron2\'s stem is 7x7/2 + max-pool')
    if cfg['in_channels'] != 3:
        raise ValueError(f'conv1 takes {cfg["in_channels"]} channels (Sobel input?); detectron2 feeds RGB')
    if cfg['arch'] not in D2_DEPTH:
        raise ValueError(f'{cfg["arch"]}: detectron2 builds ResNet depths {sorted(D2_DEPTH.values())} only')
    out, leftover = {}, []
    for k, v in sd.items():
        if k.endswith('.num_batches_tracked'):
            continue
        new = rename(k)
        if D2_KEY.match(new):
            out[new] = v.detach().cpu().numpy()
        else:
            leftover.append(k)
    # every conv has its 4 norm tensors and every norm its conv; the stem and the 4 stages exist
    convs = {k.split('.norm.')[0] if '.norm.' in k else k[:-len('.weight')] for k in out}
    need = [f'{c}.{t}' for c in sorted(convs) for t in ('weight',) + tuple('norm.' + n for n in NORM)]
    need += [f'{s}.weight' for s in ('stem.conv1', 'res2.0.conv1', 'res3.0.conv1', 'res4.0.conv1', 'res5.0.conv1')]
    missing = sorted({k for k in need if k not in out})
    if leftover or missing:
        raise ValueError(f'cannot convert to detectron2: leftover keys {leftover[:20]}, missing keys {missing[:20]}')
    return out


def d2_config_overrides(cfg):
    """detectron2 config values this backbone needs beyond configs/Base-RCNN-C4-BN.yaml."""
    w, basic = cfg['width'], cfg['arch'] in ('resnet18', 'resnet34')
    o = {'MODEL.RESNETS.DEPTH': D2_DEPTH[cfg['arch']]}
    if w != 64 or basic:
        o.update({'MODEL.RESNETS.STEM_OUT_CHANNELS': w, 'MODEL.RESNETS.RES2_OUT_CHANNELS': w if basic else 4 * w})
    if w != 64:
        o['MODEL.RESNETS.WIDTH_PER_GROUP'] = w
    return o


def convert(src, dst, weights_only=True):
    """Reads any checkpoint eval/ accepts and writes the detectron2 pickle; returns (n tensors, overrides)."""
    sd = checkpoint.backbone_state_dict(checkpoint.load(src, weights_only=weights_only))
    cfg = infer_resnet_config(sd)
    model = detectron2_state(sd, cfg)
    with open(dst, 'wb') as f:
        pickle.dump({'model': model, '__author__': 'selfsup', 'matching_heuristics': True}, f)
    return len(model), d2_config_overrides(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', help='selfsup checkpoint, backbone.pth, moco checkpoint or torchvision state dict')
    p.add_argument('output', help='detectron2 weights file to write (.pkl)')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    args = p.parse_args(argv)
    try:
        n, overrides = convert(args.input, args.output, not args.unsafe_load)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'{args.input}: {e}') from None
    print(f'{n} tensors written to {args.output}')
    print('detectron2 options for this backbone: ' + ' '.join(f'{k} {v}' for k, v in overrides.items()))


if __name__ == '__main__':
    main()
