"""moco.py end to end on real images: torchrun (gloo, 2 processes), exact resume (stop and kill),
start-up checks, the backbone file, the demo."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from conftest import REPO, TINY, make_subset, python, torchrun

SMALL = TINY + ['--batch-size', '16', '--moco-k', '32', '--bn-splits', '2']


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def losses(d):
    recs = [json.loads(l) for l in open(d / 'log.jsonl')]
    return {(r['epoch'], r['iter']): r['loss'] for r in recs if r['type'] == 'train'}


def assert_same_state(a, b):
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]['momentum_buffer'], sb[k]['momentum_buffer'])
    assert (a['epoch'], a['iter']) == (b['epoch'], b['iter'])


def test_torchrun_two_processes(data64, tmp_path):
    """2 gloo processes: finishes, both ranks hold the same queue, rank 0 alone writes, the global
    batch is split over the processes."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport moco\n'
        f'core = moco.main(sys.argv[1:])\n'
        f'torch.save(core.queue, os.path.join({str(tmp_path)!r}, "queue_%s.pt" % os.environ["RANK"]))\n')
    out = tmp_path / 'out'
    p = torchrun(2, driver, data64, *SMALL, '--epochs', '2', '--save-freq', '1', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process)' in p.stdout
    q0, q1 = torch.load(tmp_path / 'queue_0.pt'), torch.load(tmp_path / 'queue_1.pt')
    assert torch.equal(q0, q1)
    assert sorted(os.listdir(out)) == ['backbone.pth', 'checkpoint_0001.pth', 'checkpoint_0002.pth',
                                       'checkpoint_last.pth', 'log.jsonl']
    c = ckpt(out)
    assert torch.equal(c['model']['queue'], q0) and c['epoch'] == 2 and len(c['rng']) == 2
    # 8 steps of 16 keys into a queue of 32: the pointer wrapped back to 0
    assert c['model']['queue_ptr'].item() == 0
    recs = [json.loads(l) for l in open(out / 'log.jsonl')]
    assert len([r for r in recs if r['type'] == 'train']) == 8  # one writer, not two


@pytest.fixture(scope='module')
def straight(data64, tmp_path_factory):
    out = tmp_path_factory.mktemp('straight')
    python('moco.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out)
    return out


def test_resume_after_stop_is_exact(data64, straight, tmp_path):
    """3 steps + stop + resume (mid-epoch) + the rest == 12 steps straight, bitwise."""
    out = tmp_path / 'b'
    p = python('moco.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out, '--max-steps', '3')
    assert '--max-steps 3 reached' in p.stdout
    assert (ckpt(out)['epoch'], ckpt(out)['iter']) == (0, 3)
    p = python('moco.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out, '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'iteration 3' in p.stdout
    assert_same_state(ckpt(straight), ckpt(out))
    assert losses(straight) == losses(out)


def test_kill_and_resume_is_exact(data64, straight, tmp_path):
    """SIGKILL right after the first checkpoint, then --resume auto, with 2 loader workers instead of
    0: the final state equals the straight run bitwise (augmentation is seeded per sample)."""
    out = tmp_path / 'c'
    args = [sys.executable, 'moco.py', str(data64), *SMALL, '--epochs', '3', '--deterministic',
            '--output-dir', str(out), '--save-iters', '1', '--workers', '2']
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / 'checkpoint_last.pth').exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt(out)
    assert killed_at['epoch'] < 3  # really interrupted
    p = python(*args[1:], '--resume', 'auto')
    assert 'resumed from' in p.stdout
    assert_same_state(ckpt(straight), ckpt(out))


def test_backbone_loads_into_torchvision_resnet50(data64, tmp_path):
    python('moco.py', data64, '--arch', 'resnet50', '--crop-size', '32', '--batch-size', '8', '--moco-k', '16',
           '--bn-splits', '2', '--workers', '0', '--max-steps', '1', '--epochs', '1', '--output-dir', tmp_path)
    sd = torch.load(tmp_path / 'backbone.pth', weights_only=True)
    missing, unexpected = torchvision.models.resnet50().load_state_dict(sd, strict=False)
    assert missing == ['fc.weight', 'fc.bias'] and unexpected == []


@pytest.mark.parametrize('extra, message', [
    (['--moco-k', '40'], '--moco-k 40 must be a multiple of the global batch 16; use e.g. --moco-k 32'),
    (['--moco-k', '128'], '--moco-k 128 is larger than the dataset (64 images); use at most 64'),
    (['--batch-size', '12', '--moco-k', '36', '--bn-splits', '8'], '--bn-splits 8 must divide the batch of 12'),
])
def test_startup_checks(data64, tmp_path, extra, message):
    import moco
    with pytest.raises(SystemExit) as e:
        moco.main([str(data64), *SMALL, *extra, '--output-dir', str(tmp_path)])
    assert message in str(e.value)


def test_data_errors(tmp_path):
    import moco
    with pytest.raises(SystemExit, match='does not exist'):
        moco.main([str(tmp_path / 'nope'), *SMALL, '--output-dir', str(tmp_path / 'o')])
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    with pytest.raises(SystemExit, match='no images'):
        moco.main([str(tmp_path / 'empty'), *SMALL, '--output-dir', str(tmp_path / 'o')])


def test_corrupt_image_names_the_file(tmp_path):
    import moco
    root = make_subset(tmp_path / 'data', 4)
    bad = root / 'train' / 'cat' / '0002.jpg'
    bad.write_bytes(b'not a jpeg')
    with pytest.raises(RuntimeError, match=f'cannot read image {bad}'):
        moco.main([str(root), *SMALL, '--output-dir', str(tmp_path / 'o'), '--epochs', '1'])


def test_demo_short_variant(tmp_path):
    """`python moco.py` on the shipped sample, shortened: prints trained and random-init kNN."""
    p = python('moco.py', '--epochs', '1', '--width', '8', '--knn-every', '1', '--output-dir', tmp_path)
    assert 'effective LR 0.06' in p.stdout
    line = [l for l in p.stdout.splitlines() if l.startswith('weighted kNN top-1')][0]
    trained, rand = float(line.split()[5]), float(line.split()[8])
    assert 10 < rand < 60 and 10 < trained < 60  # 10 classes: chance is 10
    recs = [json.loads(l) for l in open(tmp_path / 'log.jsonl')]
    ep = [r for r in recs if r['type'] == 'epoch'][0]
    assert ep['img_s'] > 0 and ep['peak_mem_mb'] > 0
    tr = [r for r in recs if r['type'] == 'train']
    assert len(tr) == 2 and 0 < tr[-1]['emb_std'] <= 1  # 19 iterations, logged every 10 and at the end


def test_benchmark_script_passes_its_flags_and_the_methods(tmp_path):
    """scripts/benchmark.py: its own flags before `--`, the method's after; it times --steps steps
    after --warmup and reports img/s from the method's log."""
    data = make_subset(tmp_path / 'd', 4)
    r = python('scripts/benchmark.py', 'moco', '--steps', '2', '--warmup', '1', '--', data, *TINY,
               '--batch-size', '8', '--moco-k', '16')
    assert '--max-steps 3' in r.stdout  # 1 warm-up + 2 timed steps reached the method
    assert 'img/s over 2 steps (after 1 warm-up)' in r.stdout


def test_compile_matches_eager(data64, straight, tmp_path):
    """--compile (torch.compile of both encoders; --compile-mode reduce-overhead, whose CUDA graphs
    do not apply on the CPU, reaches torch.compile): the same losses as eager to float rounding over 4
    steps, and a checkpoint with the same names (it resumes into an eager run)."""
    out = tmp_path / 'c'
    python('moco.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out, '--max-steps', '4',
           '--compile', '--compile-mode', 'reduce-overhead')
    eager, compiled = losses(straight), losses(out)
    assert len(compiled) == 4
    for k, v in compiled.items():
        assert abs(v - eager[k]) < 1e-4 * abs(eager[k]), (k, v, eager[k])
    a, b = ckpt(straight), ckpt(out)
    assert a['model'].keys() == b['model'].keys()
    p = python('moco.py', data64, *SMALL, '--epochs', '1', '--output-dir', out, '--resume', 'auto')
    assert 'resumed from' in p.stdout
