"""simsiam.py: the loss and its stop-gradient by hand; projector/predictor layout, the frozen bias and the
affine-free last BN; the per-epoch cosine and --fix-pred-lr by hand; exact resume on real images; a real
2-process torchrun; --device-aug; bad input in one line."""
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import refused, stop_and_resume, torchrun
from simsiam import (SimSiam, build_model, build_optimizer, lr_at, main, negative_cosine, parse_args, set_epoch_lr,
                     simsiam_loss)

TINY = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--dim', '16', '--pred-dim', '8',
        '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '16']


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ loss by hand ============


def test_loss_by_hand_and_stop_gradient():
    """p1 = e1, e2; z2 = (1, 1), (0, -3): cos 1/sqrt2 and -1. p2 = (3, 4), (1, 0); z1 = (4, -3), (2, 0): cos 0
    and 1. L = -(mean(0.7071, -1) + mean(0, 1)) / 2. dcos(p, z)/dp = z/(|p||z|) - cos p/|p|^2: for
    p1[0] = e1, z = (1, 1) that is (0, 1/sqrt2), times -1/2 (symmetrisation) x 1/2 (batch mean)."""
    p1 = torch.tensor([[1., 0.], [0., 1.]], requires_grad=True)
    p2 = torch.tensor([[3., 4.], [1., 0.]], requires_grad=True)
    z1 = torch.tensor([[4., -3.], [2., 0.]], requires_grad=True)
    z2 = torch.tensor([[1., 1.], [0., -3.]], requires_grad=True)
    loss = simsiam_loss(p1, p2, z1, z2)
    want = -0.5 * ((1 / math.sqrt(2) - 1) / 2 + (0 + 1) / 2)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert negative_cosine(p1, z2).item() == pytest.approx(-(1 / math.sqrt(2) - 1) / 2, rel=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets
    assert torch.allclose(p1.grad[0], torch.tensor([0., -0.25 / math.sqrt(2)]), atol=1e-7)
    assert torch.allclose(p1.grad[1], torch.zeros(2), atol=1e-7)  # cos = -1: an extremum, zero gradient
    # p2[0] = (3, 4), z1[0] = (4, -3): cos 0, gradient z/(|p||z|) = (4, -3)/25, times -1/4
    assert torch.allclose(p2.grad[0], -0.25 * torch.tensor([4., -3.]) / 25, atol=1e-7)
    # collapse (every p equal to its z, all rows equal) gives the minimum -1
    c = torch.ones(3, 4)
    assert simsiam_loss(c, c, c, c).item() == pytest.approx(-1.0)


def test_model_gradient_reaches_encoder_only_through_p():
    """Through the model: with the predictor's output scaled to 0 by hand the loss has no path into the
    encoder but through p (z is detached), so every encoder gradient is then 0."""
    torch.manual_seed(0)
    model = build_model(parse_args(['/d', *TINY])).double()
    x1, x2 = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model(x1, x2).backward()
    enc = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in enc) and max(g.abs().max().item() for g in enc) > 0
    assert 0 < model.emb_std < 1
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # stop the only path: z -> h -> p
        model.predictor[3].weight.zero_()
        model.predictor[3].bias.fill_(1.0)
    model(x1, x2).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.encoder.parameters())


# ============ model layout ============


def kinds(s):
    return [type(m).__name__ for m in s]


def test_projector_predictor_layout():
    """3-layer projector (ImageNet) and the 2-layer CIFAR one: Linear layers without bias but the last,
    whose bias is frozen; the last BN has no affine parameters; predictor 2048 -> 512 -> 2048 with a bias
    at its end; zero-init residuals; ResNet-50 widths."""
    model = build_model(parse_args(['/d']))
    proj, pred = model.encoder.projector, model.predictor
    assert kinds(proj) == ['Linear', 'BatchNorm1d', 'ReLU'] * 2 + ['Linear', 'BatchNorm1d']
    assert [m.weight.shape for m in proj if isinstance(m, nn.Linear)] == [(2048, 2048)] * 3
    assert [m.bias is None for m in proj if isinstance(m, nn.Linear)] == [True, True, False]
    assert not proj[6].bias.requires_grad and not proj[7].affine and proj[7].num_features == 2048
    assert kinds(pred) == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    assert pred[0].weight.shape == (512, 2048) and pred[0].bias is None
    assert pred[3].weight.shape == (2048, 512) and pred[3].bias.requires_grad
    backbone = model.encoder.backbone
    assert backbone.feat_dim == 2048 and all(torch.count_nonzero(b.bn3.weight) == 0 for b in backbone.layer1)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ['encoder.projector.6.bias']
    two = build_model(parse_args(['/d', *TINY, '--proj-layers', '2', '--proj-hidden-dim', '32']))
    assert kinds(two.encoder.projector) == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d']
    assert [m.weight.shape for m in two.encoder.projector if isinstance(m, nn.Linear)] == [(32, 64), (16, 32)]
    assert not two.encoder.projector[3].bias.requires_grad and not two.encoder.projector[4].affine
    x = torch.randn(4, 3, 8, 8)
    assert two.encoder(x).shape == (4, 16) and two.predictor(two.encoder(x)).shape == (4, 16)


def test_recipe_defaults():
    a = parse_args(['/d'])
    assert (a.arch, a.dim, a.pred_dim, a.proj_layers, a.lr, a.batch_size, a.epochs, a.momentum, a.wd,
            a.fix_pred_lr, a.crop_size, a.device_aug) == \
        ('resnet50', 2048, 512, 3, 0.05, 512, 100, 0.9, 1e-4, True, 224, 'off')
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and (demo.proj_layers, demo.lr, demo.wd) == (2, 0.06, 5e-4)
    assert parse_args(['--epochs', '3']).epochs == 3 and parse_args(['/d', '--no-fix-pred-lr']).fix_pred_lr is False


# ============ schedule and optimizer by hand ============


def test_cosine_per_epoch_and_fixed_predictor_lr():
    """init 0.1 over 100 epochs: 0.1, 0.1 (1 + cos(pi/4))/2 = 0.085355, 0.05, 0; the predictor stays at 0.1
    with --fix-pred-lr and follows the cosine without it. SGD momentum 0.9, wd 1e-4 on every trainable
    parameter (BN and biases too); the frozen projector bias is in no group."""
    assert [lr_at(0.1, e, 100) for e in (0, 25, 50)] == pytest.approx([0.1, 0.1 * (1 + math.sqrt(0.5)) / 2, 0.05])
    assert lr_at(0.1, 100, 100) == pytest.approx(0, abs=1e-15)
    for fix in (True, False):
        args = parse_args(['/d', *TINY] + ([] if fix else ['--no-fix-pred-lr']))
        model = build_model(args)
        opt = build_optimizer(model, args, 0.1, log=lambda *a: None)
        assert isinstance(opt, torch.optim.SGD)
        names = {id(p): n for n, p in model.named_parameters()}
        in_opt = [names[id(p)] for g in opt.param_groups for p in g['params']]
        assert sorted(in_opt) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert 'encoder.projector.6.bias' not in in_opt and len(in_opt) == len(list(model.parameters())) - 1
        assert all(g['momentum'] == 0.9 and g['weight_decay'] == 1e-4 for g in opt.param_groups)
        for e, want in ((0, 0.1), (25, 0.1 * (1 + math.sqrt(0.5)) / 2), (50, 0.05)):
            assert set_epoch_lr(opt, 0.1, e, 100) == pytest.approx(want)
            assert len(opt.param_groups) == (2 if fix else 1)
            for g in opt.param_groups:
                pred = names[id(g['params'][0])].startswith('predictor.')
                assert all(names[id(p)].startswith('predictor.') == pred for p in g['params']) or not fix
                assert g['lr'] == pytest.approx(0.1 if fix and pred else want)


# ============ end to end ============


def test_resume_is_exact_and_lr_per_epoch(data64, tmp_path):
    """2 epochs of 2 steps on real images, stopped after 3 (mid-epoch 1) and resumed == straight, bitwise
    (model, SGD momentum buffers, every logged loss). The LR is constant within an epoch, 0.0625 x
    (1 + cos(pi e/2))/2; the checkpoint's predictor group is at the initial LR."""
    args = [data64, *TINY, '--batch-size', '32', '--epochs', '2', '--lr', '0.5', '--deterministic']
    (a, b), (la, lb) = stop_and_resume(main, args, tmp_path, 3)
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][s], sb[k][s]) for k in sa for s in sa[k])
    assert la == lb and len(la) == 4 and all(-1 <= v <= 1 for v in la)
    assert a['backbone_prefix'] == 'encoder.backbone.'
    tr = records(tmp_path / 'a', 'train')
    assert [r['lr'] for r in tr] == pytest.approx([0.0625, 0.0625, 0.03125, 0.03125])
    assert all(0 < r['emb_std'] < 1 for r in tr)
    groups = a['optimizer']['param_groups']
    assert sorted(g['lr'] for g in groups) == pytest.approx([0.03125, 0.0625]) and any(g.get('fix_lr') for g in groups)
    assert (tmp_path / 'a' / 'backbone.pth').is_file()


def test_device_aug_memory_trains(data64, tmp_path):
    """--device-aug memory: MoCo v2's views batched on the CPU; two steps train and log a loss."""
    out = tmp_path / 'out'
    main([str(data64), *TINY, '--device-aug', 'memory', '--epochs', '1', '--max-steps', '2', '--output-dir', str(out)])
    tr = records(out, 'train')
    assert len(tr) == 2 and all(-1 <= r['loss'] <= 1 for r in tr)


def tiny_simsiam():
    """A BN-free SimSiam (conv backbone; the projector's and predictor's BNs replaced by Identity) in
    float64, so that its gradient on a batch does not depend on how the batch is split over processes."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SimSiam(backbone, dim=6, pred_dim=4, feat_dim=8)
    for seq in (model.encoder.projector, model.predictor):
        for i, m in enumerate(seq):
            if isinstance(m, nn.BatchNorm1d):
                seq[i] = nn.Identity()
    return model.double(), torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randn(8, 3, 6, 6, dtype=torch.float64)


DRIVER = """
import sys
import torch
sys.path[:0] = [{repo!r}, {tests!r}]
from common import dist
from test_simsiam import tiny_simsiam

rank, world, _ = dist.init_distributed('cpu')
model, x1, x2 = tiny_simsiam()
ddp = dist.ddp(model, torch.device('cpu'))
n = 8 // world
loss = ddp(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
loss.backward()
torch.save([p.grad for p in model.parameters() if p.requires_grad], {out!r} + '/grads_%d.pt' % rank)
dist.cleanup()
"""


def test_ddp_gradient_two_processes_equals_one(tmp_path):
    """Real 2-process gloo run of the model under DDP, 4 images per process: the averaged gradient ==
    one process on all 8 (the loss is a per-sample mean, so DDP's average is the global batch's)."""
    from conftest import REPO
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / 'tests'), out=str(tmp_path)))
    torchrun(2, driver)
    model, x1, x2 = tiny_simsiam()
    model(x1, x2).backward()
    want = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(want) == 8 and max(w.abs().max().item() for w in want) > 1e-3  # conv 2, projector 3, predictor 3
    for r in (0, 1):
        got = torch.load(tmp_path / f'grads_{r}.pt')
        assert len(got) == len(want) and all(torch.allclose(a, w, atol=1e-12, rtol=0) for a, w in zip(got, want))


def test_torchrun_two_processes(data64, tmp_path):
    """Real 2-process gloo run: each process takes 8 images per view, DDP averages, BN per process on CPU;
    4 steps of the 64-image epoch are logged and the backbone is saved."""
    out = tmp_path / 'out'
    p = torchrun(2, 'simsiam.py', data64, *TINY, '--epochs', '1', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process and view)' in p.stdout and 'BN per process' in p.stdout
    tr = records(out, 'train')
    assert len(tr) == 4 and all(-1 <= r['loss'] <= 1 for r in tr) and (out / 'backbone.pth').is_file()


def test_bad_input_one_line(data64, tmp_path):
    assert refused(main, [str(tmp_path / 'missing'), *TINY, '--output-dir', str(tmp_path / 'o')]).startswith('data:')
    msg = refused(main, [str(data64), *TINY, '--sync-bn', '--output-dir', str(tmp_path / 'o2')])
    assert msg.startswith('--sync-bn needs CUDA')
    with pytest.raises(SystemExit):
        parse_args(['/d', '--proj-layers', '4'])
    with pytest.raises(SystemExit):
        parse_args(['/d', '--lr', '-0.05'])


def test_simsiam_module_on_a_plain_backbone():
    """SimSiam takes any NxF backbone (feat_dim given): the output widths follow dim and pred_dim."""
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SimSiam(backbone, dim=6, pred_dim=2, feat_dim=4)
    assert model.encoder.projector[0].weight.shape == (4, 4) and model.predictor[0].weight.shape == (2, 6)
    loss = model(torch.randn(3, 3, 5, 5), torch.randn(3, 3, 5, 5))
    assert -1 <= loss.item() <= 1
