"""Runs and faults (issue "Never lose a run"): a folder that holds a run is never written over, stop
signals checkpoint and exit, resume refuses other flags, data and kinds of file in one line, a full
disk keeps the previous checkpoint, the log after a resume lists every step once. Real processes,
real signals, real files, real torchrun (gloo, 2 processes)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, make_subset, python, refused

SMALL = TINY + ['--batch-size', '16', '--moco-k', '32', '--bn-splits', '2']


def ckpt(d):
    return torch.load(d / 'checkpoint_last.pth', map_location='cpu', weights_only=True)


def records(d, kind='train'):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


def assert_same_state(a, b):
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for k, s in a['optimizer']['state'].items():
        assert torch.equal(s['momentum_buffer'], b['optimizer']['state'][k]['momentum_buffer'])
    assert (a['epoch'], a['iter']) == (b['epoch'], b['iter'])


def moco(*argv):
    import moco as m
    return m.main([str(a) for a in argv])


def wait_for(cond, proc, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.005)


def first_record(out):
    return lambda: (out / 'log.jsonl').exists() and b'"train"' in (out / 'log.jsonl').read_bytes()


# ---------------------------------------------------------------- 1. a folder that holds a run


def test_a_folder_that_holds_a_run_is_not_overwritten(data64, tmp_path):
    """A byol.py run, then moco.py into the same folder: refused in one line naming the run, nothing
    written; the same moco command rerun after a crash without --resume auto: refused; --overwrite
    deletes the old run's files (its eval results too) and starts over."""
    import byol
    d = tmp_path / 'run'
    byol.main([str(data64), '--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32',
               '--workers', '0', '-b', '16', '--epochs', '2', '--output-dir', str(d)])
    (d / 'backbone.pth.knn.json').write_text('{}')  # an eval result of the byol backbone
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    msg = refused(moco, data64, *SMALL, '--max-steps', 1, '--output-dir', d)
    assert msg.startswith(f'--output-dir {d} already holds a run (a byol.py checkpoint at epoch 2 iteration 0 of '
                          f'2 epochs)') and 'byol.py --resume auto' in msg and '--overwrite' in msg
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # not a byte written

    e = tmp_path / 'moco'
    moco(data64, *SMALL, '--epochs', 2, '--max-steps', 2, '--output-dir', e)
    msg = refused(moco, data64, *SMALL, '--epochs', 2, '--output-dir', e)
    assert 'a moco.py checkpoint at epoch 0 iteration 2 of 2 epochs' in msg and 'continue it with --resume auto' in msg

    moco(data64, *SMALL, '--max-steps', 1, '--output-dir', d, '--overwrite')
    assert sorted(p.name for p in d.iterdir()) == ['backbone.pth', 'checkpoint_last.pth', 'log.jsonl']
    assert ckpt(d)['method'] == 'moco' and len(records(d)) == 1


def test_resume_auto_without_a_checkpoint_says_so(data64, tmp_path, capsys):
    """--resume auto in an empty folder starts fresh with one line; a log.jsonl without a checkpoint
    (a run killed before its first save) is set aside, not appended to."""
    d = tmp_path / 'fresh'
    d.mkdir()
    (d / 'log.jsonl').write_text('{"type": "train", "epoch": 0, "iter": 1, "loss": 1.0}\n')
    moco(data64, *SMALL, '--max-steps', 1, '--output-dir', d, '--resume', 'auto')
    assert f'--resume auto: no checkpoint in {d}; starting a fresh run' in capsys.readouterr().out
    assert len(records(d)) == 1 and records(d)[0]['loss'] != 1.0
    assert (d / 'log_stale.jsonl').read_text().count('\n') == 1


# ---------------------------------------------------------------- 3, 4. what a resume accepts


@pytest.fixture(scope='module')
def saved(data64, tmp_path_factory):
    """A moco run stopped at epoch 0 step 2 (-b 16, 4 steps an epoch), and its backbone file."""
    d = tmp_path_factory.mktemp('saved')
    moco(data64, *SMALL, '--epochs', 2, '--max-steps', 2, '--output-dir', d)
    return d


@pytest.mark.parametrize('extra, difference', [
    (['-b', '32', '--moco-k', '64'], '--batch-size 16 -> 32; --moco-k 32 -> 64'),
    (['--width', '16'], '--width 8 -> 16'),
    (['--v2'], '--aug-plus False -> True; --cos False -> True; --mlp False -> True; --moco-t 0.07 -> 0.2'),
    (['--seed', '1'], '--seed 0 -> 1'),
])
def test_resume_with_other_run_defining_flags_stops(data64, saved, tmp_path, extra, difference):
    out = tmp_path / 'o'
    shutil.copytree(saved, out)
    msg = refused(moco, data64, *SMALL, '--epochs', 2, *extra, '--output-dir', out, '--resume', 'auto')
    assert f'these flags differ from the checkpoint\'s run: {difference};' in msg


def test_resume_on_other_data_stops_and_allowed_changes_are_logged(data64, saved, tmp_path, capsys):
    out = tmp_path / 'o'
    shutil.copytree(saved, out)
    bigger = make_subset(tmp_path / 'bigger', 8)
    msg = refused(moco, bigger, *SMALL, '--epochs', 2, '--output-dir', out, '--resume', 'auto')
    assert 'the training data differ (it was written on 64 images' in msg and 'has 80' in msg
    other = make_subset(tmp_path / 'other', 7)  # 70 images; drop 6 others than data64 dropped
    for f in sorted((other / 'train').glob('*/*.jpg'))[:6]:
        f.unlink()
    msg = refused(moco, other, *SMALL, '--epochs', 2, '--output-dir', out, '--resume', 'auto')
    assert 'has its 64 images but another file list' in msg
    moved = tmp_path / 'moved'
    shutil.copytree(data64, moved)  # the same files elsewhere: accepted, with the changes logged
    moco(moved, *SMALL, '--epochs', 3, '--workers', 1, '--max-steps', 3, '--output-dir', out, '--resume', 'auto')
    log = capsys.readouterr().out
    assert f'continuing with changed flags: data {data64} -> {moved}; --epochs 2 -> 3; --max-steps 2 -> 3; ' \
           f'--output-dir {saved} -> {out}; --workers 0 -> 1\n' in log
    assert (ckpt(out)['epoch'], ckpt(out)['iter']) == (0, 3)


def test_wrong_kind_of_file_on_resume_is_one_line(data64, saved, tmp_path):
    import byol
    out = tmp_path / 'o'
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    cases = {
        saved / 'backbone.pth': 'is a backbone file, not a training checkpoint: use it with --pretrained',
        tmp_path / 'nope.pth': f'--resume {tmp_path / "nope.pth"} does not exist',
        tmp_path / 'notes.txt': 'is not a selfsup training checkpoint (not a PyTorch file',
    }
    for path, expected in cases.items():
        msg = refused(moco, data64, *SMALL, '--output-dir', out, '--resume', path)
        assert expected in msg and '--unsafe-load' not in msg, msg
    msg = refused(byol.main, [str(data64), '--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32',
                              '-b', '16', '--workers', '0', '--output-dir', str(out), '--resume',
                              str(saved / 'checkpoint_last.pth')])
    assert msg == f'--resume {saved / "checkpoint_last.pth"} is a moco.py checkpoint; byol.py cannot resume it ' \
                  f'(continue it with moco.py, or start byol.py in another --output-dir)'
    assert not out.exists() or not any(out.iterdir())


def test_resuming_an_older_checkpoint_into_its_folder_is_refused(data64, tmp_path):
    """checkpoint_0001.pth resumed in the folder whose checkpoint_last.pth is at epoch 2 would replace
    the later checkpoint: refused."""
    d = tmp_path / 'r'
    moco(data64, *SMALL, '--epochs', 2, '--save-freq', 1, '--output-dir', d)
    msg = refused(moco, data64, *SMALL, '--epochs', 2, '--output-dir', d, '--resume', d / 'checkpoint_0001.pth')
    assert 'holds a later checkpoint (moco.py checkpoint at epoch 2 iteration 0 of 2 epochs)' in msg


# ---------------------------------------------------------------- 5. unwritable folder, full disk


def test_unwritable_output_dir_is_one_line(data64, tmp_path):
    (tmp_path / 'file').write_text('x')
    assert refused(moco, data64, *SMALL, '--output-dir', '/proc/selfsup') == \
        '--output-dir /proc/selfsup: cannot write there ([Errno 2] No such file or directory); choose a writable folder'
    assert 'cannot write there ([Errno 20] Not a directory)' in \
        refused(moco, data64, *SMALL, '--output-dir', tmp_path / 'file' / 'run')


def mount_tmpfs(path, options):
    path.mkdir()
    if shutil.which('mount') is None or os.geteuid() != 0 or \
            subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True).returncode:
        pytest.skip('needs root and tmpfs mounts')


def test_read_only_output_dir_is_one_line(data64, tmp_path):
    ro = tmp_path / 'ro'
    mount_tmpfs(ro, 'ro,size=1m')
    try:
        msg = refused(moco, data64, *SMALL, '--output-dir', ro / 'run')
    finally:
        subprocess.run(['umount', '-l', str(ro)])
    assert msg == f'--output-dir {ro / "run"}: cannot write there ([Errno 30] Read-only file system); choose a ' \
                  f'writable folder'


def test_failed_save_keeps_the_previous_checkpoint(data64, tmp_path):
    """The temp file of the next save is a link to /dev/full (a real ENOSPC from the kernel): the run
    stops in one line naming the folder and the error, removes the temp file and keeps the previous
    checkpoint, which then resumes."""
    d = tmp_path / 'full'
    moco(data64, *SMALL, '--epochs', 2, '--max-steps', 2, '--output-dir', d)
    (d / 'checkpoint_last.pth.tmp').symlink_to('/dev/full')
    msg = refused(moco, data64, *SMALL, '--epochs', 2, '--save-iters', 1, '--output-dir', d, '--resume', 'auto')
    assert msg.startswith(f'cannot write {d / "checkpoint_last.pth"}: [Errno 28] No space left on device; the previous '
                          f'checkpoint (epoch 0 iteration 2) is kept; free space or fix {d}, then continue with: ')
    assert not os.path.lexists(d / 'checkpoint_last.pth.tmp')
    assert (ckpt(d)['epoch'], ckpt(d)['iter']) == (0, 2)
    moco(data64, *SMALL, '--epochs', 2, '--output-dir', d, '--resume', 'auto')
    assert ckpt(d)['epoch'] == 2


def test_full_disk_frees_the_partial_file(data64, tmp_path):
    """A real full file system (tmpfs with room for one checkpoint and a half): the second save fails
    mid-write; its partial file is removed, so the space is free again."""
    probe = tmp_path / 'probe'
    moco(data64, *SMALL, '--epochs', 2, '--max-steps', 1, '--output-dir', probe)
    size = (probe / 'checkpoint_last.pth').stat().st_size
    mnt = tmp_path / 'mnt'
    mount_tmpfs(mnt, f'size={size * 3 // 2 + 65536}')
    try:
        msg = refused(moco, data64, *SMALL, '--epochs', 2, '--save-iters', 1, '--output-dir', mnt)
        assert 'No space left on device; the previous checkpoint (epoch 0 iteration 1) is kept' in msg
        assert sorted(p.name for p in mnt.iterdir()) == ['checkpoint_last.pth', 'log.jsonl']
        assert (ckpt(mnt)['epoch'], ckpt(mnt)['iter']) == (0, 1)
        st = os.statvfs(mnt)
        assert (st.f_blocks - st.f_bfree) * st.f_frsize < size + 65536  # only the kept checkpoint and the log
    finally:
        subprocess.run(['umount', '-l', str(mnt)])  # lazy: the failed run's log may still be open


# ---------------------------------------------------------------- 2, 7. stop signals, resume, the log

LONG = [*SMALL, '--epochs', '6', '--deterministic']  # 24 steps


@pytest.fixture(scope='module')
def straight(data64, tmp_path_factory):
    out = tmp_path_factory.mktemp('straight')
    python('moco.py', data64, *LONG, '--output-dir', out)
    return out


def start(args, **kw):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_checkpoints_and_resume_is_exact(data64, straight, tmp_path):
    """SIGTERM mid-epoch: the step finishes, a checkpoint is written at it, exit 143 with one line;
    --resume auto then ends bitwise where the uninterrupted run ends, and the log lists every
    (epoch, iter) once with the same losses and epoch summaries as the straight run's."""
    out = tmp_path / 'term'
    proc = start(['moco.py', data64, *LONG, '--output-dir', out])
    wait_for(first_record(out), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    at = ckpt(out)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f'interrupted by SIGTERM at epoch {at["epoch"]} step {at["iter"]} of 4; checkpoint '
                           f'{out / "checkpoint_last.pth"}; continue with: python moco.py ')
    assert last.endswith(f'--output-dir {out} --resume auto') and 'Traceback' not in stderr
    assert 0 < at['epoch'] * 4 + at['iter'] < 24 and not (out / 'backbone.pth').exists()
    python('moco.py', data64, *LONG, '--output-dir', out, '--resume', 'auto')
    assert_same_state(ckpt(straight), ckpt(out))
    a, b = records(straight), records(out)
    assert [(r['epoch'], r['iter'], r['loss']) for r in a] == [(r['epoch'], r['iter'], r['loss']) for r in b]
    assert [(r['epoch'], r['loss'], r['acc']) for r in records(straight, 'epoch')] == \
        [(r['epoch'], r['loss'], r['acc']) for r in records(out, 'epoch')]


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_sigusr1_with_loader_workers(data64, tmp_path, sig):
    """Ctrl-C reaches the whole process group (the loader workers too), SIGUSR1 is SLURM's warning:
    either way the run stops after its step with a checkpoint, exit 128 + signal, no traceback."""
    out = tmp_path / 'sig'
    proc = start(['moco.py', data64, *SMALL, '--epochs', 6, '--workers', 2, '--output-dir', out],
                 start_new_session=True)
    wait_for(first_record(out), proc)
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr
    assert 'Traceback' not in stderr and f'interrupted by {signal.Signals(sig).name} at epoch' in stderr
    assert ckpt(out)['epoch'] * 4 + ckpt(out)['iter'] < 24


def torchrun_cmd(*args):
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
            '--master_port', str(29600 + os.getpid() % 1000), *map(str, args)]


def test_sigterm_two_processes_and_resume_is_exact(data64, tmp_path):
    """A 2-process torchrun gets SIGTERM (torchrun forwards it to both ranks): both stop at the same
    step with one checkpoint; the resumed run ends bitwise where an uninterrupted one ends."""
    a, b = tmp_path / 'a', tmp_path / 'b'
    subprocess.run(torchrun_cmd('moco.py', data64, *LONG, '--output-dir', a), cwd=REPO, check=True,
                   capture_output=True)
    proc = subprocess.Popen(torchrun_cmd('moco.py', data64, *LONG, '--output-dir', b), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(first_record(b), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert 'interrupted by SIGTERM at epoch' in stderr and len(ckpt(b)['rng']) == 2
    assert ckpt(b)['epoch'] * 4 + ckpt(b)['iter'] < 24
    subprocess.run(torchrun_cmd('moco.py', data64, *LONG, '--output-dir', b, '--resume', 'auto'), cwd=REPO,
                   check=True, capture_output=True)
    assert_same_state(ckpt(a), ckpt(b))
    assert [r['loss'] for r in records(a)] == [r['loss'] for r in records(b)]


def test_a_stalled_process_ends_the_run_after_dist_timeout(data64, tmp_path):
    """One rank stopped (SIGSTOP) mid-run: with --dist-timeout 0.1 (6 s) the other gives up instead of
    waiting half an hour (PyTorch's gloo default) and exits; torchrun then ends the run."""
    out = tmp_path / 'stall'
    cmd = torchrun_cmd('moco.py', data64, *SMALL, '--epochs', 50, '--dist-timeout', 0.1, '--output-dir', out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(first_record(out), proc)
    ranks = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    stalled, waiting = ranks[-1], ranks[0]
    t0 = time.time()
    os.kill(int(stalled), signal.SIGSTOP)

    def gone(pid):  # exited (a zombie until torchrun reaps it)
        try:
            return open(f'/proc/{pid}/stat').read().split(')')[-1].split()[0] == 'Z'
        except FileNotFoundError:
            return True
    try:
        while not gone(waiting):
            assert time.time() - t0 < 60, 'the waiting rank still waits'
            time.sleep(0.1)
        waited = time.time() - t0
    finally:
        os.kill(int(stalled), signal.SIGCONT)  # it then finds its peer gone, and torchrun ends
    _, stderr = proc.communicate(timeout=120)
    assert 5 < waited < 30 and proc.returncode != 0
    assert 'Timed out' in stderr or 'timed out' in stderr or 'Timeout' in stderr


def test_slurm_script_requeues_on_sigusr1_and_the_requeued_job_continues(data64, tmp_path):
    """scripts/slurm_moco.sbatch under stand-ins for srun and scontrol: SIGUSR1 to the batch shell
    (what `#SBATCH --signal=B:USR1@...` sends before the time limit) reaches both ranks through srun
    and torchrun, the run checkpoints and the script requeues the job; the requeued job (the same
    script again) resumes and finishes."""
    bin_ = tmp_path / 'bin'
    bin_.mkdir()
    (bin_ / 'srun').write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_ / 'scontrol').write_text(f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
                                   f'else echo "$@" >> {tmp_path / "scontrol.log"}; fi\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    out = tmp_path / 'slurm'
    env = dict(os.environ, PATH=f'{bin_}:{os.path.dirname(sys.executable)}:{os.environ["PATH"]}',
               SLURM_JOB_ID='4242', SLURM_NNODES='1', SLURM_JOB_NODELIST='localhost', NPROC_PER_NODE='2',
               MASTER_PORT=str(29700 + os.getpid() % 1000), PYTHONUNBUFFERED='1')
    cmd = ['bash', 'scripts/slurm_moco.sbatch', str(data64), *SMALL, '--epochs', '6', '--amp', 'off',
           '--output-dir', str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(first_record(out), proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stderr
    assert 'interrupted by SIGUSR1 at epoch' in stderr
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'
    at = ckpt(out)
    assert at['epoch'] * 4 + at['iter'] < 24
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert 'resumed from' in p.stdout and ckpt(out)['epoch'] == 6
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'  # not requeued again


def test_empty_val_image_with_knn_monitor_is_one_line(tmp_path):
    data = make_subset(tmp_path / 'd', 2, 1)
    empty = sorted((data / 'val').glob('*/*.jpg'))[3]
    empty.write_bytes(b'')
    msg = refused(moco, data, *TINY, '-b', 8, '--moco-k', 16, '--knn-every', 1, '--output-dir', tmp_path / 'o')
    assert msg.startswith('--knn-every: 1 of 10 images') and f'{empty.parent.name}/{empty.name} (0 bytes)' in msg


# ---------------------------------------------------------------- 8. small ones


@pytest.mark.parametrize('flag, value, expected', [
    ('--lr', '-0.1', "argument --lr: invalid positive float value: '-0.1'"),
    ('--lr', '0', "argument --lr: invalid positive float value: '0'"),
    ('--batch-size', '0', "argument -b/--batch-size: invalid positive int value: '0'"),
    ('--arch', 'resnet11', "argument --arch: invalid choice: 'resnet11' (choose from 'resnet10', 'resnet18',"),
])
def test_bad_flags_are_named(flag, value, expected, capsys, tmp_path):
    import moco as m
    with pytest.raises(SystemExit) as e:
        m.parse_args(['data', flag, value, '--output-dir', str(tmp_path)])
    assert e.value.code == 2 and expected in capsys.readouterr().err
