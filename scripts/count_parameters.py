#!/usr/bin/env python
"""Parameters per module of any checkpoint, read off its state dict (no method file is imported,
so it works for every method, and for moco checkpoints and torchvision state dicts).

  python scripts/count_parameters.py output/moco/checkpoint_last.pth
  python scripts/count_parameters.py output/byol/checkpoint_last.pth --depth 2 --json counts.json

The tensors of the model state dict are grouped by their first --depth name components
(encoder_q / encoder_k / backbone / projector / predictor / neck / head ... at depth 1); the
backbone's own fc (e.g. MoCo's projection in encoder_q.fc) is shown apart from the backbone. Each
tensor is one of:
  parameters   learnable weights (everything below);
  BN stats     running_mean / running_var / num_batches_tracked buffers, counted apart;
  state        training state that is not a weight (common.checkpoint.STATE_KEY: MoCo's queue,
               NPID's memory bank, ODC's bank/labels/centroids), listed separately with shapes.
A state dict cannot tell a learnable tensor from another buffer or from a frozen copy (MoCo's key
encoder, BYOL's target): those count as parameters of their own group.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # finds common/

import torch  # noqa: E402

from common import checkpoint  # noqa: E402


def model_state(ckpt):
    """(state dict, backbone prefix) of a selfsup / facebookresearch-moco checkpoint or a state dict."""
    if isinstance(ckpt, dict) and 'model' in ckpt and 'backbone_prefix' in ckpt:
        return ckpt['model'], ckpt['backbone_prefix']
    if isinstance(ckpt, dict) and 'state_dict' in ckpt:
        sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt['state_dict'].items()}
        return sd, 'encoder_q.' if any(k.startswith('encoder_q.') for k in sd) else ''
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, ''
    raise ValueError('expected a selfsup checkpoint, a facebookresearch/moco checkpoint or a state dict')


def group_of(key, prefix, depth):
    """Group name: the first `depth` components of the module path; the backbone's fc apart."""
    if prefix and key.startswith(prefix + 'fc.'):
        return prefix + 'fc'
    if not prefix and key.startswith('fc.'):
        return 'fc'
    parts = key.split('.')[:-1] or [key]
    return '.'.join(parts[:depth])


def count(sd, prefix='', depth=1):
    """{group: {'parameters': n, 'bn_stats': n, 'tensors': n, 'backbone': bool}}, [(state key, shape)]."""
    groups, state = {}, []
    for k, v in sd.items():
        if checkpoint.STATE_KEY.search(k):
            state.append((k, list(v.shape)))
            continue
        g = groups.setdefault(group_of(k, prefix, depth),
                              dict(parameters=0, bn_stats=0, tensors=0, backbone=False))
        g['tensors'] += 1
        g['bn_stats' if checkpoint.BN_STAT_KEY.search(k) else 'parameters'] += v.numel()
        g['backbone'] |= k.startswith(prefix) and not k.startswith(prefix + 'fc.')
    return groups, state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='training checkpoint, backbone.pth, moco checkpoint or state dict')
    p.add_argument('--depth', type=int, default=1, help='name components that make a group')
    p.add_argument('--json', default=None, help='also write the counts to this JSON file')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    args = p.parse_args(argv)
    try:
        sd, prefix = model_state(checkpoint.load(args.checkpoint, weights_only=not args.unsafe_load))
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'{args.checkpoint}: {e}') from None
    groups, state = count(sd, prefix, args.depth)
    w = max([len(g) for g in groups] + [10]) + 2
    print(f'{"module":<{w}} {"parameters":>14} {"BN stats":>12} {"tensors":>8}')
    for g, c in groups.items():
        note = '  (backbone)' if c['backbone'] else ''
        print(f'{g:<{w}} {c["parameters"]:>14,} {c["bn_stats"]:>12,} {c["tensors"]:>8}{note}')
    total = sum(c['parameters'] for c in groups.values())
    backbone = sum(c['parameters'] for c in groups.values() if c['backbone'])
    print(f'{"total":<{w}} {total:>14,} {sum(c["bn_stats"] for c in groups.values()):>12,}')
    print(f'backbone ({prefix or "whole state dict"}, without fc): {backbone:,} parameters ({backbone / 1e6:.2f} M)')
    if state:
        print('training state (not parameters):')
        for k, shape in state:
            print(f'  {k:<{w}} {"x".join(map(str, shape)) or "scalar"}')
    if args.json:
        Path(args.json).write_text(json.dumps(dict(groups=groups, total=total, backbone=backbone,
                                                   state={k: s for k, s in state}), indent=1) + '\n')


if __name__ == '__main__':
    main()
