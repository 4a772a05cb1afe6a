"""Parity of mocov3.py with the official facebookresearch/moco-v3 code (c349e6e, methods-modern.md §15).

The checkout is $SSL_REFS/facebookresearch__moco-v3 (the module is skipped without it). Their model
(moco/builder.py MoCo_ResNet / MoCo_ViT), LARS (moco/optimizer.py), ViT (vits.py
VisionTransformerMoCo) and schedules (adjust_learning_rate / adjust_moco_momentum of main_moco.py)
run next to ours in float64 for 3 steps, from the same weights and on the same inputs (the forward has
no randomness: no dropout, no drop path); loss, every gradient, every parameter and buffer after the
optimizer step and the momentum update, and the optimizer state are compared.

Shims, all in this file: the reference is loaded by file path (its package `moco` would collide with
our moco.py); the two schedule functions are taken out of main_moco.py by its syntax tree (the
script imports tensorboard and its own packages at the top); `Tensor.cuda` is the identity while the
reference runs (its labels are moved to CUDA); a 1-process gloo group stands in for its
DistributedDataParallel (all_gather, get_rank). For its ViT with the installed timm (it targets
timm 0.4.9): `timm.models.layers.helpers` is provided with timm.layers.to_2tuple, and
`VisionTransformer.num_tokens` (renamed num_prefix_tokens) is given back as a property.
"""
import argparse
import ast
import math
import sys
import types
from functools import partial

import pytest
import torch
import torch.nn as nn

from common import optim
from common.optim import warmup_cosine
from common.resnet import build_resnet
from common.vit import VisionTransformer
from mocov3 import MoCoV3, momentum_at

from .refs import checkout, load, one_process_group, rel

REF = checkout('facebookresearch__moco-v3', 'moco/builder.py')

TOL = 1e-9  # float64, on refs.rel


def schedules():
    """adjust_learning_rate and adjust_moco_momentum, compiled from main_moco.py's own source."""
    tree = ast.parse((REF / 'main_moco.py').read_text())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)
           and n.name in ('adjust_learning_rate', 'adjust_moco_momentum')]
    ns = {'math': math}
    exec(compile(ast.Module(body=fns, type_ignores=[]), str(REF / 'main_moco.py'), 'exec'), ns)
    return ns['adjust_learning_rate'], ns['adjust_moco_momentum']


def ref_vits():
    import timm.layers
    import timm.models.vision_transformer as tvt
    helpers = types.ModuleType('timm.models.layers.helpers')
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules.setdefault('timm.models.layers.helpers', helpers)
    if not hasattr(tvt.VisionTransformer, 'num_tokens'):
        tvt.VisionTransformer.num_tokens = property(lambda self: self.num_prefix_tokens)
    return load('m3_vits', REF / 'vits.py')


B = load('m3_builder', REF / 'moco' / 'builder.py')
O = load('m3_optimizer', REF / 'moco' / 'optimizer.py')
ADJUST_LR, ADJUST_M = schedules()


@pytest.fixture(scope='module', autouse=True)
def process_group():
    """The reference gathers keys and reads its rank from torch.distributed: one gloo process."""
    with one_process_group():
        yield


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)


def our_name(name, head):
    """Reference state-dict name -> ours: {base,momentum}_encoder.<head> -> .projector, the rest of an
    encoder -> .backbone, predictor.* unchanged."""
    for enc in ('base_encoder', 'momentum_encoder'):
        if name.startswith(enc + '.'):
            rest = name[len(enc) + 1:]
            part = 'projector' if rest.split('.')[0] == head else 'backbone'
            return f'{enc}.{part}.{rest[len(head) + 1:] if part == "projector" else rest}'
    return name


def resnet_pair():
    import torchvision
    torch.manual_seed(0)
    ref = B.MoCo_ResNet(partial(torchvision.models.resnet18, zero_init_residual=True), 16, 32, 1.0)
    ours = MoCoV3(build_resnet('resnet18', 0, 64, False, init='fan_out', zero_init_residual=True), vit=False,
                  dim=16, mlp_dim=32, T=1.0)
    return ref.double(), ours.double(), 'fc', 32


def vit_pair():
    V = ref_vits()
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=12)
    ref = B.MoCo_ViT(partial(V.VisionTransformerMoCo, stop_grad_conv1=True, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw), 16, 32, 0.2)
    backbone = VisionTransformer(**kw, pos_embed='sincos', init='moco')
    backbone.patch_embed.proj.requires_grad_(False)
    ours = MoCoV3(backbone, vit=True, dim=16, mlp_dim=32, T=0.2)
    return ref.double(), ours.double(), 'head', 16


def compare(pair, optimizer, steps=3, our_t=None, skip_momentum=False):
    """Runs both for `steps` iterations; returns the max relative differences per kind (rel) and the
    number of gradients compared. our_t / skip_momentum perturb our side (negative controls)."""
    ref, ours, head, size = pair
    ours.load_state_dict({our_name(k, head): v for k, v in ref.state_dict().items()})  # strict: every key
    if our_t is not None:
        ours.T = our_t
    names = {id(p): our_name(n, head) for n, p in ref.named_parameters()}
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    our_params = dict(ours.named_parameters())
    assert len(ref_params) == sum(p.requires_grad for p in ours.parameters())
    base_lr, wd = (0.6 * 4 / 256, 1e-6) if optimizer == 'lars' else (1.5e-4 * 4 / 256, 0.1)
    if optimizer == 'lars':
        ropt = O.LARS(ref.parameters(), base_lr, weight_decay=wd, momentum=0.9)
        oopt = optim.FairLARS([p for p in ours.parameters() if p.requires_grad], base_lr, weight_decay=wd, momentum=0.9)
    else:
        ropt = torch.optim.AdamW(ref.parameters(), base_lr, weight_decay=wd)
        oopt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], base_lr, weight_decay=wd)
    sched = argparse.Namespace(lr=base_lr, warmup_epochs=2, epochs=4, moco_m=0.99)
    gen = torch.Generator().manual_seed(1)
    diff = dict(loss=0., grad=0., state=0., opt=0., lr=0.)
    n_grads = 0
    ref.train(), ours.train()
    for i in range(steps):
        e = 1 + i / steps  # in the warm-up: a non-zero LR that changes every step
        lr_ref, m_ref = ADJUST_LR(ropt, e, sched), ADJUST_M(e, sched)
        lr, m = warmup_cosine(base_lr, e, 2, 4), momentum_at(e, 4, 0.99)
        optim.set_lr(oopt, lr)
        diff['lr'] = max(diff['lr'], abs(lr - lr_ref), abs(m - m_ref))
        x1, x2 = (torch.randn(4, 3, size, size, generator=gen, dtype=torch.float64) for _ in range(2))
        loss_ref = ref(x1, x2, m_ref)
        loss = ours(x1, x2, 1.0 if skip_momentum else m)
        diff['loss'] = max(diff['loss'], rel(loss_ref.detach(), loss.detach()))
        ropt.zero_grad(), oopt.zero_grad()
        loss_ref.backward()
        loss.backward()
        for p in ref_params:
            q = our_params[names[id(p)]]
            assert p.grad is not None and q.grad is not None, names[id(p)]
            diff['grad'] = max(diff['grad'], rel(p.grad, q.grad))
            n_grads += 1
        assert all(p.grad is None for p in ref.parameters() if not p.requires_grad)
        ropt.step(), oopt.step()
        ours_sd = ours.state_dict()
        for k, v in ref.state_dict().items():  # parameters (both encoders, predictor) and BN buffers
            diff['state'] = max(diff['state'], rel(v, ours_sd[our_name(k, head)]))
        for p in ref_params:
            rs, us = ropt.state[p], oopt.state[our_params[names[id(p)]]]
            assert rs.keys() == us.keys()
            for s in rs:
                diff['opt'] = max(diff['opt'], rel(rs[s], us[s]))
    return diff, n_grads


@pytest.mark.parametrize('kind', ['resnet', 'vit'])
def test_parity_three_steps(kind):
    pair = resnet_pair() if kind == 'resnet' else vit_pair()
    diff, n = compare(pair, 'lars' if kind == 'resnet' else 'adamw')
    print(f'{kind}: max relative differences over 3 steps {diff}, {n} gradients compared')
    assert n == 3 * len([p for p in pair[0].parameters() if p.requires_grad]) and n > 0
    assert all(v < TOL for v in diff.values()), diff


@pytest.mark.parametrize('kind', ['resnet', 'vit'])
def test_negative_controls(kind):
    """The comparison can fail: a temperature 1% off changes the loss, a skipped momentum update
    changes the momentum encoder."""
    make = resnet_pair if kind == 'resnet' else vit_pair
    opt = 'lars' if kind == 'resnet' else 'adamw'
    t = 1.0 if kind == 'resnet' else 0.2
    diff, _ = compare(make(), opt, steps=1, our_t=t * 1.01)
    assert diff['loss'] > 1e-4 and diff['grad'] > TOL, diff
    diff, _ = compare(make(), opt, steps=2, skip_momentum=True)  # step 1: the encoders are equal
    assert diff['state'] > 1e-6, diff
