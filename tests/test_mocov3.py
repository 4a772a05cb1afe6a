"""mocov3.py: the loss, the momentum and LR schedules and FAIR LARS by hand; the momentum update before
the keys; the frozen patch projection; the cross-process keys (real 2-process torchrun); exact resume
on real images; recipes and bad input."""
import json
import math

import pytest
import torch
import torch.nn as nn

from common import optim
from common.optim import warmup_cosine
from common.vit import VisionTransformer
from conftest import REPO, stop_and_resume, torchrun
from mocov3 import MoCoV3, augmentation, build_model, contrastive_loss, main, momentum_at, parse_args

TINY_VIT = ['--arch', 'vit_tiny', '--crop-size', '8', '--moco-dim', '8', '--moco-mlp-dim', '32',
            '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '16', '--warmup-epochs', '1']
TINY_RESNET = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--moco-dim', '8',
               '--moco-mlp-dim', '32', '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '16',
               '--warmup-epochs', '1']


def records(d, kind):
    return [r for r in map(json.loads, open(d / 'log.jsonl')) if r['type'] == kind]


# ============ loss and schedules by hand ============


def test_contrastive_loss_by_hand():
    """q = e1, e2; k = (0.6, 0.8), (0, -1); T = 0.5: logits [[1.2, 0], [1.6, -2]], positives on the
    diagonal, mean cross-entropy times 2T = 1."""
    q = torch.tensor([[2., 0.], [0., 1.]])
    k = torch.tensor([[3., 4.], [0., -3.]])
    e = math.exp
    want = ((-1.2 + math.log(e(1.2) + 1)) + (2 + math.log(e(1.6) + e(-2)))) / 2 * (2 * 0.5)
    assert contrastive_loss(q, k, 0.5).item() == pytest.approx(want, rel=1e-6)
    # T = 0.2: the 2T factor and 1/T inside
    want = ((-3 + math.log(e(3) + 1)) + (5 + math.log(e(4) + e(-5)))) / 2 * 0.4
    assert contrastive_loss(q, k, 0.2).item() == pytest.approx(want, rel=1e-6)


def test_momentum_schedule_by_hand():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(25, 100, 0.99) == pytest.approx(1 - 0.5 * (1 + math.sqrt(0.5)) * 0.01)  # 0.991464
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_at(0.5, 1, 0.996) == pytest.approx(0.998)


def test_lr_schedule_by_hand():
    """Linear from 0 over the warm-up (the first step has LR 0, as the reference), cosine after."""
    assert warmup_cosine(2.0, 0, 10, 100) == 0
    assert warmup_cosine(2.0, 2.5, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(2.0, 10, 10, 100) == pytest.approx(2.0)
    assert warmup_cosine(2.0, 55, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(2.0, 100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(2.0, 0, 0, 4) == pytest.approx(2.0)


def test_fair_lars_by_hand():
    """2-D w = [[3, 4]] (norm 5), g = [[0, 1]], wd 0.2: d = g + 0.2 w = [[0.6, 1.8]], |d| = sqrt(3.6),
    trust = 1e-3 * 5 / |d|; a 1-D parameter takes its raw gradient. mu = 0.9 mu + d; w -= lr mu."""
    w = nn.Parameter(torch.tensor([[3., 4.]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1., 2.], dtype=torch.float64))
    opt = optim.FairLARS([w, b], lr=0.5, weight_decay=0.2, momentum=0.9)
    w0 = w.detach().clone()
    w.grad, b.grad = torch.tensor([[0., 1.]], dtype=torch.float64), torch.tensor([1., -1.], dtype=torch.float64)
    opt.step()
    d = torch.tensor([[0.6, 1.8]], dtype=torch.float64) * (1e-3 * 5 / math.sqrt(3.6))
    assert torch.allclose(w, w0 - 0.5 * d) and torch.allclose(b, torch.tensor([0.5, 2.5], dtype=torch.float64))
    opt.param_groups[0]['lr'] = 0.1  # second step: the LR multiplies the whole buffer (after momentum)
    w1 = w.detach().clone()
    opt.step()
    dn = w.grad + 0.2 * w1
    d2 = dn * (1e-3 * w1.norm() / dn.norm())
    assert torch.allclose(w, w1 - 0.1 * (0.9 * d + d2))
    assert torch.allclose(b, torch.tensor([0.5 - 0.1 * 1.9, 2.5 + 0.1 * 1.9], dtype=torch.float64))


# ============ model ============


def tiny_vit_model(**kw):
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=12,
                                 pos_embed='sincos', init='moco')
    backbone.patch_embed.proj.requires_grad_(False)
    return MoCoV3(backbone, vit=True, dim=8, mlp_dim=32, T=0.2, **kw)


def test_heads_and_layers():
    """ResNet: 2-layer projector and a predictor without last BN; ViT: 3-layer projector and a
    predictor with it; no Linear has a bias; the last BN has no affine parameters."""
    r = build_model(parse_args(['/d', *TINY_RESNET]))
    v = tiny_vit_model()
    kinds = lambda s: [type(m).__name__ for m in s]  # noqa: E731
    assert kinds(r.base_encoder.projector) == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d']
    assert kinds(r.predictor) == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    assert kinds(v.base_encoder.projector) == ['Linear', 'BatchNorm1d', 'ReLU'] * 2 + ['Linear', 'BatchNorm1d']
    assert kinds(v.predictor) == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d']
    for model in (r, v):
        linears = [m for m in [*model.base_encoder.projector, *model.predictor] if isinstance(m, nn.Linear)]
        assert linears and all(m.bias is None for m in linears)
        assert not model.base_encoder.projector[-1].affine and model.predictor[0].weight.shape == (32, 8)
    assert r.base_encoder.projector[0].weight.shape == (32, 64)  # resnet10 width 8: 64 features
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for layer in (r.base_encoder.backbone.layer1,)
               for b in layer)  # zero-init residuals (M3:main_moco.py:185-187)
    vs = build_model(parse_args(['/d', '--arch', 'vit_small', '--crop-size', '16', '--moco-mlp-dim', '8']))
    assert vs.base_encoder.backbone.blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S
    assert not vs.base_encoder.backbone.pos_embed.requires_grad


def test_momentum_update_before_keys_and_no_gradient():
    """The keys come from the momentum encoder *after* this step's EMA (computed here by hand);
    the momentum encoder gets no gradient; the loss is ctr(q1, k2) + ctr(q2, k1)."""
    model = tiny_vit_model()
    with torch.no_grad():  # make the two encoders differ
        for p in model.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = {n: p.detach().clone() for n, p in model.base_encoder.named_parameters()}
    mom = {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    m = 0.75
    loss = model(x1, x2, m)
    for n, p in model.momentum_encoder.named_parameters():
        assert torch.allclose(p, m * mom[n] + (1 - m) * base[n], atol=1e-7), n
    with torch.no_grad():
        k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
        q1, q2 = model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))
    want = contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_augmentation_recipe():
    v1, v2 = augmentation(224, 1, 0.2), augmentation(224, 2, 0.2)
    names = lambda t: [type(o).__name__ if type(o).__name__ != 'RandomApply' else  # noqa: E731
                       type(o.transforms[0]).__name__ + f'@{o.p}' for o in t.transforms]
    assert names(v1) == ['RandomResizedCrop', 'ColorJitter@0.8', 'RandomGrayscale', 'GaussianBlur@1.0',
                         'RandomHorizontalFlip', 'ToTensor', 'Normalize']
    assert names(v2) == ['RandomResizedCrop', 'ColorJitter@0.8', 'RandomGrayscale', 'GaussianBlur@0.1',
                         'Solarize@0.2', 'RandomHorizontalFlip', 'ToTensor', 'Normalize']
    crop, jitter = v1.transforms[0], v1.transforms[1].transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == 'bilinear'
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                                                   (-0.1, 0.1))
    assert 'GaussianBlur@0.1' not in names(augmentation(32, 2, 0.08, blur=False))


def test_recipes_follow_arch_and_bad_input(capsys):
    v = parse_args(['/d'])
    assert (v.arch, v.optimizer, v.lr, v.wd, v.warmup_epochs, v.epochs, v.moco_t, v.crop_min, v.stop_grad_conv1,
            v.batch_size, v.moco_m, v.moco_m_cos, v.moco_dim, v.moco_mlp_dim) == \
        ('vit_small', 'adamw', 1.5e-4, 0.1, 40, 300, 0.2, 0.08, True, 4096, 0.99, True, 256, 4096)
    r = parse_args(['/d', '--arch', 'resnet50'])
    assert (r.optimizer, r.lr, r.wd, r.warmup_epochs, r.epochs, r.moco_t, r.crop_min, r.stop_grad_conv1) == \
        ('lars', 0.6, 1e-6, 10, 100, 1.0, 0.2, False)
    assert parse_args(['/d', '--arch', 'resnet50', '--lr', '0.3', '--epochs', '300']).lr == 0.3  # flags win
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.crop_size == 32 and parse_args(['--epochs', '3']).epochs == 3
    with pytest.raises(SystemExit):
        parse_args(['/d', '--lr', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: argument --lr: invalid positive float value: '0'")
    with pytest.raises(SystemExit, match='--stop-grad-conv1 freezes a ViT'):
        build_model(parse_args(['/d', '--arch', 'resnet18', '--stop-grad-conv1']))


# ============ keys across processes ============


def tiny_mocov3():
    """BN-free backbone, and the projector/predictor BNs replaced by Identity, so that the gradient of
    the global batch does not depend on how it is split over processes."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = MoCoV3(backbone, vit=False, dim=4, mlp_dim=16, T=0.2, feat_dim=8)
    for seq in (model.base_encoder.projector, model.momentum_encoder.projector, model.predictor):
        for i, m in enumerate(seq):
            if isinstance(m, nn.BatchNorm1d):
                seq[i] = nn.Identity()
    with torch.no_grad():
        for p in model.momentum_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = model.double()
    return model, torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randn(8, 3, 6, 6, dtype=torch.float64)


DRIVER = '''
import sys
import torch
import torch.distributed as tdist
sys.path[:0] = [{repo!r}, {tests!r}]
from common import dist
from test_mocov3 import tiny_mocov3

rank, world, _ = dist.init_distributed('cpu')
n = 8 // world
out, get_rank = {{}}, dist.get_rank
for name in ('exact', 'no_offset'):
    model, x1, x2 = tiny_mocov3()
    if name == 'no_offset':  # labels without the N*rank offset: the positive is another rank's key
        dist.get_rank = lambda: 0
    loss = model(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n], 0.9)
    dist.get_rank = get_rank
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for g in grads:  # as DDP: all-reduce and divide by the world size
        tdist.all_reduce(g)
        g /= world
    out[name] = dict(grads=grads, mom=[p.detach().clone() for p in model.momentum_encoder.parameters()])
torch.save(out, {out!r} + '/grads_%d.pt' % rank)
dist.cleanup()
'''


def test_gradient_two_processes_equals_one(tmp_path):
    """Real 2-process gloo run: each rank's queries against the gathered keys of both, labels offset by
    N*rank, gradients averaged as DDP does == one process on the whole batch; without the offset
    they differ."""
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / 'tests'), out=str(tmp_path)))
    torchrun(2, driver)
    model, x1, x2 = tiny_mocov3()
    model(x1, x2, 0.9).backward()
    want = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(want) == 6  # conv weight and bias, 2 projector and 2 predictor weights (no BN left)
    for r in (0, 1):
        got = torch.load(tmp_path / f'grads_{r}.pt')
        assert len(got['exact']['grads']) == len(want)
        for w, a in zip(want, got['exact']['grads']):
            assert torch.allclose(a, w, atol=1e-10, rtol=0)
        for w, a in zip(model.momentum_encoder.parameters(), got['exact']['mom']):
            assert torch.equal(a, w)
        err = max((a - w).abs().max().item() for w, a in zip(want, got['no_offset']['grads']))
        assert err > 1e-4, err
    assert max(w.abs().max().item() for w in want) > 1e-3


# ============ end to end ============


@pytest.fixture(scope='module')
def vit_runs(data64, tmp_path_factory):
    """Tiny ViT (vit_tiny at 8 px, 2x2 patches), 1 epoch of 4 steps: straight, and stopped after 2
    then resumed."""
    tmp = tmp_path_factory.mktemp('vit')
    return tmp, stop_and_resume(main, [data64, *TINY_VIT, '--epochs', '1', '--deterministic'], tmp, 2)


def assert_same_run(a, b, la, lb, steps):
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][s], sb[k][s]) for k in sa for s in sa[k])
    assert la == lb and len(la) == steps


def test_resume_is_exact_vit(vit_runs):
    """Stopped mid-epoch and resumed == straight, bitwise (model, momentum encoder, AdamW state, every
    logged loss) on CPU with --deterministic."""
    tmp, ((a, b), (la, lb)) = vit_runs
    assert_same_run(a, b, la, lb, 4)
    assert a['backbone_prefix'] == 'base_encoder.backbone.' and a['args']['optimizer'] == 'adamw'
    tr = records(tmp / 'a', 'train')
    assert tr[0]['lr'] == 0 and tr[0]['m'] == pytest.approx(0.99) and tr[-1]['m'] > tr[0]['m']
    assert all(0 < r['emb_std'] <= 1 and r['loss'] > 0 for r in tr)


def test_patch_projection_gets_no_gradient_and_stays(data64, vit_runs):
    """--stop-grad-conv1 (default for ViTs): after 4 AdamW steps the patch projection and the sin-cos
    table of the base encoder are unchanged (the momentum encoder's up to the EMA's rounding), the
    blocks did change; backbone.pth has timm names and no head."""
    tmp, ((sd, _), _) = vit_runs
    sd = sd['model']
    args = parse_args([str(data64), *TINY_VIT])
    assert args.stop_grad_conv1 and args.optimizer == 'adamw'
    torch.manual_seed(0)  # main's seed: the same initial model
    init = build_model(args).state_dict()
    assert not build_model(args).base_encoder.backbone.patch_embed.proj.weight.requires_grad
    for enc in ('base_encoder', 'momentum_encoder'):
        for k in ('patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed'):
            name = f'{enc}.backbone.{k}'
            if enc == 'base_encoder':
                assert torch.equal(sd[name], init[name]), name
            else:  # m x + (1 - m) x == x up to rounding (as the reference's EMA)
                assert torch.allclose(sd[name], init[name], rtol=1e-6, atol=1e-7), name
        name = f'{enc}.backbone.blocks.0.attn.qkv.weight'
        assert not torch.equal(sd[name], init[name]), name
    vit = torch.load(tmp / 'a' / 'backbone.pth', weights_only=True)
    assert 'patch_embed.proj.weight' in vit and not any(k.startswith('head') for k in vit)
    VisionTransformer(img_size=8, patch_size=4, embed_dim=192, depth=12, num_heads=3).load_state_dict(vit)


def test_resume_is_exact_resnet(data64, tmp_path):
    """ResNet + FAIR LARS, 2 epochs of 2 steps, stopped after 3 (mid-epoch 1) and resumed == straight."""
    args = [data64, *TINY_RESNET, '--batch-size', '32', '--epochs', '2', '--deterministic']
    (a, b), (la, lb) = stop_and_resume(main, args, tmp_path, 3)
    assert_same_run(a, b, la, lb, 4)
    assert a['args']['optimizer'] == 'lars' and all('mu' in v for v in a['optimizer']['state'].values())


def test_torchrun_two_processes(data64, tmp_path):
    out = tmp_path / 'out'
    p = torchrun(2, 'mocov3.py', data64, *TINY_RESNET, '--epochs', '1', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process and view, 16 keys per query)' in p.stdout
    assert len(records(out, 'train')) == 4 and (out / 'backbone.pth').is_file()
