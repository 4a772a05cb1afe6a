"""BYOL: loss by hand, tau schedule and EMA placement, per-view BN batches, gradient accumulation,
end to end on real images (exact resume, torchrun with 2 processes, the demo, eval/knn.py)."""
import copy
import json
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import optim
from common.log import Logger
from common.run import Run
from conftest import REPO, python, torchrun
from byol import BYOL, byol_loss, parse_args, tau_at, train_one_epoch

TINY = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--hidden-dim', '32',
        '--dim', '16', '--workers', '0', '--print-freq', '1', '--seed', '0']


def tiny_byol(bn_backbone=False, hidden=8, dim=4):
    """BYOL over a 3->4 linear backbone (optionally followed by BN), small enough to check by hand."""
    layers = [('fc', nn.Linear(3, 4))] + ([('bn', nn.BatchNorm1d(4))] if bn_backbone else [])
    return BYOL(nn.Sequential(OrderedDict(layers)), feat_dim=4, hidden_dim=hidden, dim=dim)


def run_loop(model, batches, argv, saves=None):
    """train_one_epoch of byol.py over `batches` (lists [x1, x2]), optimizer and LR as main() builds them."""
    args = parse_args(['data', '--print-freq', '1', *argv])
    lr = optim.scaled_lr(args.lr, args.batch_size * args.accum_steps)
    groups = optim.param_groups(model, optim.LARS_EXCLUDE_RULES, lambda *a: None)
    opt = optim.LARS(groups, lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    loader = [(views, torch.zeros(len(views[0])), torch.arange(len(views[0]))) for views in batches]
    run = Run(args, model, 'online.backbone', opt, scaler, None, None, 'test', Logger(), torch.device('cpu'),
              loader)
    run.save = lambda e, i, keep=False: (saves if saves is not None else []).append((e, i))  # record, write nothing
    train_one_epoch(loader, model, model, opt, scaler, 0, 0, len(batches), lr, args, torch.device('cpu'),
                    Logger(), run)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


# ============ loss ============


def test_loss_by_hand_symmetric_and_constant():
    # sample 0: cos(p1, z2) = cos((1,0), (0,1)) = 0 -> 2;   cos(p2, z1) = cos((1,1), (2,2)) = 1 -> 0
    # sample 1: cos((3,4), (-3,-4)) = -1 -> 4;             cos((1,0), (1,sqrt 3)) = 1/2 -> 1
    p1 = torch.tensor([[1., 0.], [3., 4.]], requires_grad=True)
    p2 = torch.tensor([[1., 1.], [1., 0.]], requires_grad=True)
    z1 = torch.tensor([[2., 2.], [1., math.sqrt(3)]])
    z2 = torch.tensor([[0., 1.], [-3., -4.]])
    loss = byol_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(((2 + 0) + (4 + 1)) / 2, abs=1e-6)  # mean over the batch
    assert byol_loss(p2, p1, z2, z1).item() == pytest.approx(loss.item(), abs=1e-6)  # views swapped
    # the constant: 2 - 2cos per direction (lucidrains / paper); OpenSelfSup's -2cos is 4 lower, same gradient
    cos = F.cosine_similarity
    oss = -2 * cos(p1, z2).mean() - 2 * cos(p2, z1).mean()
    assert loss.item() == pytest.approx(oss.item() + 4, abs=1e-6)
    g_ours = torch.autograd.grad(loss, [p1, p2])
    g_oss = torch.autograd.grad(oss, [p1, p2])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_oss))
    # invariant to the scale of either side (both L2-normalised)
    assert byol_loss(5 * p1, p2, z1, 0.1 * z2).item() == pytest.approx(loss.item(), abs=1e-5)


# ============ model, tau and the target update ============


def test_model_init_heads_named_for_lars_exclusions():
    torch.manual_seed(0)
    model = BYOL(nn.Linear(64, 64), feat_dim=64, hidden_dim=512, dim=64)
    pr = model.predictor
    assert [type(m) for m in pr] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert pr.fc0.weight.std().item() == pytest.approx(0.01, rel=0.05) and pr.fc0.bias.abs().sum() == 0
    proj = model.online.projector.fc0.weight  # Kaiming fan_in (ReLU gain): std sqrt(2/64)
    assert proj.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    for a, b in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    groups = optim.param_groups(model, optim.LARS_EXCLUDE_RULES, lambda *a: None)
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = {names[id(p)] for g in groups if g.get('lars_exclude') for p in g['params']}
    assert {'online.projector.bn0.weight', 'online.projector.bn0.bias', 'predictor.bn0.weight',
            'predictor.fc1.bias'} <= excluded
    assert 'predictor.fc1.weight' not in excluded
    assert not any(names[id(p)].startswith('target.') for g in groups for p in g['params'])  # not optimised


def test_tau_schedule_by_hand():
    K = 1000
    assert tau_at(0, K, 0.996) == pytest.approx(0.996)
    assert tau_at(K // 2, K, 0.996) == pytest.approx(0.998)  # 1 - 0.004 x (0 + 1)/2
    assert tau_at(K // 4, K, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert tau_at(K, K, 0.996) == pytest.approx(1.0)


def test_ema_runs_after_the_optimizer_step_and_target_gets_no_grad():
    torch.manual_seed(0)
    model = tiny_byol()
    with torch.no_grad():  # make target != online so that the mix is visible
        for p in model.target.parameters():
            p.add_(torch.randn_like(p))
    online0, target0 = params(model.online), params(model.target)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    run_loop(model, [[x1, x2]], ['--epochs', '1', '--tau', '0.75', '--lr', '25.6', '--warmup-epochs', '0'])
    online1, target1 = params(model.online), params(model.target)
    assert any(not torch.equal(a, b) for a, b in zip(online0, online1))  # the step moved the online network
    for t0, o0, o1, t1 in zip(target0, online0, online1, target1):
        # K = 1 step, k = 0: tau = tau0 = 0.75, applied to the online weights *after* the step
        assert torch.allclose(t1, 0.75 * t0 + 0.25 * o1, atol=1e-6)
    assert not all(torch.allclose(t1, 0.75 * t0 + 0.25 * o0, atol=1e-6) for t0, o0, t1 in zip(target0, online0, target1))
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())


def test_views_are_separate_bn_batches():
    """OSS forwards each view as its own batch; concatenating both views (lucidrains) gives another loss."""
    torch.manual_seed(0)
    model = tiny_byol(bn_backbone=True)
    x1, x2 = torch.randn(8, 3), 3 * torch.randn(8, 3) + 1
    loss = model(x1, x2)
    online, pred, target = model.online, model.predictor, model.target
    with torch.no_grad():
        per_view = byol_loss(pred(online(x1)), pred(online(x2)), target(x1), target(x2))
        p = pred(online(torch.cat([x1, x2])))
        z = target(torch.cat([x1, x2]))
        concat = byol_loss(p[:8], p[8:], z[:8], z[8:])
    assert loss.item() == pytest.approx(per_view.item(), abs=1e-6)
    assert abs(loss.item() - concat.item()) > 1e-2
    # with BN on running statistics the two layouts agree: only the batch composition differs
    model.eval()
    with torch.no_grad():
        a = model(x1, x2)
        p, z = model.predictor(model.online(torch.cat([x1, x2]))), model.target(torch.cat([x1, x2]))
        assert a.item() == pytest.approx(byol_loss(p[:8], p[8:], z[:8], z[8:]).item(), abs=1e-5)


# ============ gradient accumulation ============


def test_accum_steps_count_optimizer_steps(monkeypatch):
    """6 batches with --accum-steps 2: 3 optimizer steps, 3 EMA updates with tau of k = 0, 1, 2 of
    K = 3, LR of steps 0, 1, 2, and mid-epoch checkpoints only on window boundaries."""
    torch.manual_seed(0)
    model = tiny_byol()
    taus, lrs = [], []
    update = model.update_target
    model.update_target = lambda tau: (taus.append(tau), update(tau))
    set_lr = optim.set_lr
    monkeypatch.setattr(optim, 'set_lr', lambda opt, lr: (lrs.append(lr), set_lr(opt, lr)))
    saves = []
    run_loop(model, [[torch.randn(4, 3), torch.randn(4, 3)] for _ in range(6)],
             ['--epochs', '1', '--batch-size', '4', '--accum-steps', '2', '--warmup-epochs', '1',
              '--save-iters', '1'], saves)
    assert taus == pytest.approx([tau_at(k, 3, 0.996) for k in range(3)])
    # warm-up over the 3 steps of 1 epoch from 1e-4, on the base LR 0.2 x 4/256 x 2
    base = 0.2 * 8 / 256
    assert lrs == pytest.approx([base * (1 - (1 - k / 3) * (1 - 1e-4)) for k in range(3)])
    assert saves == [(0, 2), (0, 4)]  # batches done at the checkpoints: whole windows


def test_accumulated_gradients_equal_one_large_batch():
    """Without BN, 2 accumulated batches of 4 make the same step (and EMA) as one batch of 8."""
    torch.manual_seed(0)
    a = tiny_byol()
    for net in (a.online.projector, a.target.projector, a.predictor):
        net.bn0 = nn.Identity()
    b = copy.deepcopy(a)
    x1, x2 = torch.randn(8, 3), torch.randn(8, 3)
    start = params(a)
    flags = ['--epochs', '1', '--warmup-epochs', '0', '--tau', '0.5', '--lr', '10']
    run_loop(a, [[x1[:4], x2[:4]], [x1[4:], x2[4:]]], flags + ['--accum-steps', '2', '--batch-size', '4'])
    run_loop(b, [[x1, x2]], flags + ['--batch-size', '8'])
    assert any(not torch.allclose(p, q, atol=1e-3) for p, q in zip(start, params(a)))  # it did move
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6)


# ============ end to end on real images ============


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def records(d, kind='train'):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# 64 images, batches of 8 accumulated in pairs: 4 optimizer steps per epoch, 12 in all
E2E = TINY + ['--batch-size', '8', '--accum-steps', '2', '--epochs', '3', '--deterministic']


@pytest.fixture(scope='module')
def straight(data64, tmp_path_factory):
    out = tmp_path_factory.mktemp('straight')
    python('byol.py', data64, *E2E, '--output-dir', out)
    return out


def test_run_writes_checkpoint_backbone_and_log(straight):
    assert {'backbone.pth', 'checkpoint_last.pth', 'checkpoint_0003.pth', 'log.jsonl'} <= set(os.listdir(straight))
    c = ckpt(straight)
    assert c['backbone_prefix'] == 'online.backbone.' and (c['epoch'], c['iter']) == (3, 0)
    bb = torch.load(straight / 'backbone.pth', weights_only=True)
    assert set(bb) == {k[len('online.backbone.'):] for k in c['model'] if k.startswith('online.backbone.')}
    tr = records(straight)
    assert [(r['epoch'], r['iter']) for r in tr] == [(e, i) for e in range(3) for i in range(1, 5)]
    assert [r['tau'] for r in tr] == pytest.approx([tau_at(k, 12, 0.996) for k in range(12)])
    assert all(0 < r['emb_std'] <= 1 and 0 <= r['loss'] <= 8 for r in tr)


def test_resume_is_exact_with_accumulation(data64, straight, tmp_path):
    """6 optimizer steps, stop mid-epoch, --resume auto, 6 more == 12 steps straight, bitwise."""
    out = tmp_path / 'b'
    p = python('byol.py', data64, *E2E, '--output-dir', out, '--max-steps', '6')
    assert '--max-steps 6 reached' in p.stdout
    assert (ckpt(out)['epoch'], ckpt(out)['iter']) == (1, 4)  # 4 batches = 2 steps into epoch 1
    p = python('byol.py', data64, *E2E, '--output-dir', out, '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'iteration 4' in p.stdout
    a, b = ckpt(straight), ckpt(out)
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for k, s in a['optimizer']['state'].items():
        assert torch.equal(s['momentum_buffer'], b['optimizer']['state'][k]['momentum_buffer'])
    strip = ('img_s', 'data_time', 'peak_mem_mb')
    rec = [{k: v for k, v in r.items() if k not in strip} for r in records(straight)]
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(out)] == rec  # tau, LR, loss too


def test_resume_refuses_other_accumulation(data64, straight, tmp_path):
    import byol
    with pytest.raises(SystemExit, match="differ from the checkpoint's run: --accum-steps 2 -> 1;"):
        byol.main([str(data64), *TINY, '--accum-steps', '1', '--resume', str(straight / 'checkpoint_last.pth'),
                   '--output-dir', str(tmp_path)])


def test_torchrun_two_processes(data64, tmp_path):
    """2 gloo processes with accumulation (DDP no_sync): both ranks end with the same online and target
    networks; rank 0 alone writes the log."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport byol\n'
        f'core = byol.main(sys.argv[1:])\n'
        f'torch.save(dict(core.named_parameters()), os.path.join({str(tmp_path)!r}, "params_%s.pt" % os.environ["RANK"]))\n')
    out = tmp_path / 'out'
    p = torchrun(2, driver, data64, *TINY, '--batch-size', '16', '--accum-steps', '2', '--epochs', '2',
                 '--output-dir', out)
    assert 'world size 2' in p.stdout and '(2 x 16, 8 per process and view)' in p.stdout
    p0, p1 = torch.load(tmp_path / 'params_0.pt'), torch.load(tmp_path / 'params_1.pt')
    assert any(k.startswith('target.') for k in p0)
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    c = ckpt(out)
    assert c['epoch'] == 2 and len(c['rng']) == 2
    assert len(records(out)) == 4  # 64 images / 16 = 4 batches = 2 steps per epoch; one writer


def test_demo_short_variant_and_knn_eval(tmp_path):
    """`python byol.py` on the shipped sample, shortened; eval/knn.py takes its checkpoint."""
    p = python('byol.py', '--epochs', '1', '--width', '8', '--knn-every', '1', '--output-dir', tmp_path)
    assert 'effective LR' in p.stdout and 'blur off' in p.stdout
    line = [l for l in p.stdout.splitlines() if l.startswith('weighted kNN top-1')][0]
    trained, rand = float(line.split()[5]), float(line.split()[8])
    assert 10 < rand < 60 and 10 < trained < 60  # 10 classes: chance is 10
    tr = records(tmp_path)
    assert len(tr) == 2 and 0 < tr[-1]['emb_std'] <= 1  # 19 steps, logged every 10 and at the end
    p = python('eval/knn.py', '--pretrained', tmp_path / 'checkpoint_last.pth', 'data/cifar10_sample',
               '--workers', '0', '--k', '200', '--device', 'cpu')
    res = json.load(open(tmp_path / 'checkpoint_last.pth.knn.json'))
    assert res['protocol']['width'] == 8 and res['results']['200']['top1'] == pytest.approx(trained, abs=0.01)


def test_defaults_are_the_oss_recipe():
    a = parse_args(['/data'])
    assert (a.arch, a.batch_size, a.lr, a.wd, a.momentum, a.warmup_epochs, a.epochs, a.tau, a.hidden_dim,
            a.dim, a.accum_steps, a.crop_size, a.blur, a.sync_bn) == \
        ('resnet50', 256, 0.2, 1.5e-6, 0.9, 2, 200, 0.996, 4096, 256, 1, 224, None, None)
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.cifar_stem and demo.crop_size == 32
    assert parse_args(['--epochs', '3']).epochs == 3 and parse_args(['--no-blur']).blur is False
