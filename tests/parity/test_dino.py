"""Parity of dino.py with facebookresearch/dino (commit 7c446df, methods-modern.md §16) in float64.

The reference is imported from $SSL_REFS/facebookresearch__dino (skipped without it). Both sides get
the same weights (the reference's student loads ours by name: the ViT and the DINOHead have the same
state-dict keys), the same multi-crop batches (2 global 16-px crops + 2 local 8-px crops, as tensors)
and the same drop-path draws (torch.manual_seed before each step; both draw torch.rand(B, 1, 1) per
residual branch in the same order). Three steps over an epoch boundary (2 iterations per epoch), so
the last layer is frozen in steps 1-2 and trained in step 3, and the teacher temperature warms up
(0.04 in epoch 0, 0.07 in epoch 1). Our side runs dino.train_one_epoch itself (one batch per call)
with a stand-in for common.run.Run; the reference side is the body of its train_one_epoch
(`DN:main_dino.py:301-350`) with its DINOLoss, clip_gradients, cancel_gradients_last_layer,
get_params_groups and cosine_scheduler. Compared after every step: the loss, every student gradient
(after clipping and the last-layer cancel), every student parameter after AdamW, every teacher
parameter after the EMA, the centre, and the AdamW moments.

Shims: none in the reference's code. DINOLoss.update_center calls torch.distributed, so a 1-process
gloo group is initialised; the reference's modules are built on the CPU (its main moves them to CUDA)
and cast to float64; its `utils` and `vision_transformer` modules are imported under their own names
and removed from sys.modules afterwards.
"""
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import dino  # noqa: E402
from common.vit import VisionTransformer  # noqa: E402

from .refs import checkout, import_isolated, one_process_group  # noqa: E402

REF = checkout('facebookresearch__dino', 'main_dino.py')

B, OUT, EPOCHS, ITERS = 4, 32, 2, 2
TOL = 1e-10


@pytest.fixture(scope='module')
def ref():
    """The reference's main_dino, utils and vision_transformer modules, and a 1-process gloo group."""
    main, utils, vits = import_isolated(REF, ('main_dino', 'utils', 'vision_transformer'))
    with one_process_group():
        yield types.SimpleNamespace(main=main, utils=utils, vits=vits)


def our_vit(student):
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=3,
                             drop_path_rate=0.1 if student else 0., init='dino')


def ref_vit(ref, student):
    return ref.vits.VisionTransformer(img_size=[16], patch_size=4, embed_dim=48, depth=3, num_heads=3, mlp_ratio=4,
                                      qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                      drop_path_rate=0.1 if student else 0.)


def batches():
    g = torch.Generator().manual_seed(123)
    return [[torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)] +
            [torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)] for _ in range(3)]


ARGS = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2, batch_size=B,
            arch='vit_tiny', clip_grad=3.0, freeze_last_layer=1, amp='off')
LR, MIN_LR, WD, WD_END, MOM = 1e-3, 1e-6, 0.04, 0.4, 0.9


class Meter:
    def __init__(self, log):
        self.log = log

    def data_ready(self):
        pass

    def step(self, it, lr, **scalars):
        self.log.append(scalars)

    def epoch_end(self):
        pass


class FakeRun:
    """The part of common.run.Run that train_one_epoch calls."""

    def __init__(self):
        self.log = []

    def train_meter(self, epoch, iters, batch):
        return Meter(self.log)

    def step_end(self, step, epoch, it, iters):
        return False


def run_ours(init, data):
    torch.manual_seed(0)
    core = dino.DINO(our_vit, OUT, 4, 2).double()
    core.student.load_state_dict(init)
    core.teacher.load_state_dict(init)
    opt = torch.optim.AdamW(dino.param_groups(core.student))
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    schedules = (dino.cosine_schedule(LR, MIN_LR, EPOCHS, ITERS), dino.cosine_schedule(WD, WD_END, EPOCHS, ITERS),
                 dino.cosine_schedule(MOM, 1, EPOCHS, ITERS))
    args, run, out = types.SimpleNamespace(**ARGS), FakeRun(), []
    for step, images in enumerate(data):
        epoch, it = divmod(step, ITERS)
        torch.manual_seed(1000 + step)  # the drop-path draws
        dino.train_one_epoch([(images, None, None)], core, core, opt, scaler, schedules, epoch, it, ITERS, args,
                             torch.device('cpu'), None, run)
        out.append(snapshot(run.log[-1]['loss'], core.student, core.teacher, core.loss.center, opt))
    return out


def run_ref(ref, init, data, seed_offset=0, freeze=1):
    """The body of the reference's train_one_epoch (DN:main_dino.py:301-350), fp32 scaler path off."""
    torch.manual_seed(0)
    student = ref.utils.MultiCropWrapper(ref_vit(ref, True), ref.vits.DINOHead(48, OUT)).double()
    teacher = ref.utils.MultiCropWrapper(ref_vit(ref, False), ref.vits.DINOHead(48, OUT)).double()
    student.load_state_dict(init)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = ref.main.DINOLoss(OUT, 4, ARGS['warmup_teacher_temp'], ARGS['teacher_temp'],
                                ARGS['warmup_teacher_temp_epochs'], EPOCHS).double()
    opt = torch.optim.AdamW(ref.utils.get_params_groups(student))
    lr_s = ref.utils.cosine_scheduler(LR, MIN_LR, EPOCHS, ITERS)
    wd_s = ref.utils.cosine_scheduler(WD, WD_END, EPOCHS, ITERS)
    m_s = ref.utils.cosine_scheduler(MOM, 1, EPOCHS, ITERS)
    out = []
    for it, images in enumerate(data):
        epoch = it // ITERS
        for i, g in enumerate(opt.param_groups):
            g['lr'] = lr_s[it]
            if i == 0:
                g['weight_decay'] = wd_s[it]
        torch.manual_seed(1000 + it + seed_offset)
        teacher_output = teacher(images[:2])
        student_output = student(images)
        loss = loss_fn(student_output, teacher_output, epoch)
        opt.zero_grad()
        loss.backward()
        ref.utils.clip_gradients(student, ARGS['clip_grad'])
        ref.utils.cancel_gradients_last_layer(epoch, student, freeze)
        opt.step()
        with torch.no_grad():
            m = m_s[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        out.append(snapshot(loss, student, teacher, loss_fn.center, opt))
    return out


def snapshot(loss, student, teacher, center, opt):
    names = {id(p): n for n, p in student.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in student.named_parameters()}
    return dict(loss=float(loss), grads=grads,
                student={n: p.detach().clone() for n, p in student.named_parameters()},
                teacher={n: p.detach().clone() for n, p in teacher.named_parameters()}, center=center.clone(),
                adam={names[id(p)]: (s['exp_avg'].clone(), s['exp_avg_sq'].clone()) for p, s in opt.state.items()})


def max_diffs(a, b):
    """Per category, the max |a - b| over the three steps; raises on a structural mismatch."""
    d = dict(loss=0., grads=0., student=0., teacher=0., center=0., adam=0.)
    counted = 0
    for sa, sb in zip(a, b):
        d['loss'] = max(d['loss'], abs(sa['loss'] - sb['loss']))
        assert sa['grads'].keys() == sb['grads'].keys()
        for n in sa['grads']:
            ga, gb = sa['grads'][n], sb['grads'][n]
            assert (ga is None) == (gb is None), n
            if ga is not None:
                d['grads'] = max(d['grads'], (ga - gb).abs().max().item())
                counted += 1
        for k in ('student', 'teacher'):
            assert sa[k].keys() == sb[k].keys()
            d[k] = max(d[k], max((sa[k][n] - sb[k][n]).abs().max().item() for n in sa[k]))
        d['center'] = max(d['center'], (sa['center'] - sb['center']).abs().max().item())
        assert sa['adam'].keys() == sb['adam'].keys()
        for n in sa['adam']:
            d['adam'] = max(d['adam'], *((x - y).abs().max().item() for x, y in zip(sa['adam'][n], sb['adam'][n])))
    return d, counted


@pytest.fixture(scope='module')
def runs(ref):
    torch.manual_seed(0)
    init = dino.DINO(our_vit, OUT, 4, 2).double().student.state_dict()
    data = batches()
    return ref, init, data, run_ours(init, data), run_ref(ref, init, data)


def test_schedules_match_reference(ref):
    for args in [(5e-4, 1e-6, 7, 3, 2), (0.04, 0.4, 5, 4, 0), (0.996, 1, 3, 5, 0), (1.0, 0.0, 2, 3, 2)]:
        ours = dino.cosine_schedule(*args[:4], warmup_epochs=args[4])
        theirs = ref.utils.cosine_scheduler(*args[:4], warmup_epochs=args[4])
        assert np.array_equal(ours, theirs), args
    loss = ref.main.DINOLoss(8, 10, 0.04, 0.07, 30, 100)
    assert [dino.teacher_temp_at(e, 0.04, 0.07, 30) for e in range(100)] == list(loss.teacher_temp_schedule)


def test_three_steps_match_reference(runs):
    ref, init, data, ours, theirs = runs
    d, counted = max_diffs(ours, theirs)
    print('\nmax |ours - reference| over 3 float64 steps: ' + ', '.join(f'{k} {v:.2e}' for k, v in d.items()) +
          f'; {counted} gradients compared')
    assert all(v < TOL for v in d.values()), d
    n_params = sum(1 for _ in ours[0]['grads'])
    # steps 1-2: every student tensor but last_layer.weight_v (frozen g has none); step 3: all with grads
    assert counted == (n_params - 2) * 2 + (n_params - 1), (counted, n_params)
    v = 'head.last_layer.weight_v'
    assert ours[0]['grads'][v] is None and ours[2]['grads'][v] is not None
    assert torch.equal(ours[1]['student']['head.last_layer.weight_v'], init['head.last_layer.weight_v'])
    assert not torch.equal(ours[2]['student']['head.last_layer.weight_v'], init['head.last_layer.weight_v'])
    assert ours[0]['center'].abs().sum() > 0 and len({round(s['loss'], 6) for s in ours}) == 3


def test_negative_controls_are_detected(runs):
    """Other drop-path draws, or no frozen last layer, on the reference side: the comparison fails."""
    ref, init, data, ours, _ = runs
    d, _ = max_diffs(ours, run_ref(ref, init, data, seed_offset=7))
    assert d['loss'] > 1e-6 and d['grads'] > 1e-6, d
    with pytest.raises(AssertionError):
        max_diffs(ours, run_ref(ref, init, data, freeze=0))  # last-layer grads present on one side only
