"""dino.py: the loss, centre and schedules by hand, the head, the parameter groups, clipping, the frozen
last layer, the multi-crop recipe; end to end: 2-process torchrun (the centre of the global batch on
both ranks), bitwise resume, the teacher's backbone file, one-line refusals."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dino
from common import augment, batch_aug
from common.vit import VisionTransformer
from conftest import REPO, make_subset, refused, stop_and_resume, torchrun

# tiny end-to-end run: ViT-Tiny, patch 8 at 32 px (2x2 patches for the 16-px locals), a 64-d head
TINY = ['--arch', 'vit_tiny', '--patch-size', '8', '--crop-size', '32', '--local-crop-size', '16',
        '--local-crops-number', '2', '--out-dim', '64', '--batch-size', '16', '--warmup-epochs', '1',
        '--workers', '0', '--print-freq', '1', '--seed', '0']


def tiny_vit(drop_path_rate=0.):
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                             drop_path_rate=drop_path_rate, init='dino')


def tiny_dino(out_dim=32, n_crops=4, **kw):
    return dino.DINO(lambda student: tiny_vit(0.1 if student else 0.), out_dim, n_crops, **kw)


def crops(b=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(b, 3, 8, 8, generator=g) for _ in range(n_local)]


# ---------------------------------------------------------------- loss and centre


def test_loss_by_hand():
    """3 crops (2 global + 1 local), batch 2, K 3: the mean over the 4 pairs of different views of
    -sum q log p with the OLD centre; then c <- 0.9 c + 0.1 mean(t)."""
    torch.manual_seed(0)
    b, k, tt, ts = 2, 3, 0.05, 0.1
    s, t = torch.randn(3 * b, k, dtype=torch.float64), torch.randn(2 * b, k, dtype=torch.float64)
    loss_fn = dino.DINOLoss(k, 3).double()
    c0 = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    loss_fn.center.copy_(c0)
    loss = loss_fn(s, t, tt)
    terms = []
    for j in range(2):
        for v in range(3):
            if v == j:
                continue
            for i in range(b):
                e = torch.exp((t[j * b + i] - c0[0]) / tt)
                q = e / e.sum()
                logp = s[v * b + i] / ts - torch.log(torch.exp(s[v * b + i] / ts).sum())
                terms.append((v, j, -(q * logp).sum()))
    assert len(terms) == 4 * b
    want = sum(x for *_, x in terms) / len(terms)
    assert torch.allclose(loss, want, rtol=0, atol=1e-12)
    assert torch.allclose(loss_fn.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True), rtol=0, atol=1e-15)


def test_loss_gets_no_gradient_through_teacher():
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    dino.DINOLoss(5, 4)(s, t, 0.04).backward()
    assert t.grad is None and s.grad is not None


def test_centering_momentum_by_hand():
    loss_fn = dino.DINOLoss(2, 2)
    t1 = torch.tensor([[1., 2.], [3., 4.]])
    t2 = torch.tensor([[0., 0.], [2., -2.]])
    loss_fn.update_center(t1)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.2, 0.3]]))
    loss_fn.update_center(t2)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 * 0.2 + 0.1 * 1., 0.9 * 0.3 + 0.1 * -1.]]))


# ---------------------------------------------------------------- schedules


def test_teacher_temperature_schedule():
    at = dino.teacher_temp_at
    assert at(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert at(15, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert at(29, 0.04, 0.07, 30) == pytest.approx(0.07)  # linspace: reached at the warm-up's last epoch
    assert at(30, 0.04, 0.07, 30) == 0.07 and at(99, 0.04, 0.07, 30) == 0.07
    assert at(0, 0.04, 0.04, 0) == 0.04  # the code defaults: constant


def test_cosine_schedules_by_hand():
    epochs, iters = 3, 4
    n = epochs * iters
    wd = dino.cosine_schedule(0.04, 0.4, epochs, iters)
    assert len(wd) == n
    for i in range(n):
        assert wd[i] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / n)))
    m = dino.cosine_schedule(0.996, 1, epochs, iters)
    assert m[0] == 0.996 and m[-1] < 1 and np.all(np.diff(m) > 0)
    assert m[6] == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * 6 / n)) / 2)
    lr = dino.cosine_schedule(1e-3, 1e-6, epochs, iters, warmup_epochs=1)
    assert list(lr[:4]) == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3])  # linspace over the 4 warm-up steps
    for i in range(n - 4):
        assert lr[4 + i] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * i / (n - 4))))
    assert list(dino.cosine_schedule(1e-3, 0, 2, 2, warmup_epochs=2)) == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    with pytest.raises(ValueError, match='longer than the run'):
        dino.cosine_schedule(1e-3, 0, 2, 4, warmup_epochs=3)


# ---------------------------------------------------------------- model pieces


def test_head_weight_norm_and_shapes():
    torch.manual_seed(0)
    head = dino.DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    assert [type(m).__name__ for m in head.mlp] == ['Linear', 'GELU', 'Linear', 'GELU', 'Linear']
    assert head.mlp[0].weight.shape == (64, 48) and head.mlp[4].weight.shape == (16, 64)
    ll = head.last_layer
    assert ll.weight_v.shape == (100, 16) and ll.weight_g.shape == (100, 1) and not ll.weight_g.requires_grad
    assert torch.allclose(ll.weight.norm(dim=1), torch.ones(100))  # unit rows: a cosine layer
    ref = torch.nn.Linear(16, 100, bias=False)
    ref.weight.data.copy_(ll.weight_v.detach())
    ref = torch.nn.utils.weight_norm(ref)  # the reference's reparametrisation
    ref.weight_g.data.fill_(1)
    x = torch.randn(5, 48)
    z = F.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), ref(z), atol=1e-6)
    assert dino.DINOHead(48, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    bn = dino.DINOHead(48, 10, use_bn=True, hidden_dim=32)
    assert [type(m).__name__ for m in bn.mlp].count('BatchNorm1d') == 2


def test_multicrop_wrapper_groups_by_resolution():
    calls = []

    class Backbone(torch.nn.Module):
        feat_dim = 3

        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean((2, 3))

    w = dino.MultiCropWrapper(Backbone(), torch.nn.Identity())
    c = crops(b=2, n_local=3)
    out = w(c)
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]  # one pass per resolution
    assert torch.allclose(out, torch.cat([x.mean((2, 3)) for x in c]))  # crop-major rows


def test_teacher_starts_as_student_frozen_without_drop_path():
    torch.manual_seed(0)
    m = tiny_dino()
    for (n, ps), pt in zip(m.student.named_parameters(), m.teacher.parameters()):
        assert torch.equal(ps, pt) and not pt.requires_grad, n
    rates = lambda net: [b.drop_path1.p for b in net.backbone.blocks]
    assert rates(m.student) == pytest.approx([0., 0.1]) and rates(m.teacher) == [0., 0.]
    assert 'loss.center' in m.state_dict() and any(k.startswith('teacher.') for k in m.state_dict())


def test_param_groups_no_decay_for_biases_and_norms():
    m = tiny_dino()
    groups = dino.param_groups(m.student)
    names = {id(p): n for n, p in m.student.named_parameters()}
    reg = {names[id(p)] for p in groups[0]['params']}
    noreg = {names[id(p)] for p in groups[1]['params']}
    assert groups[1]['weight_decay'] == 0. and 'weight_decay' not in groups[0]
    assert {'backbone.cls_token', 'backbone.pos_embed', 'backbone.patch_embed.proj.weight',
            'backbone.blocks.0.attn.qkv.weight', 'head.mlp.0.weight', 'head.last_layer.weight_v'} <= reg
    assert {'backbone.patch_embed.proj.bias', 'backbone.blocks.0.norm1.weight', 'backbone.norm.bias',
            'head.mlp.4.bias'} <= noreg
    assert all(n.endswith('.bias') or 'norm' in n for n in noreg)
    assert 'head.last_layer.weight_g' not in reg | noreg  # frozen: in no group
    free = tiny_dino(norm_last_layer=False)
    names = {id(p): n for n, p in free.student.named_parameters()}
    assert 'head.last_layer.weight_g' in {names[id(p)] for p in dino.param_groups(free.student)[0]['params']}


def test_clip_gradients_per_tensor():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.ParameterList([a, b])
    a.grad, b.grad = torch.tensor([3., 4.]), torch.tensor([0.6, 0., 0.8])  # norms 5 and 1
    norms = dino.clip_gradients(model, 3.0)
    assert norms.tolist() == pytest.approx([5., 1.])
    assert torch.allclose(a.grad, torch.tensor([3., 4.]) * 3 / (5 + 1e-6))  # clip / (norm + 1e-6)
    assert torch.equal(b.grad, torch.tensor([0.6, 0., 0.8]))  # under the clip: untouched
    assert a.grad.norm().item() == pytest.approx(3.0, abs=1e-5)


def step(m, opt, epoch, c, freeze=1):
    loss = m(c, 0.04)
    opt.zero_grad()
    loss.backward()
    dino.clip_gradients(m.student, 3.0)
    dino.cancel_last_layer_grads(m.student, epoch, freeze)
    opt.step()
    m.update_teacher(0.99)


def test_last_layer_frozen_in_epoch_0():
    torch.manual_seed(0)
    m = tiny_dino()
    opt = torch.optim.AdamW(dino.param_groups(m.student), lr=1e-2)
    before = {n: p.detach().clone() for n, p in m.student.named_parameters()}
    step(m, opt, 0, crops())
    for n, p in m.student.named_parameters():
        if 'last_layer' in n:
            assert torch.equal(p, before[n]), n  # no gradient, no weight decay, no AdamW state
            assert p not in opt.state
        else:
            assert not torch.equal(p, before[n]), n
    v = m.student.head.last_layer.weight_v.detach().clone()
    step(m, opt, 1, crops(seed=1))
    assert not torch.equal(m.student.head.last_layer.weight_v, v)  # epoch 1: trained
    assert torch.equal(m.student.head.last_layer.weight_g, torch.ones(32, 1))  # norm_last_layer: g stays 1


def test_teacher_ema_after_step():
    torch.manual_seed(0)
    m = tiny_dino()
    opt = torch.optim.AdamW(dino.param_groups(m.student), lr=1e-2)
    t0 = [p.detach().clone() for p in m.teacher.parameters()]
    step(m, opt, 1, crops())
    for p0, ps, pt in zip(t0, m.student.parameters(), m.teacher.parameters()):
        assert torch.allclose(pt, 0.99 * p0 + 0.01 * ps, atol=1e-7)


# ---------------------------------------------------------------- multi-crop recipe


def test_multicrop_recipe():
    mc = augment.dino()
    assert isinstance(mc, augment.MultiView) and mc.n_views == 10 and (mc.n_global, mc.n_local) == (2, 8)
    assert mc.sizes == [224] * 2 + [96] * 8 and mc.scales == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8

    def ops(t):
        out = []
        for op in t.transforms:
            if isinstance(op, augment.T.RandomApply):
                out.append((type(op.transforms[0]).__name__, op.p))
            else:
                out.append(type(op).__name__)
        return out
    common = ['RandomResizedCrop', 'RandomHorizontalFlip', ('ColorJitter', 0.8), 'RandomGrayscale']
    tail = ['ToTensor', 'Normalize']
    assert ops(mc.transforms[0]) == common + [('GaussianBlur', 1.0)] + tail
    assert ops(mc.transforms[1]) == common + [('GaussianBlur', 0.1), ('Solarize', 0.2)] + tail
    assert all(ops(t) == common + [('GaussianBlur', 0.5)] + tail for t in mc.transforms[2:])
    crop = mc.transforms[2].transforms[0]
    assert crop.interpolation == augment.T.InterpolationMode.BICUBIC
    jitter = mc.transforms[0].transforms[2].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == \
        ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    small = augment.dino(32, 16, 3, blur=False)
    assert small.sizes == [32, 32, 16, 16, 16]
    assert ops(small.transforms[1]) == common + [('Solarize', 0.2)] + tail  # no blur
    img = Image.open(sorted((REPO / 'data' / 'cifar10_sample' / 'train').glob('*/*'))[0]).convert('RGB')

    def draw(seed):
        random.seed(seed)
        torch.manual_seed(seed)
        return small(img)
    a, b, c = draw(1), draw(1), draw(2)
    assert [tuple(x.shape) for x in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    batched = batch_aug.from_transform(small)  # --device-aug reads it view by view
    assert batched.n_views == 5


# ---------------------------------------------------------------- end to end


def test_torchrun_two_processes_center_is_the_global_batch_mean(data64, tmp_path):
    """2 gloo processes, 2 steps: the centre is the same on both ranks and equals
    0.9 (0.1 mean_1) + 0.1 mean_2 of the teacher outputs of the whole (both ranks') batch."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        f'import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport dino\n'
        f'seen = []\norig = dino.DINOLoss.update_center\n'
        f'def record(self, t):\n    seen.append(t.detach().clone())\n    return orig(self, t)\n'
        f'dino.DINOLoss.update_center = record\n'
        f'core = dino.main(sys.argv[1:])\n'
        f'torch.save(dict(center=core.loss.center, seen=seen), '
        f'os.path.join({str(tmp_path)!r}, "rank_%s.pt" % os.environ["RANK"]))\n')
    out = tmp_path / 'out'
    p = torchrun(2, driver, data64, *TINY, '--epochs', '2', '--max-steps', '2', '--output-dir', out)
    assert 'world size 2' in p.stdout and '(8 per process)' in p.stdout
    r0, r1 = (torch.load(tmp_path / f'rank_{r}.pt') for r in (0, 1))
    assert torch.equal(r0['center'], r1['center'])
    assert len(r0['seen']) == 2 and r0['seen'][0].shape == (16, 64)  # 2 global crops x 8 images
    means = [torch.cat([r0['seen'][i], r1['seen'][i]]).mean(0, keepdim=True) for i in range(2)]
    want = 0.9 * (0.1 * means[0]) + 0.1 * means[1]
    assert torch.allclose(r0['center'], want, atol=1e-6)
    assert not torch.allclose(r0['center'], 0.9 * (0.1 * r0['seen'][0].mean(0)) + 0.1 * r0['seen'][1].mean(0),
                              atol=1e-6)  # not this rank's own mean
    saved = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert torch.equal(saved['model']['loss.center'], r0['center'])


def test_resume_is_bitwise(tmp_path):
    """2 epochs of 2 steps (the last layer frozen in the first): stop after 1, resume == straight,
    bitwise: student, teacher, centre, AdamW state, losses."""
    data = make_subset(tmp_path / 'data', 2)  # 20 images: 2 batches of 8 per epoch
    args = [data, *TINY, '--epochs', '2', '--deterministic', '--batch-size', '8', '--local-crops-number', '1']
    (a, b), (la, lb) = stop_and_resume(dino.main, args, tmp_path, 1)
    assert len(la) == 4 and la == lb
    assert a['model'].keys() == b['model'].keys() and 'loss.center' in a['model']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        for n in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(sa[k][n], sb[k][n]), (k, n)
    assert a['backbone_prefix'] == 'teacher.backbone.'
    bb = torch.load(tmp_path / 'a' / 'backbone.pth', weights_only=True)  # the teacher's backbone, timm names
    assert bb.keys() == {k[len('teacher.backbone.'):] for k in a['model'] if k.startswith('teacher.backbone.')}
    for k, v in bb.items():
        assert torch.equal(v, a['model']['teacher.backbone.' + k])
    assert not torch.equal(a['model']['teacher.backbone.cls_token'], a['model']['student.backbone.cls_token'])


def test_resnet_backbone_trains_with_device_aug(data64, tmp_path):
    """A ResNet student/teacher with SGD, the multi-crop batches made by --device-aug memory."""
    dino.main([str(data64), '--arch', 'resnet10', '--width', '8', '--cifar-stem', *TINY[4:], '--epochs', '2',
               '--max-steps', '1', '--optimizer', 'sgd', '--device-aug', 'memory', '--output-dir', str(tmp_path)])
    sd = torch.load(tmp_path / 'backbone.pth', weights_only=True)
    assert 'conv1.weight' in sd and not any(k.startswith('fc.') for k in sd)


@pytest.mark.parametrize('extra, message', [
    (['--local-crop-size', '20'], '--local-crop-size 20 is not a multiple of the patch size 8'),
    (['--warmup-epochs', '3'], '--warmup-epochs 3 is longer than the run (--epochs 2)'),
    (['--lr', '-1'], "argument --lr: invalid positive float value: '-1'"),
])
def test_bad_input_one_line(data64, tmp_path, extra, message, capsys):
    if extra[0] == '--lr':
        with pytest.raises(SystemExit):
            dino.main([str(data64), *TINY, '--epochs', '2', *extra, '--output-dir', str(tmp_path)])
        assert message in capsys.readouterr().err
        return
    msg = refused(dino.main, [str(data64), *TINY, '--epochs', '2', *extra, '--output-dir', str(tmp_path)])
    assert message in msg


def test_fp16_scaler_unscales_before_clipping():
    """--amp fp16 order (`DN:main_dino.py:333-342`): scale, backward, unscale, clip the true gradients,
    drop the last layer's, step. With a scale of 2^16 the clipped gradients still have norm <= 3."""
    import types

    class Meter:
        def __getattr__(self, name):
            return lambda *a, **k: None

    class FakeRun:
        def train_meter(self, *a):
            return Meter()

        def step_end(self, *a):
            return False

    torch.manual_seed(0)
    m = tiny_dino()
    opt = torch.optim.AdamW(dino.param_groups(m.student))
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 16)
    args = types.SimpleNamespace(warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                                 batch_size=4, arch='vit_tiny', clip_grad=1e-3, freeze_last_layer=1, amp='fp16')
    sched = tuple(np.full(2, v) for v in (1e-3, 0.04, 0.99))
    dino.train_one_epoch([(crops(), None, None)], m, m, opt, scaler, sched, 0, 0, 2, args, torch.device('cpu'),
                         None, FakeRun())
    norms = [p.grad.norm().item() for p in m.student.parameters() if p.grad is not None]
    assert norms and max(norms) <= 1e-3 * (1 + 1e-4)  # clipped after unscaling (else ~2^-16 x 1e-3)
    assert max(norms) > 1e-3 * 0.5  # and not a second time by the scale
    assert m.student.head.last_layer.weight_v.grad is None
