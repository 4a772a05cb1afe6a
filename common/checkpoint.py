"""Checkpoint IO: atomic writes, RNG capture for exact resume, backbone extraction for evaluation.

A training checkpoint is a dict with at least
  model            full model state dict (method-specific names)
  backbone_prefix  prefix of the backbone inside `model` (e.g. 'encoder_q.'), used by eval/
  args, epoch, iter, optimizer, scaler, rng, git
and loads with torch.load(weights_only=True): only tensors and plain Python values are stored.
"""
import hashlib
import os
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

from common import dist

REPO = Path(__file__).resolve().parent.parent


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short=12', 'HEAD'], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ('-dirty' if dirty else '')) if sha else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, fsync, then rename: a crash or kill mid-write
    leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path, map_location='cpu', weights_only=True):
    """torch.load with a clear error; weights_only=True unless the caller opts out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    verify_published(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001
        hint = ' (it holds non-tensor objects; pass --unsafe-load only if you trust the file)' \
            if weights_only and 'weights_only' in str(e) else ''
        raise RuntimeError(f'cannot load checkpoint {path}: {str(e).splitlines()[0]}{hint}') from None


def rng_state():
    """This process's RNG states (python, numpy, torch CPU, CUDA) as tensors/plain values."""
    np_state = np.random.get_state()
    s = {'python': random.getstate(), 'torch': torch.get_rng_state(),
         'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        s['cuda'] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    random.setstate(_tuples(s['python']))
    torch.set_rng_state(s['torch'])
    n = s['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def all_rng_states():
    """RNG states of every process, in rank order (saved by rank 0, restored per rank)."""
    return dist.gather_objects(rng_state())


def resume_path(resume, output_dir):
    """--resume PATH, or 'auto' -> output_dir/checkpoint_last.pth if it exists (else None)."""
    if not resume:
        return None
    if resume == 'auto':
        p = Path(output_dir) / 'checkpoint_last.pth'
        return p if p.is_file() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f'--resume {resume}: no such checkpoint file')
    return Path(resume)


def open_resume(args):
    """Loads the checkpoint named by --resume (or None) and settles args.seed: a resumed run keeps its
    seed, since the augmentation of every sample depends on it; a fresh run without --seed draws one
    (the same on every process). Returns (path, checkpoint)."""
    path = resume_path(args.resume, args.output_dir)
    ckpt = load(path) if path else None
    if args.seed is None:
        args.seed = ckpt['args']['seed'] if ckpt else int(dist.broadcast(torch.randint(0, 2 ** 31, (1,)))[0])
    return path, ckpt


def training_state(model, backbone_prefix, optimizer, scaler, epoch, it, args, git, **extra):
    """Everything a resumed run needs. `epoch`/`it`: where training continues. Collective: every
    process must call it (it gathers the RNG states); rank 0 then writes it with save_training."""
    return dict(model=model.state_dict(), backbone_prefix=backbone_prefix, optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch, iter=it, args=vars(args), git=git,
                rng=all_rng_states(), **extra)


def restore(ckpt, path, model, optimizer, scaler, log):
    """Loads a training_state into model/optimizer/scaler and this process's RNG; returns (epoch, iter)."""
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise SystemExit(f'--resume {path}: the model does not match the flags: '
                         f'{" ".join(str(e).split())[:300]}') from None
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(ckpt['rng']) == world:
        set_rng_state(ckpt['rng'][rank])
    else:
        log.print(f'warning: the checkpoint holds RNG states of {len(ckpt["rng"])} processes, not {world}; '
                  f'training continues, but not bitwise as it would have')
    log.print(f'resumed from {path} at epoch {ckpt["epoch"]} iteration {ckpt["iter"]}')
    return ckpt['epoch'], ckpt['iter']


def save_training(state, output_dir, epoch_done, keep_epoch):
    """Writes checkpoint_last.pth atomically; on epoch ends with keep_epoch also keeps
    checkpoint_{epoch:04d}.pth (a hard link, no extra disk). Call on rank 0 only."""
    out = Path(output_dir)
    last = out / 'checkpoint_last.pth'
    save_atomic(state, last)
    if keep_epoch:
        keep = out / f'checkpoint_{epoch_done:04d}.pth'
        tmp = keep.with_name(keep.name + '.tmp')
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(last, tmp)
            os.replace(tmp, keep)
        except OSError:
            save_atomic(state, keep)
    return last


# ---------------------------------------------------------------- backbone extraction / loading

def save_backbone(backbone, path):
    """Writes a ResNet's weights without fc (torchvision names): loads into torchvision's resnet with
    only fc missing. Call on rank 0."""
    save_atomic({k: v for k, v in backbone.state_dict().items() if not k.startswith('fc.')}, path)

def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def backbone_state_dict(ckpt, keep_fc=False):
    """Backbone weights (torchvision names, fc dropped) from any checkpoint this repo writes, a
    facebookresearch/moco checkpoint, or a plain torchvision ResNet state dict.

    Raises ValueError listing the keys it cannot place when the file is none of those.
    """
    if isinstance(ckpt, dict) and 'model' in ckpt and 'backbone_prefix' in ckpt:
        sd = _strip(ckpt['model'], ckpt['backbone_prefix'])
    elif isinstance(ckpt, dict) and 'state_dict' in ckpt:  # facebookresearch/moco main_moco.py
        sd = ckpt['state_dict']
        sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
        if any(k.startswith('encoder_q.') for k in sd):
            sd = _strip(sd, 'encoder_q.')
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt.items()}
    else:
        keys = list(ckpt)[:20] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f'unrecognised checkpoint: top-level keys {keys}; expected a selfsup '
                         f'checkpoint, a moco checkpoint or a torchvision ResNet state dict')
    if not keep_fc:
        sd = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    known = ('conv1.', 'bn1.', 'layer1.', 'layer2.', 'layer3.', 'layer4.', 'fc.')
    unexpected = [k for k in sd if not k.startswith(known)]
    if unexpected or 'conv1.weight' not in sd:
        raise ValueError(f'checkpoint does not hold a ResNet backbone; unexpected keys: '
                         f'{unexpected[:20] or "(conv1.weight missing)"}')
    return sd


def load_backbone(path, weights_only=True):
    """(backbone ResNet with fc=Identity, its state dict, the checkpoint's args or {}) from `path`."""
    from common.resnet import build_resnet, infer_resnet_config
    ckpt = load(path, weights_only=weights_only)
    sd = backbone_state_dict(ckpt)
    cfg = infer_resnet_config(sd)
    model = build_resnet(cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'],
                         in_channels=cfg['in_channels'])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f'{path}: backbone does not match {cfg}: missing {missing[:10]}, '
                         f'unexpected {unexpected[:10]}')
    args = ckpt.get('args', {}) if isinstance(ckpt, dict) else {}
    return model, sd, args


# ---------------------------------------------------------------- published files (scripts/publish_model.py)

PUBLISHED_NAME = re.compile(r'-([0-9a-f]{8})\.pth$')  # NAME-<first 8 hex digits of the sha256>.pth


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def verify_published(path):
    """For a file named like a published model (NAME-<8 hex>.pth), checks that its sha256 starts with
    those 8 digits (as torch.hub does) and raises RuntimeError otherwise; returns the digest, or None
    for other names."""
    m = PUBLISHED_NAME.search(Path(path).name)
    if not m:
        return None
    digest = sha256_file(path)
    if not digest.startswith(m.group(1)):
        raise RuntimeError(f'{path}: the name marks a published file whose sha256 starts with {m.group(1)}, '
                           f'but its sha256 is {digest[:8]}...: the file is corrupt or incomplete (download it '
                           f'again); if it is not a published file, rename it')
    return digest


# Training state that is not a model weight, matched against any dotted component of a key of
# ckpt['model']: MoCo's queue/queue_ptr, NPID's memory bank and NCE constant, ODC's bank, labels and
# centroids. scripts/publish_model.py drops these; scripts/count_parameters.py lists them apart.
STATE_KEY = re.compile(r'(^|\.)(queue\w*|\w*bank\w*|memory\w*|centroids?|labels|nce_z)(\.|$)')
BN_STAT_KEY = re.compile(r'\.(running_mean|running_var|num_batches_tracked)$')
