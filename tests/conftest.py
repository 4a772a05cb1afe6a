"""Shared test fixtures: small real-image subsets of the shipped CIFAR-10 sample, subprocess runner."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / 'data' / 'cifar10_sample'
sys.path.insert(0, str(REPO))

# tiny MoCo run: 4-stage ResNet of width 8 at 32 px, 16-d embeddings
TINY = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--moco-dim', '16',
        '--workers', '0', '--print-freq', '1', '--seed', '0']


def make_subset(root, n_train, n_val=0):
    """ImageNet-layout copy of the first n images per class of the shipped sample."""
    for split, n in (('train', n_train), ('val', n_val)):
        if not n:
            continue
        for c in sorted(os.listdir(SAMPLE / split)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted(os.listdir(SAMPLE / split / c))[:n]:
                shutil.copy(SAMPLE / split / c / f, root / split / c / f)
    return root


@pytest.fixture(scope='session')
def data64(tmp_path_factory):
    """64 train images (a few per class) and 20 val images."""
    root = make_subset(tmp_path_factory.mktemp('data64'), 7, 2)
    extra = sorted((root / 'train' / 'airplane').parent.glob('*/*.jpg'))
    assert len(extra) == 70
    for f in extra[64:]:  # trim to exactly 64 train images
        f.unlink()
    return root


def refused(fn, *argv):
    """The one-line message of the SystemExit that fn(*argv) ends in (no traceback, no second line)."""
    with pytest.raises(SystemExit) as e:
        fn(*argv)
    msg = str(e.value.code)
    assert '\n' not in msg and 'Traceback' not in msg, msg
    return msg


def run(args, check=True, timeout=600, env=None, **kw):
    """Runs a command in the repo root; returns CompletedProcess with text output."""
    e = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f'{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def python(*args, **kw):
    return run([sys.executable, *map(str, args)], **kw)


def torchrun(nproc, *args, **kw):
    return run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                '--master_port', str(29500 + os.getpid() % 1000), *map(str, args)], **kw)


def stop_and_resume(main, args, tmp_path, stop):
    """Runs main(args) straight into tmp_path/a, and into tmp_path/b stopped after `stop` steps
    (--max-steps) then continued with --resume auto, in this process (--deterministic is switched off
    again afterwards). Returns ((checkpoint a, checkpoint b), (train losses a, train losses b))."""
    import json
    import torch
    a, b = tmp_path / 'a', tmp_path / 'b'
    try:
        main([*map(str, args), '--output-dir', str(a)])
        main([*map(str, args), '--output-dir', str(b), '--max-steps', str(stop)])
        main([*map(str, args), '--output-dir', str(b), '--resume', 'auto'])
    finally:
        torch.use_deterministic_algorithms(False)
    ckpts = tuple(torch.load(d / 'checkpoint_last.pth', weights_only=True) for d in (a, b))
    losses = tuple([r['loss'] for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == 'train']
                   for d in (a, b))
    return ckpts, losses
