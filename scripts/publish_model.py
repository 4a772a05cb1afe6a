#!/usr/bin/env python
"""Prepares a checkpoint for release: drops the training state, writes the file, names it after
its sha256 and verifies it by reading it back (as OSS tools/publish_model.py and torch.hub do).

  python scripts/publish_model.py output/moco/checkpoint_last.pth release/moco_v2_r50_200ep.pth
  -> release/moco_v2_r50_200ep-1a2b3c4d.pth   (1a2b3c4d = first 8 hex digits of its sha256)

Kept: the model weights (parameters and BN statistics), backbone_prefix, args (eval/ reads e.g.
`sobel` from them), epoch and git. Dropped: optimizer, AMP scaler, RNG states, and model tensors
that are training state rather than weights: MoCo's queue, NPID's memory bank, ODC's bank, labels
and centroids (common.checkpoint.STATE_KEY; --drop REGEX adds patterns, e.g. '^encoder_k[.]').
--backbone-only keeps the backbone alone (torchvision names, no fc). A facebookresearch/moco
checkpoint keeps its state_dict; a plain state dict is published as it is.

The bytes are written first (temporary file, fsync), then hashed, then renamed to NAME-<8hex>.pth,
then read again: the sha256 must match and the file must load (torch.load weights_only) and hold
the tensors that were written. common.checkpoint.load checks the suffix of such a file on every
load and refuses a file whose sha256 does not start with it.
"""
import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # finds common/

import torch  # noqa: E402

from common import checkpoint  # noqa: E402

KEEP = ('model', 'backbone_prefix', 'args', 'epoch', 'iter', 'git')


def strip(ckpt, drop=(), backbone_only=False):
    """(checkpoint to publish, [dropped model tensors], [dropped top-level entries])."""
    if not isinstance(ckpt, dict):
        raise ValueError(f'expected a dict checkpoint, got {type(ckpt).__name__}')
    if 'model' in ckpt and 'backbone_prefix' in ckpt:  # this repo's training checkpoint
        top, key = KEEP, 'model'
    elif 'state_dict' in ckpt:  # facebookresearch/moco main_moco.py
        top, key = ('state_dict', 'arch', 'epoch'), 'state_dict'
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):  # plain state dict
        top, key = None, None
    else:
        raise ValueError(f'unrecognised checkpoint with top-level keys {list(ckpt)[:20]}')
    sd = ckpt[key] if key else ckpt
    if backbone_only:
        bb = checkpoint.backbone_state_dict(ckpt)
        out = dict(model=bb, backbone_prefix='', **{k: ckpt[k] for k in ('args', 'epoch', 'git') if k in ckpt})
        return out, [f'({len(sd) - len(bb)} tensors outside the backbone)'], sorted(set(ckpt) - set(KEEP))
    pats = [checkpoint.STATE_KEY] + [re.compile(d) for d in drop]
    kept = {k: v for k, v in sd.items() if not any(p.search(k) for p in pats)}
    dropped = sorted(set(sd) - set(kept))
    if key is None:
        return kept, dropped, []
    out = {k: v for k, v in ckpt.items() if k in top}
    out[key] = kept
    return out, dropped, sorted(k for k in ckpt if k not in top)


def publish(ckpt, out_path):
    """Writes `ckpt` as OUT-<8hex>.pth (OUT = out_path without .pth), verifies it; returns (path, sha256)."""
    out_path = Path(out_path)
    stem = out_path.name[:-4] if out_path.name.endswith('.pth') else out_path.name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(stem + '.pth.tmp')
    with open(tmp, 'wb') as f:  # the final bytes first
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    sha = checkpoint.sha256_file(tmp)  # then their hash
    final = out_path.with_name(f'{stem}-{sha[:8]}.pth')
    os.replace(tmp, final)
    if checkpoint.sha256_file(final) != sha:  # read back
        raise RuntimeError(f'{final}: sha256 changed after the rename; the file system is not reliable')
    back = checkpoint.load(final)  # checks the name suffix and loads with weights_only=True
    check_equal(ckpt, back)
    return final, sha


def check_equal(a, b, where='checkpoint'):
    """Raises RuntimeError unless `b` holds the same structure and tensors as `a`."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            raise RuntimeError(f'{where}: keys differ after reading back')
        for k in a:
            check_equal(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())):
            raise RuntimeError(f'{where}: tensor differs after reading back')
    elif a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b)):
        raise RuntimeError(f'{where}: value differs after reading back')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', help='checkpoint to publish')
    p.add_argument('output', help='NAME.pth; the file written is NAME-<8 hex of its sha256>.pth')
    p.add_argument('--drop', action='append', default=[], metavar='REGEX',
                   help='also drop model tensors whose name matches REGEX (repeatable)')
    p.add_argument('--backbone-only', action='store_true', help='keep only the backbone (torchvision names, no fc)')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    args = p.parse_args(argv)
    try:
        ckpt = checkpoint.load(args.input, weights_only=not args.unsafe_load)
        out, dropped, dropped_top = strip(ckpt, args.drop, args.backbone_only)
        checkpoint.backbone_state_dict(out)  # what is published must still give a backbone
        final, sha = publish(out, args.output)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'{args.input}: {e}') from None
    if dropped_top:
        print(f'dropped top-level entries: {", ".join(dropped_top)}')
    if dropped:
        print(f'dropped {len(dropped)} model tensors: {", ".join(dropped[:12])}{" ..." if len(dropped) > 12 else ""}')
    print(f'published {final} ({final.stat().st_size / 2 ** 20:.1f} MiB)\nsha256 {sha}')


if __name__ == '__main__':
    main()
