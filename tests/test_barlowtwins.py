"""barlowtwins.py: the loss and its per-view BN by hand, the LR schedule and the two LR groups by hand,
FAIR LARS on them; the gradient of 2 processes x half batch == 1 process on the whole batch (real
2-process torchrun), and half of it with the reference's all-reduce outside autograd; the views;
end to end: exact resume on real images, a 2-process run, one-line refusals."""
import json
import math

import pytest
import torch
import torch.nn as nn

import barlowtwins as bt
from common import augment, optim
from conftest import REPO, refused, stop_and_resume, torchrun

TINY = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--projector', '32-32-32',
        '--workers', '0', '--print-freq', '1', '--seed', '0', '--warmup-epochs', '1']
S = 1 / math.sqrt(1 + bt.BN_EPS)  # a unit-variance column after BN


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ loss, BN, schedule by hand ============


def test_batch_norm_per_column_biased_variance():
    """Column [0, 0, 0, 4]: mean 1, biased variance 12/4 = 3 (not 4, the unbiased one); column
    [2, 4, 6, 8]: mean 5, variance 5. No affine parameters."""
    z = torch.tensor([[0., 2.], [0., 4.], [0., 6.], [4., 8.]], dtype=torch.float64)
    want = torch.tensor([[-1 / math.sqrt(3 + 1e-5), -3 / math.sqrt(5 + 1e-5)],
                         [-1 / math.sqrt(3 + 1e-5), -1 / math.sqrt(5 + 1e-5)],
                         [-1 / math.sqrt(3 + 1e-5), 1 / math.sqrt(5 + 1e-5)],
                         [3 / math.sqrt(3 + 1e-5), 3 / math.sqrt(5 + 1e-5)]], dtype=torch.float64)
    assert torch.allclose(bt.global_batch_norm(z, 4), want, atol=1e-12, rtol=0)
    ref = nn.BatchNorm1d(2, affine=False).double().train()(z)  # the reference's loss BN
    assert torch.allclose(bt.global_batch_norm(z, 4), ref, atol=1e-12, rtol=0)


def test_off_diagonal():
    c = torch.arange(9.).view(3, 3)
    assert bt.off_diagonal(c).flatten().tolist() == [1., 2., 3., 5., 6., 7.]


def test_loss_by_hand():
    """z1 columns (1,-1,1,-1), (1,1,-1,-1); z2 both (1,-1,1,-1): after BN every entry is +-S, and
    C = [[S^2, S^2], [0, 0]]: loss = (1 - S^2)^2 + (1 - 0)^2 + lambda (S^4 + 0). Each view is
    normalised on its own, so shifting a column of either view changes nothing (and scaling it
    nothing but the eps's share)."""
    z1 = torch.tensor([[1., 1.], [-1., 1.], [1., -1.], [-1., -1.]], dtype=torch.float64)
    z2 = torch.tensor([[1., 1.], [-1., -1.], [1., 1.], [-1., -1.]], dtype=torch.float64)
    s2 = S * S
    loss, on, off = bt.barlow_twins_loss(z1, z2, 0.5)
    assert on.item() == pytest.approx((1 - s2) ** 2 + 1, abs=1e-12)
    assert off.item() == pytest.approx(s2 * s2, abs=1e-12)
    assert loss.item() == pytest.approx((1 - s2) ** 2 + 1 + 0.5 * s2 * s2, abs=1e-12)
    assert bt.barlow_twins_loss(z1 + 7, z2 - 2, 0.5)[0].item() == pytest.approx(loss.item(), abs=1e-12)
    scaled = bt.barlow_twins_loss(z1 * torch.tensor([3., 0.5], dtype=torch.float64), z2, 0.5)[0]
    assert scaled.item() == pytest.approx(loss.item(), abs=1e-4)
    # lambda weighs only the off-diagonal sum; the loss is a sum, not a mean
    assert bt.barlow_twins_loss(z1, z2, 0.0)[0].item() == pytest.approx((1 - s2) ** 2 + 1, abs=1e-12)
    wide = torch.randn(8, 16, dtype=torch.float64)
    _, on, off = bt.barlow_twins_loss(wide, wide, 0.0051)
    v = wide.var(0, correction=0)  # identical views: C_ii = var_i / (var_i + eps)
    assert on.item() == pytest.approx((1 - v / (v + 1e-5)).pow(2).sum().item(), rel=1e-6)
    assert off.item() > 0.1


def test_loss_in_fp32_under_autocast():
    """bf16 embeddings under CPU autocast: C and the loss are float32, equal to the float32 loss of the
    same (rounded) embeddings."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, on, off = bt.barlow_twins_loss(z1, z2, 0.0051)
    want = bt.barlow_twins_loss(z1.float(), z2.float(), 0.0051)[0]
    assert loss.dtype == torch.float32 and on.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_lr_schedule_by_hand():
    """Batch 512: base 2. 10 iterations per epoch, 100 epochs, 10 warm-up: 0 at step 0, 1 at step 50,
    base at 100; the cosine's midpoint (step 550) is (base + 0.001 base) / 2; the last step is
    nearly 0.001 base."""
    assert bt.lr_at(0, 10, 100, 10, 512) == 0
    assert bt.lr_at(50, 10, 100, 10, 512) == pytest.approx(1.0)
    assert bt.lr_at(100, 10, 100, 10, 512) == pytest.approx(2.0)
    assert bt.lr_at(550, 10, 100, 10, 512) == pytest.approx(1.001)
    assert bt.lr_at(1000, 10, 100, 10, 512) == pytest.approx(0.002)
    q = 0.5 * (1 + math.cos(math.pi * 899 / 900))
    assert bt.lr_at(999, 10, 100, 10, 512) == pytest.approx(2 * q + 0.002 * (1 - q))
    assert bt.lr_at(0, 10, 4, 0, 256) == pytest.approx(1.0)  # no warm-up: the base at once
    assert bt.lr_at(35, 10, 4, 4, 256) == pytest.approx(35 / 40)  # warm-up as long as the run


def tiny_model():
    args = bt.parse_args(['/d', *TINY])
    torch.manual_seed(0)
    return bt.build_model(args), args


def test_model_layers_groups_and_lars_step():
    """Projector [Linear-BN-ReLU] x 2 + Linear, no biases; zero-init residual BNs; two groups (ndim > 1
    / ndim 1) at 0.2 and 0.0048 x the schedule; after one FAIR LARS step a 1-D parameter moved by
    lr x 0.0048 x its raw gradient (no decay, no adaptation), a weight by lr x 0.2 x trust x (g + wd w)."""
    model, _ = tiny_model()
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ['Linear', 'BatchNorm1d', 'ReLU'] * 2 + ['Linear']
    assert all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))
    assert model.projector[0].weight.shape == (32, 64) and model.projector[-1].weight.shape == (32, 32)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in model.backbone.layer1)
    groups = bt.param_groups(model, 0.2, 0.0048)
    assert [g['lr_mult'] for g in groups] == [0.2, 0.0048]
    assert all(p.ndim > 1 for p in groups[0]['params']) and all(p.ndim == 1 for p in groups[1]['params'])
    assert len(groups[0]['params']) + len(groups[1]['params']) == len(list(model.parameters()))
    assert model.projector[1].weight in set(groups[1]['params'])
    wd = 0.1
    opt = optim.FairLARS(groups, 0.0, weight_decay=wd)
    optim.set_lr(opt, 2.0)
    assert [g['lr'] for g in opt.param_groups] == [pytest.approx(0.4), pytest.approx(0.0096)]
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    model(x1, x2).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        g, w = grads[n], before[n]
        if p.ndim == 1:
            want = w - 0.0096 * g
        else:
            d = g + wd * w
            want = w - 0.4 * (1e-3 * w.norm() / d.norm() if w.norm() > 0 else 1.0) * d
        assert torch.allclose(p, want, atol=1e-7), n
    assert grads['projector.1.weight'].abs().max() > 0


def test_views_are_barlow_twins():
    """§13.3 (BT:main.py:290-326): bicubic crop (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8,
    grayscale 0.2, blur p 1.0 / 0.1 with sigma U(0.1, 2), solarize p 0 / 0.2 at 128."""
    names = lambda t: [type(o).__name__ if type(o).__name__ != 'RandomApply' else  # noqa: E731
                       type(o.transforms[0]).__name__ + f'@{o.p}' for o in t.transforms]
    v1, v2 = augment.byol(224, 1), augment.byol(224, 2)
    assert names(v1) == ['RandomResizedCrop', 'RandomHorizontalFlip', 'ColorJitter@0.8', 'RandomGrayscale',
                         'GaussianBlur@1.0', 'ToTensor', 'Normalize']
    assert names(v2) == ['RandomResizedCrop', 'RandomHorizontalFlip', 'ColorJitter@0.8', 'RandomGrayscale',
                         'GaussianBlur@0.1', 'Solarize@0.2', 'ToTensor', 'Normalize']
    for v in (v1, v2):
        crop, flip, jitter = v.transforms[0], v.transforms[1], v.transforms[2].transforms[0]
        assert crop.scale == (0.08, 1.0) and crop.interpolation.value == 'bicubic' and flip.p == 0.5
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == \
            ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert v.transforms[3].p == 0.2 and v.transforms[4].transforms[0].sigma == (0.1, 2.0)
        assert list(v.transforms[-1].std) == [0.229, 0.224, 0.225]
    assert 'GaussianBlur@0.1' not in names(augment.byol(32, 2, blur=False))


def test_defaults_are_the_recipe():
    a = bt.parse_args(['/d'])
    assert (a.arch, a.projector, a.lambd, a.batch_size, a.epochs, a.learning_rate_weights, a.learning_rate_biases,
            a.weight_decay, a.warmup_epochs, a.momentum) == \
        ('resnet50', [8192, 8192, 8192], 0.0051, 2048, 1000, 0.2, 0.0048, 1e-6, 10, 0.9)
    demo = bt.parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.crop_size == 32 and demo.projector == [1024] * 3
    assert bt.parse_args(['--projector', '64-16']).projector == [64, 16]
    model = bt.build_model(bt.parse_args(['/d', '--arch', 'resnet18', '--projector', '64-16']))
    assert model.backbone.feat_dim == 512 and [type(m).__name__ for m in model.projector] == \
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']


# ============ the gradient over processes ============


def tiny_pair():
    """BN-free backbone and a projector whose BNs run in eval mode (fixed running statistics: a map
    per row, so the split of the batch over processes does not change it; their affine parameters
    still train): only the loss's own sums over the processes couple the rows. float64."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = bt.BarlowTwins(backbone, (16, 16, 12), lambd=0.0051, feat_dim=6).double()
    for m in model.projector:
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.eval()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=g) for _ in range(2))
    return model, x1, x2


DRIVER = '''
import sys
import torch
import torch.distributed as tdist
sys.path[:0] = [{repo!r}, {tests!r}]
import barlowtwins as bt
from common import dist
from test_barlowtwins import tiny_pair


def reference_style(z1, z2, lambd):
    """BT:main.py:211-220: C summed over the processes outside autograd (value global, gradient of
    the local share only); the BN's statistics global with gradient, as SyncBatchNorm's."""
    n = z1.shape[0] * dist.get_world_size()
    c = bt.global_batch_norm(z1, n).T @ bt.global_batch_norm(z2, n) / n
    total = c.detach().clone()
    tdist.all_reduce(total)
    c = c + (total - c.detach())
    on, off = (c.diagonal() - 1).pow(2).sum(), bt.off_diagonal(c).pow(2).sum()
    return on + lambd * off, on, off


rank, world, device = dist.init_distributed('cpu')
n = 8 // world
out = {{}}
for name in ('exact', 'reference'):
    model, x1, x2 = tiny_pair()
    ddp = dist.ddp(model, device, sync_buffers=False)  # averages the gradients over the 2 processes
    if name == 'reference':
        bt.barlow_twins_loss = reference_style
    loss = ddp(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
    loss.backward()
    out[name] = dict(loss=loss.detach(), grads={{k: p.grad.clone() for k, p in model.named_parameters()}})
torch.save(out, {out!r} + '/grads_%d.pt' % rank)
dist.cleanup()
'''


def test_gradient_two_processes_equals_one(tmp_path):
    """Real 2-process gloo run with DDP, 4 rows each: the loss on both ranks and every gradient
    (backbone conv, projector weights and BN affine parameters) == one process on the 8 rows, to
    1e-10 in float64. Control: the reference's all-reduce of C outside autograd gives exactly half."""
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / 'tests'), out=str(tmp_path)))
    torchrun(2, driver)
    model, x1, x2 = tiny_pair()
    loss = model(x1, x2)
    loss.backward()
    want = {k: p.grad for k, p in model.named_parameters()}
    assert len(want) == 9 and 'backbone.0.weight' in want and 'projector.1.weight' in want
    assert min(g.abs().max().item() for g in want.values()) > 1e-4
    for r in (0, 1):
        got = torch.load(tmp_path / f'grads_{r}.pt')
        assert got['exact']['loss'].item() == pytest.approx(loss.item(), rel=1e-12)
        assert got['reference']['loss'].item() == pytest.approx(loss.item(), rel=1e-12)
        assert got['exact']['grads'].keys() == want.keys()
        for k, w in want.items():
            assert torch.allclose(got['exact']['grads'][k], w, atol=1e-10, rtol=0), k
            assert torch.allclose(got['reference']['grads'][k], w / 2, atol=1e-10, rtol=0), k


# ============ end to end ============


def test_resume_is_exact(data64, tmp_path):
    """2 epochs of 2 steps (batch 32), stopped after 3 (mid-epoch 1) and resumed == straight, bitwise
    (model, LARS momentum, every logged loss) on CPU with --deterministic; the log carries both sums
    of the loss; backbone.pth is the ResNet without fc."""
    args = [data64, *TINY, '--batch-size', '32', '--epochs', '2', '--deterministic']
    (a, b), (la, lb) = stop_and_resume(bt.main, args, tmp_path, 3)
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and len(sa) > 0 and all(torch.equal(sa[k]['mu'], sb[k]['mu']) for k in sa)
    assert la == lb and len(la) == 4
    assert [g['lr_mult'] for g in a['optimizer']['param_groups']] == [0.2, 0.0048]
    tr = records(tmp_path / 'a', 'train')
    assert tr[0]['lr'] == 0 and tr[1]['lr'] == pytest.approx(0.125 * 0.5)  # warm-up over 2 steps, base 1/8
    assert all(r['loss'] == pytest.approx(r['on_diag'] + 0.0051 * r['off_diag'], rel=1e-4) for r in tr)
    sd = torch.load(tmp_path / 'a' / 'backbone.pth', weights_only=True)
    assert 'conv1.weight' in sd and not any(k.startswith(('fc.', 'projector')) for k in sd)


def test_torchrun_two_processes(data64, tmp_path):
    out = tmp_path / 'out'
    p = torchrun(2, 'barlowtwins.py', data64, *TINY, '--batch-size', '16', '--epochs', '1', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process and view)' in p.stdout
    assert len(records(out, 'train')) == 4 and (out / 'backbone.pth').is_file()


def test_device_aug_memory(data64, tmp_path):
    """--device-aug memory: the same two views made by common/batch_aug on the device from the decoded set."""
    bt.main([str(data64), *TINY, '--batch-size', '16', '--epochs', '1', '--max-steps', '1', '--device-aug', 'memory',
             '--output-dir', str(tmp_path)])
    r = records(tmp_path, 'train')
    assert len(r) == 1 and r[0]['loss'] > 0 and (tmp_path / 'checkpoint_last.pth').is_file()


def test_bad_input_one_line(data64, tmp_path, capsys):
    assert refused(bt.main, [str(tmp_path / 'missing'), *TINY, '--output-dir', str(tmp_path / 'o')]).startswith('data:')
    assert refused(bt.main, [str(data64), *TINY, '--sync-bn', '--output-dir', str(tmp_path / 'p')]) == \
        '--sync-bn needs CUDA devices; drop it on CPU'
    with pytest.raises(SystemExit):
        bt.parse_args(['/d', '--projector', '64-x'])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --projector: invalid projector (widths joined by -, e.g. 8192-8192-8192) value: '64-x'")
