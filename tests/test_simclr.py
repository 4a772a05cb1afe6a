"""simclr.py: NT-Xent by hand and against the TF formulation, the cross-process gradient (real
2-process torchrun), projection head and LARS parameter groups, end to end on real images (exact
resume, eval/knn.py on the checkpoint), 2 processes, the demo."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import optim
from common.resnet import build_resnet
from conftest import REPO, python, torchrun
from simclr import SimCLR, contrastive_logits, interleave, nt_xent, parse_args, projection_head

SMALL = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--proj-dim', '16',
         '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '32', '--warmup-epochs', '1']
EXCLUDED = "param group {'lars_exclude': True, 'weight_decay': 0.0}: "


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ loss ============


def test_nt_xent_by_hand():
    """2 images, interleaved rows a1 a2 b1 b2 with unit directions e1, e2, -e1, (0.6, 0.8); T=0.5."""
    z = torch.tensor([[2., 0.], [0., 1.], [-1., 0.], [3., 4.]])  # normalised inside
    logits, labels = contrastive_logits(z, t=0.5)
    inf = float('inf')
    want = torch.tensor([[-inf, 0.0, -2.0, 1.2],    # a1: partner a2, negatives b1, b2
                         [0.0, -inf, 0.0, 1.6],     # a2: partner a1
                         [-2.0, 0.0, -inf, -1.2],   # b1: partner b2
                         [1.2, 1.6, -1.2, -inf]])   # b2: partner b1
    assert torch.allclose(logits, want, atol=1e-6)
    assert labels.tolist() == [1, 0, 3, 2]
    e = math.exp
    per_anchor = [-0.0 + math.log(1 + e(-2) + e(1.2)),
                  -0.0 + math.log(1 + 1 + e(1.6)),
                  1.2 + math.log(e(-2) + 1 + e(-1.2)),
                  1.2 + math.log(e(1.2) + e(1.6) + e(-1.2))]
    assert nt_xent(z, 0.5).item() == pytest.approx(sum(per_anchor) / 4, rel=1e-6)


def test_nt_xent_negatives_and_tf_identity():
    """2N-1 candidates per anchor (self excluded); the TF loss ([v1; v2], sum of the two directional
    means, self-similarity pushed down by 1e9) is exactly twice ours."""
    torch.manual_seed(0)
    n, t = 6, 0.1
    z = torch.randn(2 * n, 5)
    logits, labels = contrastive_logits(z, t)
    assert (torch.isfinite(logits).sum(1) == 2 * n - 1).all() and torch.isinf(logits.diagonal()).all()
    assert torch.equal(labels, torch.arange(2 * n) ^ 1)
    # TF objective.py, written out independently
    h = F.normalize(z, dim=1)
    a, b = h[0::2], h[1::2]  # [v1; v2]: view 1 and view 2 of each image
    big = 1e9 * torch.eye(n)
    aa, bb = a @ a.T / t - big, b @ b.T / t - big
    ab, ba = a @ b.T / t, b @ a.T / t
    target = torch.arange(n)
    tf = F.cross_entropy(torch.cat([ab, aa], 1), target) + F.cross_entropy(torch.cat([ba, bb], 1), target)
    ours = nt_xent(z, t)
    assert tf.item() == pytest.approx(2 * ours.item(), rel=1e-5)
    # and the loss does not depend on the self-similarity: scaling a row's norm changes nothing
    assert nt_xent(z * torch.rand(2 * n, 1) * 5, t).item() == pytest.approx(ours.item(), rel=1e-5)


def test_interleave_layout():
    v1, v2 = torch.arange(3.).view(3, 1, 1, 1), 10 + torch.arange(3.).view(3, 1, 1, 1)
    assert interleave([v1, v2]).flatten().tolist() == [0, 10, 1, 11, 2, 12]


# ============ gradient across processes ============


def tiny_simclr():
    """BN-free backbone and head, so the global batch's gradient does not depend on how it is split."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    model = SimCLR(backbone, head, t=0.1).double()  # float64: 1e-6 below is far above rounding
    return model, torch.randn(8, 3, 6, 6, dtype=torch.float64)  # 4 images = 8 interleaved views


DRIVER = '''
import sys
import torch
import torch.distributed as tdist
sys.path[:0] = [{repo!r}, {tests!r}]
from common import dist
from test_simclr import tiny_simclr

def naive_gather(x):
    """The GatherLayer most SimCLR ports use: the own slice keeps its graph, the rest are constants."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    tdist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)

rank, world, _ = dist.init_distributed('cpu')
model, x = tiny_simclr()
n = x.shape[0] // world
out, exact = {{}}, dist.gather_with_grad
for name, gather in (('exact', exact), ('naive', naive_gather)):
    dist.gather_with_grad = gather
    model.zero_grad()
    logits, labels = model(x[rank * n:(rank + 1) * n])  # this rank's contiguous slice
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:  # as DDP: all-reduce and divide by the world size
        tdist.all_reduce(g)
        g /= world
    out[name] = grads
torch.save(out, {out!r} + '/grads_%d.pt' % rank)
dist.cleanup()
'''


def test_gradient_two_processes_equals_one(tmp_path):
    """Real 2-process gloo run: with gather_with_grad and DDP's averaging the gradients equal those of
    one process on the whole batch; the naive gather (no all-reduce in backward) does not."""
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / 'tests'), out=str(tmp_path)))
    torchrun(2, driver)
    model, x = tiny_simclr()
    logits, labels = model(x)
    F.cross_entropy(logits, labels).backward()
    want = [p.grad for p in model.parameters()]
    g0, g1 = torch.load(tmp_path / 'grads_0.pt'), torch.load(tmp_path / 'grads_1.pt')
    for w, a, b in zip(want, g0['exact'], g1['exact']):
        assert torch.allclose(a, w, atol=1e-6, rtol=0) and torch.allclose(b, w, atol=1e-6, rtol=0)
    assert max(w.abs().max().item() for w in want) > 0.1  # gradients of order 1: 1e-6 is a real bound
    err = max((a - w).abs().max().item() for w, a in zip(want, g0['naive']))
    assert err > 1e-2, err  # the naive gather loses the cross-process terms


# ============ model and optimiser ============


def test_projection_head_layout_and_init():
    head = projection_head(2048, 2048, 128)
    assert list(dict(head.named_children())) == ['fc0', 'bn0', 'relu0', 'fc1', 'bn1']
    assert head.fc0.bias is None and head.fc1.bias is None
    assert head.fc0.weight.shape == (2048, 2048) and head.fc1.weight.shape == (128, 2048)
    assert head.bn1.affine and head.bn1.bias is not None  # OSS keeps the last BN's beta
    assert head.fc0.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.02)  # Kaiming fan_in
    backbone = build_resnet('resnet10', 0, 8, True)
    model = SimCLR(backbone, projection_head(backbone.feat_dim, backbone.feat_dim, 16))
    logits, labels = model(torch.randn(6, 3, 32, 32))
    assert logits.shape == (6, 6) and model.head.fc0.weight.shape == (64, 64)  # hidden = feat_dim
    assert 0 < model.emb_std.item() <= 1


def test_lars_groups_exclude_bn_and_bias():
    """Every BN parameter (backbone and head) and every bias is excluded from wd and LARS adaptation,
    except the downsample BN's weight, whose name the OSS regex does not match (as OSS)."""
    backbone = build_resnet('resnet18', 0, 4)
    model = SimCLR(backbone, projection_head(backbone.feat_dim, backbone.feat_dim, 8))
    lines = []
    groups = optim.param_groups(model, optim.LARS_EXCLUDE_RULES, lines.append)
    excluded = {n for g in groups if g.get('lars_exclude') for n, p in model.named_parameters()
                if any(p is q for q in g['params'])}
    want = set()
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            if pname == 'bias' or (bn and not mname.endswith('downsample.1')):
                want.add(f'{mname}.{pname}')
    assert excluded == want
    assert {'head.bn0.weight', 'head.bn0.bias', 'head.bn1.weight', 'head.bn1.bias'} <= excluded
    assert not {'head.fc0.weight', 'head.fc1.weight', 'backbone.layer2.0.downsample.1.weight'} & excluded
    assert all(g['weight_decay'] == 0.0 for g in groups if g.get('lars_exclude'))
    assert len(lines) == 2 and any(l.startswith(EXCLUDED) for l in lines)


def test_optimizer_choice_and_color_strength(data64, tmp_path):
    """--optimizer sgd (lightly's CIFAR-10 benchmark): torch SGD with the weight decay on every
    parameter, BN and bias included; the default stays LARS with its exclusions; a checkpoint does
    not resume under the other optimizer. --color-strength s scales the jitter ranges: s = 0.5 gives
    brightness/contrast/saturation 1 +- 0.4 and hue +- 0.1 (the paper's CIFAR-10 setting)."""
    import simclr
    from common import augment
    backbone = build_resnet('resnet10', 0, 4)
    model = SimCLR(backbone, projection_head(backbone.feat_dim, backbone.feat_dim, 8))
    sgd = optim.lars_or_sgd(model, parse_args(['/d', '--optimizer', 'sgd', '--wd', '5e-4']), 0.1, lambda *a: None)
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 1
    assert sgd.param_groups[0]['weight_decay'] == 5e-4 and len(sgd.param_groups[0]['params']) == \
        len(list(model.parameters()))
    lars = optim.lars_or_sgd(model, parse_args(['/d']), 0.1, lambda *a: None)
    assert isinstance(lars, optim.LARS) and any(g['lars_exclude'] for g in lars.param_groups)
    out = tmp_path / 'o'
    simclr.main([str(data64), *SMALL, '--epochs', '1', '--max-steps', '1', '--optimizer', 'sgd', '--output-dir', str(out)])
    with pytest.raises(SystemExit, match="differ from the checkpoint's run: --optimizer sgd -> lars;"):
        simclr.main([str(data64), *SMALL, '--epochs', '1', '--output-dir', str(out), '--resume', 'auto'])
    jitter = augment.simclr(32, blur=False, strength=0.5).transforms[2].transforms[0]
    ranges = [v for r in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for v in r]
    assert ranges == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.6, 1.4, -0.1, 0.1])
    assert parse_args(['/d']).color_strength == 1.0


def test_defaults_are_the_oss_recipe():
    a = parse_args(['/data'])
    assert (a.arch, a.batch_size, a.epochs, a.lr, a.wd, a.momentum, a.eta, a.temperature, a.proj_dim) == \
        ('resnet50', 256, 200, 0.3, 1e-6, 0.9, 1e-3, 0.1, 128)
    assert (a.warmup_epochs, a.warmup_ratio, a.sync_bn, a.crop_size) == (10, 1e-4, None, 224)
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.cifar_stem and demo.crop_size == 32
    assert parse_args(['--epochs', '3']).epochs == 3 and parse_args(['--no-sync-bn']).sync_bn is False


# ============ end to end ============


@pytest.fixture(scope='module')
def straight(data64, tmp_path_factory):
    """3 epochs of 2 steps (batch 32 of 64 images), kNN monitor every epoch."""
    out = tmp_path_factory.mktemp('straight')
    p = python('simclr.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--knn-every', '1',
               '--output-dir', out)
    return out, p.stdout


def test_run_writes_checkpoints_and_logs(straight):
    out, stdout = straight
    assert 'effective LR 0.0375 = 0.3 x 32/256' in stdout and '62 negatives per anchor' in stdout
    assert 'BN over 64 views per process' in stdout and 'blur off' in stdout
    line = [l for l in stdout.splitlines() if l.startswith(EXCLUDED)][0]
    assert 'backbone.bn1.weight' in line and 'backbone.bn1.bias' in line
    files = {p.name for p in out.iterdir()}
    assert files >= {'checkpoint_last.pth', 'checkpoint_0003.pth', 'backbone.pth', 'log.jsonl'}
    c = ckpt(out)
    assert c['backbone_prefix'] == 'backbone.' and (c['epoch'], c['iter']) == (3, 0)
    assert 'head.bn1.bias' in c['model'] and isinstance(c['knn_random'], float)
    sd = torch.load(out / 'backbone.pth', weights_only=True)
    assert set(sd) == {k[len('backbone.'):] for k in c['model'] if k.startswith('backbone.')}
    train = records(out, 'train')
    assert len(train) == 6 and all(r['loss'] > 0 and 0 <= r['acc'] <= 100 and 0 < r['emb_std'] <= 1 for r in train)
    assert train[0]['lr'] == pytest.approx(0.0375 * 1e-4)  # warm-up from ratio 1e-4 (OSS)
    assert len(records(out, 'knn')) == 3 and 'weighted kNN top-1 (k=200): trained' in stdout


def test_resume_is_exact(data64, straight, tmp_path):
    """3 steps, stop mid-epoch, --resume auto for the other 3 == 6 steps straight, bitwise."""
    out = tmp_path / 'b'
    args = [*SMALL, '--epochs', '3', '--deterministic', '--knn-every', '1', '--output-dir', out]
    p = python('simclr.py', data64, *args, '--max-steps', '3')
    assert '--max-steps 3 reached' in p.stdout and (ckpt(out)['epoch'], ckpt(out)['iter']) == (1, 1)
    p = python('simclr.py', data64, *args, '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'iteration 1' in p.stdout
    a, b = ckpt(straight[0]), ckpt(out)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]['momentum_buffer'], sb[k]['momentum_buffer']) for k in sa)
    loss = lambda d: [(r['epoch'], r['iter'], r['loss']) for r in records(d, 'train')]  # noqa: E731
    assert loss(straight[0]) == loss(out)


def test_eval_knn_accepts_checkpoint_and_backbone(data64, straight, tmp_path):
    """eval/knn.py reads the training checkpoint (backbone_prefix) and backbone.pth alike, and gives the
    online monitor's number."""
    out, _ = straight
    res = []
    for name in ('checkpoint_last.pth', 'backbone.pth'):
        python('eval/knn.py', '--pretrained', out / name, data64, '--workers', '0', '--device', 'cpu',
               '--output-dir', tmp_path)
        res.append(json.loads((tmp_path / f'{name}.knn.json').read_text())['results'])
    assert res[0] == res[1]
    assert res[0]['200']['top1'] == pytest.approx(records(out, 'knn')[-1]['knn_top1'], abs=1e-3)


def test_torchrun_two_processes(data64, tmp_path):
    """2 gloo processes (no SyncBN on CPU): the global batch is split, rank 0 alone writes."""
    out = tmp_path / 'out'
    p = torchrun(2, 'simclr.py', data64, *SMALL, '--epochs', '1', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(16 per process)' in p.stdout
    assert '62 negatives per anchor' in p.stdout and 'BN over 32 views per process' in p.stdout
    assert len(records(out, 'train')) == 2 and len(ckpt(out)['rng']) == 2
    assert (out / 'backbone.pth').is_file()


def test_demo_short_variant(tmp_path):
    """`python simclr.py` on the shipped sample, shortened: prints trained and random-init kNN."""
    p = python('simclr.py', '--epochs', '1', '--width', '8', '--knn-every', '1', '--output-dir', tmp_path)
    assert 'effective LR' in p.stdout and 'blur off' in p.stdout
    line = [l for l in p.stdout.splitlines() if l.startswith('weighted kNN top-1 (k=200)')][0]
    trained, rand = float(line.split()[5]), float(line.split()[8])
    assert 10 < rand < 60 and 10 < trained < 60  # 10 classes: chance is 10
    tr = records(tmp_path, 'train')
    assert len(tr) == 2 and 0 < tr[-1]['emb_std'] <= 1  # 19 iterations, logged every 10 and at the end
