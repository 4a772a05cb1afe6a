"""Checkpoint IO: atomic writes, RNG capture for exact resume, backbone extraction for evaluation.

A training checkpoint is a dict with at least
  model            full model state dict (method-specific names)
  backbone_prefix  prefix of the backbone inside `model` (e.g. 'encoder_q.'), used by eval/
  args, epoch, iter, optimizer, scaler, rng, git
and loads with torch.load(weights_only=True): only tensors and plain Python values are stored.
"""
import contextlib
import hashlib
import os
import random
import re
import subprocess
import zipfile
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
    leaves the previous file intact. A failed write (full disk, I/O error) removes the temp file and
    raises OSError naming `path` and the OS error."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(f'cannot write {path}: {os_reason(e)}') from None


def os_reason(e):
    """The OS error behind `e`: torch.save reports a full disk as a RuntimeError ('[enforce fail at
    inline_container.cc...] unexpected pos'), raised while handling the file's OSError."""
    if isinstance(e, OSError):
        return f'[Errno {e.errno}] {e.strerror}' if e.strerror else str(e)
    if isinstance(e.__context__, OSError):  # torch.save's writer failed after the file's write did
        return os_reason(e.__context__)
    text = ' '.join(str(e).split())
    m = re.search(r'(No space left on device|Disk quota exceeded|Read-only file system|Input/output error|'
                  r'Permission denied)', text)
    return m.group(1) if m else text[:200]


def load(path, map_location='cpu', weights_only=True, unsafe_flag='--unsafe-load'):
    """torch.load with a clear error; weights_only=True unless the caller opts out. `unsafe_flag`:
    the opt-out flag the calling program has, named in the hint (None: it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    verify_published(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives (since PyTorch 1.6)
            reason = 'not a PyTorch file, or a truncated one'
        elif weights_only and 'weights_only' in str(e):
            reason = ('it holds non-tensor objects; ' + (f'pass {unsafe_flag} only if you trust the file' if unsafe_flag
                                                         else 'no selfsup program writes those'))
        else:
            reason = ' '.join(str(e).split())[:200]
        raise RuntimeError(f'cannot load checkpoint {path}: {reason}') from None


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


# ---------------------------------------------------------------- output folders and resume checks

# Flags that may change when a run is resumed: speed, logging, checkpoint cadence, the length of the
# run (--epochs extends it) and where the data lives (its content is checked by Run). Every other
# flag defines the run, and resuming with another value stops with the difference.
MAY_CHANGE = {'workers', 'print_freq', 'epochs', 'output_dir', 'device', 'resume', 'overwrite', 'save_freq',
              'save_iters', 'max_steps', 'knn_every', 'knn_k', 'knn_t', 'tensorboard', 'compile', 'compile_mode',
              'aug_prefetch', 'amp', 'deterministic', 'dist_timeout', 'data', 'unsafe_load', 'vis_every',
              'vis_images'}
# What a training program leaves in --output-dir; --overwrite deletes these and nothing else. The
# results of evaluating those files (NAME.pth.knn.json, eval/lincls.py's files) go with them, since
# they describe the model that is being replaced.
RUN_FILES = ('checkpoint_last.pth', 'checkpoint_[0-9]*.pth', 'backbone.pth')
RUN_LEFTOVERS = ('*.pth.tmp', '*.pth.*.json', 'log.jsonl', 'log_stale.jsonl', 'lincls_checkpoint.pth',
                 'lincls_log.jsonl', 'tb', 'vis_[0-9]*.png', 'finetune.json')


def check_writable(folder, flag='--output-dir'):
    """Creates `folder` and writes a probe file in it: SystemExit naming the folder and the OS error
    (under /proc, under a file, read-only, full) before anything else runs."""
    folder = Path(folder)
    probe = folder / f'.selfsup_write_test_{os.getpid()}'
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b'0')
        probe.unlink()
    except OSError as e:
        raise SystemExit(f'{flag} {folder}: cannot write there ({os_reason(e)}); choose a writable folder') from None


def _flag(key):
    return 'data' if key == 'data' else '--' + key.replace('_', '-')


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def changed_args(saved, args, may_change=MAY_CHANGE):
    """(run-defining differences, allowed changes) between the args a checkpoint saved and `args`,
    each a list of 'FLAG OLD -> NEW'. Flags the checkpoint does not know are not compared."""
    hard, soft = [], []
    for k, new in sorted(vars(args).items()):
        if k in saved and _norm(saved[k]) != _norm(new) and k not in ('resume', 'overwrite'):
            (soft if k in may_change else hard).append(f'{_flag(k)} {saved[k]} -> {new}')
    return hard, soft


def _describe(ckpt):
    """'a moco.py checkpoint at epoch E iteration I of N epochs' and friends, for messages."""
    a = ckpt.get('args', {})
    return (f'{ckpt.get("method", a.get("method", "selfsup"))}.py checkpoint at epoch {ckpt["epoch"]} '
            f'iteration {ckpt["iter"]} of {a.get("epochs", "?")} epochs')


def load_training(path, method, flag='--resume'):
    """A training checkpoint of `method` from `path`, or SystemExit saying in one line what the file
    is instead (missing, not a checkpoint, a backbone file, another method's or program's)."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f'{flag} {path} does not exist')
    try:
        ckpt = load(path, unsafe_flag=None)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f'{flag} {path} is not a selfsup training checkpoint ({str(e).split(": ", 1)[1]})') from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f'{flag} {path} is not a selfsup training checkpoint (it holds a {type(ckpt).__name__})')
    if 'model' in ckpt and 'backbone_prefix' in ckpt:
        other = ckpt.get('method', ckpt.get('args', {}).get('method'))
        if other and other != method:
            raise SystemExit(f'{flag} {path} is a {other}.py checkpoint; {method}.py cannot resume it '
                             f'(continue it with {other}.py, or start {method}.py in another --output-dir)')
        return ckpt
    if ckpt.get('kind') in ('lincls', 'semi') or {'fc', 'pretrained'} <= ckpt.keys():
        prog = 'eval/semi.py' if ckpt.get('kind') == 'semi' else 'eval/lincls.py'
        raise SystemExit(f'{flag} {path} is a checkpoint of {prog}, not of a training program')
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise SystemExit(f'{flag} {path} is a backbone file, not a training checkpoint: use it with --pretrained '
                         f'(eval/lincls.py, eval/knn.py, ...)')
    if 'state_dict' in ckpt:
        raise SystemExit(f'{flag} {path} is a facebookresearch/moco-style checkpoint; selfsup cannot resume it '
                         f'(evaluate it with --pretrained)')
    raise SystemExit(f'{flag} {path} is not a selfsup training checkpoint (top-level keys {list(ckpt)[:10]})')


def run_files(folder):
    """The files of a training run in `folder` (see RUN_FILES), sorted."""
    folder = Path(folder)
    return sorted({p for pattern in RUN_FILES for p in folder.glob(pattern) if p.is_file()})


def held_run_message(folder, method):
    """One line for a folder that holds a run, naming what it holds and the flags that continue it
    or start over."""
    folder = Path(folder)
    last = folder / 'checkpoint_last.pth'
    ckpt = None
    if last.is_file():
        with contextlib.suppress(Exception):
            ckpt = torch.load(last, map_location='cpu', weights_only=True, mmap=True)
    if isinstance(ckpt, dict) and 'epoch' in ckpt:
        other = ckpt.get('method', ckpt.get('args', {}).get('method', method))
        how = ('continue it with --resume auto' if other == method else
               f'continue it with {other}.py --resume auto')
        what = f'a {_describe(ckpt)}'
    else:
        how, what = 'it cannot be continued', ', '.join(p.name for p in run_files(folder)[:4])
    return (f'--output-dir {folder} already holds a run ({what}); {how}, or start over with --overwrite '
            f'(deletes it), or choose another --output-dir')


def clear_run(folder, verbose=False):
    """--overwrite: deletes the training files of `folder` (RUN_FILES, RUN_LEFTOVERS); returns how
    many it removed."""
    import shutil
    folder, n = Path(folder), 0
    for pattern in RUN_FILES + RUN_LEFTOVERS:
        for p in folder.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
    if verbose and n:
        print(f'--overwrite: deleted {n} files of the previous run in {folder}', flush=True)
    return n


def set_aside_log(folder, name='log.jsonl'):
    """A log without a checkpoint beside it (a run killed before its first save) is moved to the
    end of log_stale.jsonl, so that the new run's log.jsonl holds the new run only."""
    log = Path(folder) / name
    if log.is_file() and log.stat().st_size:
        with open(Path(folder) / 'log_stale.jsonl', 'ab') as f:
            f.write(log.read_bytes())
        log.unlink()


def claim_output_dir(args, method):
    """Decides, before anything is written, what this run does with --output-dir and --resume:
    returns (checkpoint path, checkpoint) to continue, or (None, None) for a fresh run. A folder that
    holds another run is never written over unless --overwrite says so; see README 'Runs and faults'."""
    out = Path(args.output_dir)
    check_writable(out)
    last = out / 'checkpoint_last.pth'
    if not args.resume or (args.resume == 'auto' and not last.is_file()):
        if args.resume == 'auto':
            print(f'--resume auto: no checkpoint in {out}; starting a fresh run', flush=True)
        if run_files(out) and not args.overwrite:
            raise SystemExit(held_run_message(out, method))
        if args.overwrite:
            clear_run(out, verbose=True)
        set_aside_log(out)
        return None, None
    path = last if args.resume == 'auto' else Path(args.resume)
    ckpt = load_training(path, method)
    own = path.resolve().parent == out.resolve()
    if own and args.overwrite:
        raise SystemExit(f'--overwrite would delete {path}, which --resume continues; drop one of the two')
    if own and path.name != last.name and last.is_file():
        later = torch.load(last, map_location='cpu', weights_only=True, mmap=True)
        if (later['epoch'], later['iter']) != (ckpt['epoch'], ckpt['iter']):
            raise SystemExit(f'--resume {path}: {out} holds a later checkpoint ({_describe(later)}), which this run '
                             f'would replace; continue that one with --resume auto, or resume {path.name} into '
                             f'another --output-dir')
    if not own and run_files(out):
        if not args.overwrite:
            raise SystemExit(held_run_message(out, method))
        clear_run(out, verbose=True)
    hard, soft = changed_args(ckpt.get('args', {}), args)
    if hard:
        raise SystemExit(f'--resume {path}: these flags differ from the checkpoint\'s run: {"; ".join(hard)}; '
                         f'resume with the checkpoint\'s values, or start a new run in another --output-dir')
    if soft:
        print(f'--resume {path}: continuing with changed flags: {"; ".join(soft)}', flush=True)
    return path, ckpt


def open_resume(args, method):
    """Claims --output-dir, loads the checkpoint named by --resume (or None) and settles args.seed: a
    resumed run keeps its seed, since the augmentation of every sample depends on it; a fresh run
    without --seed draws one (the same on every process). Rank 0 decides (claim_output_dir) and
    every process ends with its message when it refuses. Returns (path, checkpoint)."""
    args.method = method  # saved with the args: a checkpoint says which program wrote it
    kept = {}

    def decide():
        kept['path'], kept['ckpt'] = claim_output_dir(args, method)
        return kept['path'] and str(kept['path'])
    path = dist.on_main(decide)
    if path is None:
        ckpt = None
    else:
        ckpt = kept['ckpt'] if dist.is_main() else load(path)
        path = Path(path)
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
    """Writes the backbone's weights without its classifier: a ResNet without fc (torchvision names,
    loads into torchvision's resnet with only fc missing), a common.vit.VisionTransformer without
    head (timm names, loads into timm's VisionTransformer(num_classes=0) strictly). Call on rank 0."""
    from common.vit import VisionTransformer
    drop = 'head.' if isinstance(backbone, VisionTransformer) else 'fc.'
    save_atomic({k: v for k, v in backbone.state_dict().items() if not k.startswith(drop)}, path)

def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def backbone_state_dict(ckpt, keep_fc=False, allow_vit=False):
    """Backbone weights (torchvision names, fc dropped) from any checkpoint this repo writes, a
    facebookresearch/moco checkpoint, or a plain torchvision ResNet state dict. With allow_vit, a
    checkpoint that holds a ViT (common.vit.holds_vit: a selfsup one, backbone.pth, a
    facebookresearch/moco-v3 or dino checkpoint) gives the ViT's weights instead (timm names, head
    dropped unless keep_fc; common.vit.vit_backbone_state_dict); without it such a file is refused.

    Raises ValueError listing the keys it cannot place when the file is none of those.
    """
    from common.vit import holds_vit, vit_backbone_state_dict
    if holds_vit(ckpt):
        if not allow_vit:
            raise ValueError('it holds a ViT backbone (patch_embed.*, timm names); this program reads ResNet '
                             'backbones only')
        return vit_backbone_state_dict(ckpt, keep_head=keep_fc)
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


def checkpoint_args(ckpt):
    """The training args a checkpoint carries, as a dict ({} when none): this repo's `args` dict, or
    the argparse Namespace of a facebookresearch/dino checkpoint (loaded with --unsafe-load)."""
    a = ckpt.get('args') if isinstance(ckpt, dict) else None
    if a is not None and not isinstance(a, dict):
        a = vars(a) if hasattr(a, '__dict__') else {}
    return dict(a or {})


def vit_method(ckpt):
    """'mocov3', 'dino', 'mae' or None: which method trained the ViT in `ckpt`, where the file says it (this
    repo's args.method or method; facebookresearch/moco-v3's module.base_encoder.* layout; dino's
    teacher/student layout). A plain backbone state dict says nothing."""
    if not isinstance(ckpt, dict):
        return None
    method = ckpt.get('method') or checkpoint_args(ckpt).get('method')
    if method in ('mocov3', 'dino', 'mae'):
        return method
    sd = ckpt.get('state_dict')
    if isinstance(sd, dict) and any(k.startswith(('module.base_encoder.', 'base_encoder.')) for k in sd):
        return 'mocov3'
    return 'dino' if 'teacher' in ckpt else None


def run_checkpoint_beside(path, sd):
    """For a plain backbone file (backbone.pth, which must stay a bare timm state dict): the training
    checkpoint_last.pth in the same folder when its backbone is exactly `sd` (the same run), else
    None. It tells which method trained the ViT and so its heads."""
    if not path:
        return None
    last = Path(path).resolve().parent / 'checkpoint_last.pth'
    if not last.is_file() or last == Path(path).resolve():
        return None
    try:
        ckpt = torch.load(last, map_location='cpu', weights_only=True, mmap=True)
        other = backbone_state_dict(ckpt, allow_vit=True)
    except Exception:  # noqa: BLE001 -- only a hint: an unreadable neighbour is ignored
        return None
    same = other.keys() == sd.keys() and all(torch.equal(other[k], sd[k]) for k in sd)
    return ckpt if same else None


def vit_config(sd, ckpt, num_heads=None, path=None):
    """common.vit.infer_vit_config of a ViT backbone state dict, plus vit=True, method (vit_method),
    heads_from and weights_from. The number of heads changes no shape, so it comes from, in this
    order: `num_heads` (a flag), the checkpoint's args.num_heads, MoCo v3's 12 for a ViT-Small of a
    MoCo v3 checkpoint (`M3:vits.py:115-120`, methods-modern.md §0b.2), the size's default (6 for
    DINO/DeiT's ViT-Small). A plain backbone file at `path` takes method and args from the run's
    checkpoint_last.pth beside it when that holds the same weights (run_checkpoint_beside)."""
    from common.vit import infer_vit_config
    method, args = vit_method(ckpt), checkpoint_args(ckpt)
    beside = run_checkpoint_beside(path, sd) if not method and not args else None
    if beside is not None:
        method, args = vit_method(beside), checkpoint_args(beside)
    if num_heads:
        src = 'given (--num-heads)'
    elif args.get('num_heads'):
        num_heads = int(args['num_heads'])
        src = "the checkpoint's args" if beside is None else 'checkpoint_last.pth beside it'
    else:
        size = infer_vit_config(sd, num_heads=1)['arch']  # heads do not affect the size
        if method == 'mocov3' and size == 'vit_small':
            num_heads, src = 12, 'MoCo v3 ViT-Small' + ('' if beside is None else ' (checkpoint_last.pth beside it)')
        else:
            src = f'default of {size}' if size else 'embed_dim / 64'
    try:
        cfg = infer_vit_config(sd, num_heads=num_heads)
    except ValueError as e:
        raise ValueError(f'{e} (--num-heads)') from None
    if cfg['embed_dim'] % cfg['num_heads']:
        raise ValueError(f'embed_dim {cfg["embed_dim"]} is not divisible by {cfg["num_heads"]} heads ({src})')
    return dict(cfg, vit=True, method=method, heads_from=src, weights_from=_vit_source(ckpt))


def _vit_source(ckpt):
    """Where vit_backbone_state_dict takes a ViT from, for protocol records."""
    if isinstance(ckpt, dict) and 'model' in ckpt and 'backbone_prefix' in ckpt:
        return f"model[{ckpt['backbone_prefix']}*]"
    if isinstance(ckpt, dict) and 'state_dict' in ckpt:
        return 'state_dict[module.base_encoder.*] (MoCo v3 layout)' if vit_method(ckpt) == 'mocov3' else 'state_dict'
    if isinstance(ckpt, dict) and 'teacher' in ckpt:
        return 'teacher[backbone.*] (DINO layout)'
    return 'backbone state dict'



def build_vit_backbone(sd, cfg, path=''):
    """The common.vit.VisionTransformer of `cfg` (vit_config, no head) with `sd` loaded strictly;
    ValueError naming what does not match."""
    from common.vit import build_vit
    keys = ('embed_dim', 'depth', 'num_heads', 'patch_size', 'img_size', 'in_chans', 'mlp_ratio', 'qkv_bias',
            'pos_embed')
    try:
        model = build_vit(None, **{k: cfg[k] for k in keys})
        model.load_state_dict(sd)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f'{path}: ViT backbone does not match {({k: cfg[k] for k in keys})}: '
                         f'{" ".join(str(e).split())[:300]}') from None
    return model


def load_backbone(path, weights_only=True, num_heads=None):
    """(backbone with fc=Identity, its state dict, the checkpoint's args or {}) from `path`: a ResNet,
    or a common.vit.VisionTransformer (head Identity) when the file holds a ViT (vit_config says how
    its heads are chosen; `num_heads` overrides)."""
    from common.resnet import build_resnet, infer_resnet_config
    ckpt = load(path, weights_only=weights_only)
    sd = backbone_state_dict(ckpt, allow_vit=True)
    args = checkpoint_args(ckpt)
    from common.vit import is_vit_state_dict
    if is_vit_state_dict(sd):
        return build_vit_backbone(sd, vit_config(sd, ckpt, num_heads, path), path), sd, args
    cfg = infer_resnet_config(sd)
    model = build_resnet(cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'],
                         in_channels=cfg['in_channels'])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f'{path}: backbone does not match {cfg}: missing {missing[:10]}, '
                         f'unexpected {unexpected[:10]}')
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
