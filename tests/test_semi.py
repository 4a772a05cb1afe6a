"""Semi-supervised evaluation: class-balanced splits (common.data, scripts/make_splits.py), split
files in our, OSS's and SimCLR's formats, and eval/semi.py end to end on real images — the
protocol's schedule and head LR multiplier, exact resume, and the lr x head-multiplier grid."""
import json
import shutil

import pytest
import torch

from conftest import REPO, SAMPLE, python
from common import optim
from common.data import balanced_subset, read_split_file, scan
from common.resnet import build_resnet
from eval import semi

SEMI = REPO / 'eval' / 'semi.py'
SPLITS = REPO / 'scripts' / 'make_splits.py'
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # on the shared, oversubscribed test cores 2 threads are ~100x slower
FAST = ['--batch-size', '10', '--workers', '0', '--device', 'cpu', '--print-freq', '1']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def imagenet_like(tmp_path_factory):
    """ImageNet-style names (train/n0000000C/n0000000C_<i>.JPEG) on real CIFAR images: 20 train
    and 5 val images for each of the 10 classes."""
    root = tmp_path_factory.mktemp('inet')
    for c, name in enumerate(sorted(p.name for p in (SAMPLE / 'train').iterdir())):
        wnid = f'n{c:08d}'
        for split, n in (('train', 20), ('val', 5)):
            (root / split / wnid).mkdir(parents=True)
            for i, f in enumerate(sorted((SAMPLE / split / name).iterdir())[:n]):
                shutil.copy(f, root / split / wnid / f'{wnid}_{100 + 7 * i}.JPEG')
    return root


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('semi_ckpt')
    torch.manual_seed(0)
    model = {'backbone.' + k: v for k, v in build_resnet('resnet10', width=8, cifar_stem=True).state_dict().items()}
    torch.save({'model': model, 'backbone_prefix': 'backbone.', 'args': {}}, d / 'ckpt.pth')
    return d / 'ckpt.pth'


# ============ splits ============

def test_balanced_subset(imagenet_like):
    samples, _ = scan(imagenet_like)
    a = balanced_subset(samples, 0.1, seed=0)
    assert a == sorted(a) and len(a) == 20 and a == balanced_subset(samples, 0.1, seed=0)
    assert [sum(samples[i][1] == c for i in a) for c in range(10)] == [2] * 10  # round(0.1 * 20) per class
    assert a != balanced_subset(samples, 0.1, seed=1)
    assert len(balanced_subset(samples, 0.001)) == 10  # at least one image per class
    assert len(balanced_subset(samples, 1.0)) == 200
    with pytest.raises(ValueError, match='fraction'):
        balanced_subset(samples, 0.0)
    with pytest.raises(ValueError, match='labelled'):
        balanced_subset([('a.jpg', -1)], 0.5)


def test_split_file_formats(imagenet_like, tmp_path):
    root = imagenet_like / 'train'
    samples, _ = scan(imagenet_like)
    want = [0, 21, 45]  # n00000000_100, n00000001_107, n00000002_135
    names = ['n00000000_100.JPEG', 'n00000001_107.JPEG', 'n00000002_135.JPEG']
    simclr = tmp_path / 'simclr.txt'  # SimCLR's lists: the file name only, class before '_'
    simclr.write_text(''.join(f'{n}\n' for n in names))
    ours = tmp_path / 'ours.txt'  # make_splits.py / OSS: class/file, OSS with a label column
    ours.write_text(''.join(f'{n.split("_")[0]}/{n} {i}\n' for i, n in enumerate(names)))
    assert read_split_file(simclr, samples, root) == read_split_file(ours, samples, root) == want
    assert samples[21][0].endswith('n00000001_107.JPEG')
    bad = tmp_path / 'bad.txt'
    bad.write_text('n00000000_100.JPEG\nn00000009_999.JPEG\n')
    with pytest.raises(ValueError, match=r'1 listed images .*n00000009/n00000009_999\.JPEG'):
        read_split_file(bad, samples, root)
    bad.write_text('n00000000_100.JPEG\nn00000000/n00000000_100.JPEG\n')
    with pytest.raises(ValueError, match='more than once'):
        read_split_file(bad, samples, root)


def test_make_splits_script(imagenet_like, tmp_path):
    python(SPLITS, imagenet_like, '--fractions', '0.1', '0.5', '--output-dir', tmp_path / 'a', env=ONE_THREAD)
    python(SPLITS, imagenet_like, '--fractions', '0.1', '--output-dir', tmp_path / 'b', env=ONE_THREAD)
    ten = (tmp_path / 'a' / '10percent.txt').read_text()
    assert ten == (tmp_path / 'b' / '10percent.txt').read_text()  # deterministic
    assert len(ten.split()) == 20 and len((tmp_path / 'a' / '50percent.txt').read_text().split()) == 100
    samples, _ = scan(imagenet_like)
    assert read_split_file(tmp_path / 'a' / '10percent.txt', samples, imagenet_like / 'train') == \
        balanced_subset(samples, 0.1)


# ============ fine-tuning ============

def test_protocol_defaults():
    a = semi.get_parser().parse_args(['d', '--pretrained', 'x', '--fraction', '0.01'])
    assert (a.epochs, a.schedule, a.gamma, a.momentum, a.batch_size, a.wd) == (20, [12, 16], 0.2, 0.9, 256, None)
    assert (a.grid_lr, a.grid_head_lr_mult) == ([0.001, 0.01, 0.1], [1.0, 10.0, 100.0])
    assert semi.default_wd(0.01) == 5e-4 and semi.default_wd(0.1) == 1e-4
    # x0.2 at epochs 12 and 16, per epoch
    lrs = [optim.lr_at(1.0, e, 0, 10, 20, milestones=[12, 16], gamma=0.2) for e in (11, 12, 15, 16, 19)]
    assert lrs == pytest.approx([1.0, 0.2, 0.2, 0.04, 0.04])
    with pytest.raises(SystemExit):
        semi.get_parser().parse_args(['d', '--pretrained', 'x'])  # a split is required


def test_semi_end_to_end_exact_resume(imagenet_like, ckpt, tmp_path):
    """2 epochs at once and 1 + 1 resumed end bitwise equal; the fc learns at lr x head-lr-mult."""
    split = tmp_path / 'split.txt'
    split.write_text(''.join(f'n{c:08d}_{100 + 7 * i}.JPEG\n' for c in range(10) for i in (0, 3)))  # SimCLR format
    common = ['--pretrained', ckpt, imagenet_like, '--split-file', split, '--schedule', '1', '--lr', '0.5',
              '--head-lr-mult', '10', *FAST]
    python(SEMI, *common, '--epochs', '2', '--output-dir', tmp_path / 'once', env=ONE_THREAD)
    python(SEMI, *common, '--epochs', '1', '--output-dir', tmp_path / 'twice', env=ONE_THREAD)
    p = python(SEMI, *common, '--epochs', '2', '--output-dir', tmp_path / 'twice', '--resume', 'auto', env=ONE_THREAD)
    assert 'resumed from' in p.stdout
    a, b = (json.loads((tmp_path / d / 'semi.json').read_text()) for d in ('once', 'twice'))
    assert (a['top1'], a['top5']) == (b['top1'], b['top5']) and 0 <= a['top1'] <= a['top5'] <= 100
    sa, sb = (torch.load(tmp_path / d / semi.CKPT_NAME, weights_only=True) for d in ('once', 'twice'))
    assert all(torch.equal(sa['model'][k], sb['model'][k]) for k in sa['model'])
    pr = a['protocol']
    assert (pr['labelled_images'], pr['train_images'], pr['fraction'], pr['wd']) == (20, 200, 0.1, 1e-4)
    assert (pr['epochs'], pr['schedule'], pr['gamma'], pr['head_lr_mult']) == (2, [1], 0.2, 10.0)
    assert pr['effective_lr'] == pytest.approx(0.5 * 10 / 256) and 'RandomCrop' in pr['train_aug']
    g = sa['optimizer']['param_groups']  # after epoch 1: LR x0.2; the fc group 10x the backbone's
    assert g[0]['lr'] == pytest.approx(0.2 * 0.5 * 10 / 256) and g[1]['lr'] == pytest.approx(10 * g[0]['lr'])
    # the whole network was fine-tuned, BN statistics included
    first = torch.load(ckpt, weights_only=True)['model']
    assert not torch.equal(sa['model']['layer1.0.conv1.weight'], first['backbone.layer1.0.conv1.weight'])
    assert not torch.equal(sa['model']['bn1.running_mean'], first['backbone.bn1.running_mean'])


def test_semi_grid(imagenet_like, ckpt, tmp_path):
    p = python(SEMI, '--pretrained', ckpt, imagenet_like, '--fraction', '0.1', '--epochs', '1', '--grid',
               '--grid-lr', '0.01', '1.0', '--grid-head-lr-mult', '1', '10', *FAST, '--output-dir', tmp_path,
               env=ONE_THREAD)
    assert 'rows: lr, columns: head LR multiplier' in p.stdout and '*' in p.stdout and 'best: lr' in p.stdout
    grid = json.loads((tmp_path / 'grid.json').read_text())
    assert [(r['lr'], r['head_lr_mult']) for r in grid['grid']] == [(0.01, 1), (0.01, 10), (1.0, 1), (1.0, 10)]
    assert grid['best']['top1'] == max(r['top1'] for r in grid['grid'])
    for r in grid['grid']:
        run = json.loads((tmp_path / f'lr{r["lr"]:g}_head{r["head_lr_mult"]:g}' / 'semi.json').read_text())
        assert run['top1'] == r['top1'] and run['protocol']['lr'] == r['lr']
        assert run['protocol']['labelled'].startswith('class-balanced 0.1')
