"""Runs and faults of eval/lincls.py and eval/semi.py (issue "Never lose a run"): a folder that holds
their run is never written over (and --overwrite deletes their own files only, never the training
run's beside them), resume refuses other pretrained weights (same path, new file) and other flags,
wrong kinds of file, unwritable folders and a full disk end in one line, and bad numbers are refused
naming the flag. Real files and tiny real runs, in this process; one real 2-process torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_subset, refused
from common import dist
from common.resnet import build_resnet
from eval import lincls, semi


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny runs are faster on one thread on the shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """10 train + 2 val real CIFAR-10 images per class."""
    return make_subset(tmp_path_factory.mktemp('eval_faults'), 10, 2)


def backbone_sd(seed=0):
    torch.manual_seed(seed)
    return {k: v for k, v in build_resnet('resnet10', width=8, cifar_stem=True).state_dict().items()
            if not k.startswith('fc.')}


def training_run(folder, seed=0):
    """A folder as moco.py leaves it: checkpoint_last.pth, backbone.pth, log.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = backbone_sd(seed)
    model = {'encoder_q.' + k: v for k, v in sd.items()} | {'queue': torch.randn(16, 8)}
    torch.save(dict(model=model, backbone_prefix='encoder_q.', optimizer={}, scaler={}, epoch=1, iter=0,
                    method='moco', args=dict(method='moco', epochs=1, seed=0)), folder / 'checkpoint_last.pth')
    torch.save(sd, folder / 'backbone.pth')
    (folder / 'log.jsonl').write_text('{"type": "train", "loss": 1.0}\n')
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class Prog:
    """One of the two programs with its tiny settings and the names of its files."""

    def __init__(self, name, main, ckpt, log, result, flags):
        self.name, self.main, self.ckpt, self.log, self.result, self.flags = name, main, ckpt, log, result, flags

    def __call__(self, pretrained, data, *extra):
        self.main([str(a) for a in ('--pretrained', pretrained, data, *self.flags, *extra)])

    def __repr__(self):
        return self.name


LINCLS = Prog('lincls', lincls.main, 'lincls_checkpoint.pth', 'lincls_log.jsonl', 'backbone.pth.lincls.json',
              ['--batch-size', '50', '--workers', '0', '--device', 'cpu', '--lr', '0.05', '--schedule', '1',
               '--print-freq', '2', '--epochs', '1'])
SEMI = Prog('semi', semi.main, 'semi_checkpoint.pth', 'semi_log.jsonl', 'semi.json',
            ['--fraction', '0.1', '--batch-size', '10', '--workers', '0', '--device', 'cpu', '--lr', '0.05',
             '--print-freq', '1', '--epochs', '1'])
PROGS = [LINCLS, SEMI]


# ============ a folder that holds a run ============

def test_lincls_rerun_is_refused_and_overwrite_deletes_only_its_files(data, tmp_path, capsys):
    """Default --output-dir: the training run's folder. A rerun without flags stops at start and
    writes nothing; --overwrite deletes lincls's files and no training file, nor another
    --pretrained's result."""
    run = training_run(tmp_path / 'run')
    LINCLS(run / 'backbone.pth', data, '--resume', 'auto')
    assert f'--resume auto: no lincls_checkpoint.pth in {run}; starting a fresh run' in capsys.readouterr().out
    (run / 'checkpoint_last.pth.lincls.json').write_text('{}\n')  # another linear run's result
    before = snapshot(run)
    msg = refused(LINCLS, run / 'backbone.pth', data)
    assert msg.startswith(f'{run} (the default --output-dir) already holds a linear-classification run')
    assert f'trained on {run / "backbone.pth"}, 1 of 1 epochs done' in msg
    assert '--resume auto' in msg and '--overwrite' in msg
    msg = refused(LINCLS, run / 'backbone.pth', data, '--overwrite', '--resume', run / 'lincls_checkpoint.pth')
    assert 'drop one of the two' in msg
    assert 'drop one of the two' in refused(LINCLS, run / 'backbone.pth', data, '--overwrite', '--resume', 'auto')
    assert snapshot(run) == before
    capsys.readouterr()
    LINCLS(run / 'backbone.pth', data, '--overwrite')
    out = capsys.readouterr().out
    assert '--overwrite: deleted lincls_checkpoint.pth, lincls_log.jsonl, backbone.pth.lincls.json' in out
    after = snapshot(run)
    training = ('checkpoint_last.pth', 'backbone.pth', 'log.jsonl', 'checkpoint_last.pth.lincls.json')
    assert {k: after[k] for k in training} == {k: before[k] for k in training}
    recs = [json.loads(line) for line in (run / 'lincls_log.jsonl').read_text().splitlines()]
    assert [r['type'] for r in recs] == ['lincls_protocol', 'lincls']  # the new run's records only


def test_semi_rerun_is_refused_and_overwrite_deletes_only_its_files(data, tmp_path, capsys):
    run = training_run(tmp_path / 'run')  # --output-dir: a training run's folder
    SEMI(run / 'backbone.pth', data, '--output-dir', run)
    before = snapshot(run)
    msg = refused(SEMI, run / 'backbone.pth', data, '--output-dir', run)
    assert msg.startswith(f'--output-dir {run} already holds a semi-supervised run (semi_checkpoint.pth: ')
    assert '1 of 1 epochs done' in msg and '--resume auto' in msg and '--overwrite' in msg
    assert 'drop one of the two' in refused(SEMI, run / 'backbone.pth', data, '--output-dir', run, '--overwrite',
                                            '--resume', run / 'semi_checkpoint.pth')
    assert snapshot(run) == before
    SEMI(run / 'backbone.pth', data, '--output-dir', run, '--overwrite')
    assert '--overwrite: deleted semi_checkpoint.pth, semi_log.jsonl, semi.json' in capsys.readouterr().out
    after = snapshot(run)
    assert {k: after[k] for k in ('checkpoint_last.pth', 'backbone.pth', 'log.jsonl')} == \
        {k: before[k] for k in ('checkpoint_last.pth', 'backbone.pth', 'log.jsonl')}
    assert [json.loads(r)['type'] for r in (run / 'semi_log.jsonl').read_text().splitlines()][0] == 'semi_protocol'
    assert sum('semi_protocol' in r for r in (run / 'semi_log.jsonl').read_text().splitlines()) == 1


def test_semi_grid_checks_every_setting_at_start(data, tmp_path, capsys):
    run = training_run(tmp_path / 'run')
    grid = ['--output-dir', tmp_path / 'grid', '--grid', '--grid-lr', '0.05', '--grid-head-lr-mult', '1', '10']
    SEMI(run / 'backbone.pth', data, *grid)
    first = json.loads((tmp_path / 'grid' / 'grid.json').read_text())
    msg = refused(SEMI, run / 'backbone.pth', data, *grid)
    assert f'--output-dir {tmp_path / "grid" / "lr0.05_head1"} already holds a semi-supervised run' in msg
    msg = refused(SEMI, run / 'backbone.pth', data, *grid, '--resume', tmp_path / 'grid' / 'lr0.05_head1' /
                  'semi_checkpoint.pth')
    assert '--grid continues each setting from its own folder; use --resume auto' in msg
    capsys.readouterr()
    SEMI(run / 'backbone.pth', data, *grid, '--resume', 'auto')  # both done: evaluated again, the same
    assert capsys.readouterr().out.count('resumed from') == 2
    assert json.loads((tmp_path / 'grid' / 'grid.json').read_text())['grid'] == first['grid']


# ============ resume checks ============

def renamed_copy(data, folder):
    """The same images under other file names: another file list."""
    for f in data.glob('*/*/*'):
        (folder / f.parent.relative_to(data)).mkdir(parents=True, exist_ok=True)
        (folder / f.parent.relative_to(data) / ('x' + f.name)).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize('prog', PROGS, ids=repr)
def test_resume_refuses_replaced_weights_and_changed_flags(prog, data, tmp_path, capsys):
    """The same --pretrained path with a new file (a new training run replaced backbone.pth), other
    run-defining flags and other training images are refused, each with both values; --epochs and
    printing may change."""
    run, out = training_run(tmp_path / 'run'), tmp_path / 'out'
    prog(run / 'backbone.pth', data, '--output-dir', out)
    saved = (out / prog.ckpt).read_bytes()
    msg = refused(prog, run / 'backbone.pth', data, '--output-dir', out, '--resume', 'auto', '--lr', '0.1',
                  '--batch-size', '20')
    assert '--lr 0.05 -> 0.1' in msg and '--batch-size' in msg and '-> 20' in msg
    msg = refused(prog, run / 'backbone.pth', renamed_copy(data, tmp_path / 'other'), '--output-dir', out,
                  '--resume', 'auto')
    assert msg.startswith(f'--resume {out / prog.ckpt}: other training images (') and 'resume on the same data' in msg
    training_run(run, seed=1)  # a new training run in the same folder
    msg = refused(prog, run / 'backbone.pth', data, '--output-dir', out, '--resume', 'auto', '--epochs', '2')
    old, new = lincls.weights_fingerprint(backbone_sd(0)), lincls.weights_fingerprint(backbone_sd(1))
    assert old != new and f'pretrained weights {old} -> {new}: {run / "backbone.pth"} holds other weights' in msg
    assert (out / prog.ckpt).read_bytes() == saved
    training_run(run, seed=0)
    capsys.readouterr()
    prog(run / 'backbone.pth', data, '--output-dir', out, '--resume', 'auto', '--epochs', '2', '--print-freq', '3')
    stdout = capsys.readouterr().out
    assert 'continuing with changed flags: --epochs 1 -> 2; --print-freq' in stdout and 'resumed from' in stdout
    assert torch.load(out / prog.ckpt, weights_only=True)['epoch'] == 2
    assert '--epochs 1 < the 2 epochs it has done' in refused(prog, run / 'backbone.pth', data, '--output-dir', out,
                                                          '--resume', 'auto')


@pytest.fixture(scope='module')
def eval_checkpoints(data, tmp_path_factory):
    """A real lincls checkpoint and a real semi checkpoint of one tiny training run."""
    run = training_run(tmp_path_factory.mktemp('kinds') / 'run')
    LINCLS(run / 'backbone.pth', data, '--output-dir', run / 'lin')
    SEMI(run / 'backbone.pth', data, '--output-dir', run / 'semi')
    return run


@pytest.mark.parametrize('prog', PROGS, ids=repr)
@pytest.mark.parametrize('kind', ['training', 'backbone', 'other program', 'text', 'missing', 'folder'])
def test_resume_of_the_wrong_kind_of_file(prog, kind, eval_checkpoints, data, tmp_path):
    run = eval_checkpoints
    title = dict(lincls='linear-classification', semi='semi-supervised')[prog.name]
    other = dict(lincls='semi', semi='lincls')[prog.name]
    path, want = dict(
        training=(run / 'checkpoint_last.pth', f'is a moco.py training checkpoint, not a {title} checkpoint: '
                                               f'pass it as --pretrained'),
        backbone=(run / 'backbone.pth', f'is a backbone file, not a {title} checkpoint: pass it as --pretrained'),
        text=(run / 'log.jsonl', f'is not a {title} checkpoint (not a PyTorch file'),
        missing=(run / 'nothing.pth', 'does not exist'),
        folder=(run / 'lin', f'is a folder, not a {title} checkpoint'),
    ).get(kind) or (run / dict(lincls='lin', semi='semi')[other] / f'{other}_checkpoint.pth',
                    f'is a checkpoint of eval/{other}.py, not of eval/{prog.name}.py: continue it with eval/{other}.py')
    msg = refused(prog, run / 'backbone.pth', data, '--output-dir', tmp_path / 'out', '--resume', path)
    assert msg.startswith(f'--resume {path} {want}'), msg
    assert not (tmp_path / 'out' / prog.log).exists()


# ============ unwritable folders, full disk ============

@pytest.mark.parametrize('prog', PROGS, ids=repr)
@pytest.mark.parametrize('where', ['proc', 'under a file'])
def test_unwritable_output_dir(prog, where, data, tmp_path):
    run = training_run(tmp_path / 'run')
    out = '/proc/selfsup_eval' if where == 'proc' else run / 'log.jsonl' / 'out'
    msg = refused(prog, run / 'backbone.pth', data, '--output-dir', out)
    assert msg.startswith(f'--output-dir {out}: cannot write there')


@pytest.mark.parametrize('prog', PROGS, ids=repr)
def test_full_disk_stops_in_one_line_and_keeps_the_checkpoint(prog, data, tmp_path):
    """<out>/<checkpoint>.tmp a link to /dev/full: the save of epoch 1 fails with a real ENOSPC."""
    run, out = training_run(tmp_path / 'run'), tmp_path / 'out'
    prog(run / 'backbone.pth', data, '--output-dir', out)
    saved = (out / prog.ckpt).read_bytes()
    tmp = out / (prog.ckpt + '.tmp')
    tmp.symlink_to('/dev/full')
    msg = refused(prog, run / 'backbone.pth', data, '--output-dir', out, '--resume', 'auto', '--epochs', '2')
    assert msg.startswith(f'cannot write {out / prog.ckpt}: [Errno 28] No space left on device')
    assert 'the last checkpoint (epochs done: 1) is kept' in msg and '--resume auto' in msg
    assert (out / prog.ckpt).read_bytes() == saved and not tmp.is_symlink()


def test_full_disk_under_torchrun_stops_every_rank(data, tmp_path):
    """2 processes (gloo): rank 0's failed save ends both, with one line and no traceback from
    either (not one rank's traceback while the other waits at the next collective)."""
    run, out = training_run(tmp_path / 'run'), tmp_path / 'out'
    LINCLS(run / 'backbone.pth', data, '--output-dir', out)
    (out / 'lincls_checkpoint.pth.tmp').symlink_to('/dev/full')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(29700 + os.getpid() % 1000), '--tee', '3', REPO / 'eval' / 'lincls.py', '--pretrained',
           run / 'backbone.pth', data, *LINCLS.flags, '--epochs', '2', '--output-dir', out, '--resume', 'auto']
    p = subprocess.run([str(a) for a in cmd], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    ranks = [line.split(']:', 1)[1] for line in (p.stdout + p.stderr).splitlines() if line.startswith('[default')]
    assert p.returncode != 0
    assert any(line.startswith(f'cannot write {out / "lincls_checkpoint.pth"}: [Errno 28]') for line in ranks)
    assert not any('Traceback' in line for line in ranks), '\n'.join(ranks)
    assert 'epoch 1:' in p.stdout and torch.load(out / 'lincls_checkpoint.pth', weights_only=True)['epoch'] == 1


# ============ flags ============

@pytest.mark.parametrize('prog', PROGS, ids=repr)
@pytest.mark.parametrize('flag, value', [('--lr', '-0.1'), ('--lr', '0'), ('-b', '0'), ('--epochs', '0')])
def test_bad_numbers_are_refused_naming_the_flag(prog, flag, value, capsys):
    parse = lincls.parse_args if prog is LINCLS else semi.get_parser().parse_args
    with pytest.raises(SystemExit):
        parse(['--pretrained', 'x.pth', 'data', *(['--fraction', '0.1'] if prog is SEMI else []), flag, value])
    err = capsys.readouterr().err
    assert f"argument {'-b/--batch-size' if flag == '-b' else flag}: invalid positive" in err and f"'{value}'" in err


@pytest.mark.parametrize('prog', PROGS, ids=repr)
def test_dist_timeout_reaches_the_process_group(prog, monkeypatch, tmp_path):
    seen = []

    def init(device, timeout):
        seen.append(timeout)
        raise SystemExit('stop here')
    monkeypatch.setattr(dist, 'init_distributed', init)
    for extra in ([], ['--dist-timeout', '2.5']):
        assert refused(prog, tmp_path / 'x.pth', tmp_path, *extra) == 'stop here'
    assert seen == [10, 2.5]
