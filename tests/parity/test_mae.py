"""Parity of mae.py with the official facebookresearch/mae code (efb2a80, methods-modern.md §17).

The checkout is $SSL_REFS/facebookresearch__mae (the module is skipped without it). Its
MaskedAutoencoderViT (models_mae.py, a small one: 32 px, patch 8, 2 encoder blocks of 64, 2 decoder
blocks of 32) and lr_sched.adjust_learning_rate run next to mae.py's MAE in float64 for 3 AdamW steps
(betas 0.9/0.95, wd 0.05 with the reference's parameter groups, main_pretrain.py:178-180), from the same
weights, on the same images and with the same mask noise (the reference's torch.rand inside
random_masking returns the noise given to ours). Compared: the loss, the predictions, every gradient,
every parameter and buffer after each step, AdamW's exp_avg / exp_avg_sq / step, the LR, and the
sin-cos tables of both (ours computed in float64 against util/pos_embed.py's float64 numpy table).

Shims, all in this file, for the installed timm 1.0 and numpy 2 (the reference targets timm 0.3.2):
  * timm's Block rejects `qk_scale`: while models_mae.py is imported, timm.models.vision_transformer.Block
    is a subclass that drops qk_scale=None (the default scale (D/h)^-0.5 either way);
  * numpy 2 has no `np.float` (util/pos_embed.py:56): it is set to float while the reference builds;
  * timm's optim_factory.add_weight_decay (main_pretrain.py:179) is timm.optim.param_groups_weight_decay
    in timm >= 0.6 (the same rule: 1-D and .bias without decay; no-decay group first).
"""
import argparse
import importlib
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.vit import VisionTransformer, sincos_pos_embed
from common.optim import warmup_cosine
from mae import MAE, weight_decay_groups

from .refs import checkout, rel

REF = checkout('facebookresearch__mae', 'models_mae.py')

TOL = 1e-9  # float64; differences relative to the tensor's largest magnitude when that exceeds 1
KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
DEC = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def import_reference():
    """models_mae, util.pos_embed and util.lr_sched from the checkout, with the Block shim in place
    during the import (models_mae binds the name then)."""
    import timm.models.vision_transformer as tvt
    original = tvt.Block

    class Block(original):
        def __init__(self, *args, qk_scale=None, **kwargs):
            assert qk_scale is None  # the only value the reference passes
            super().__init__(*args, **kwargs)

    sys.path.insert(0, str(REF))
    tvt.Block = Block
    try:
        mods = [importlib.import_module(m) for m in ('models_mae', 'util.pos_embed', 'util.lr_sched')]
    finally:
        tvt.Block = original
        sys.path.remove(str(REF))
    return mods


MODELS_MAE, POS_EMBED, LR_SCHED = import_reference()


def our_name(name):
    """Reference name -> ours: the encoder's tensors live under encoder.; decoder ones keep their name."""
    return name if name.startswith(('decoder_', 'mask_token')) else 'encoder.' + name


def pair(norm_pix):
    had = hasattr(np, 'float')
    np.float = float  # shim: numpy 2 removed the alias util/pos_embed.py uses
    try:
        torch.manual_seed(0)
        ref = MODELS_MAE.MaskedAutoencoderViT(in_chans=3, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                              norm_pix_loss=norm_pix, **KW, **DEC)
    finally:
        if not had:
            del np.float
    enc = VisionTransformer(**KW, init='mae', pos_embed='sincos_mae')
    ours = MAE(enc, DEC['decoder_embed_dim'], DEC['decoder_depth'], DEC['decoder_num_heads'], 0.75, norm_pix)
    ref, ours = ref.double(), ours.double()
    sd = ref.state_dict()
    assert {our_name(k) for k in sd} == set(ours.state_dict())
    ours.load_state_dict({our_name(k): v for k, v in sd.items()})
    return ref, ours


def compare(norm_pix=True, steps=3, noise_swap=False, one_group=False):
    """3 steps of both; returns the max differences per kind and the number of gradients compared.
    noise_swap / one_group perturb our side (negative controls): two noise values of sample 0 swapped;
    weight decay on every parameter."""
    ref, ours = pair(norm_pix)
    base_lr, wd = 1.5e-4 * 4 / 256 * 100, 0.05  # x100: steps large enough to move the weights visibly
    names = {id(p): our_name(n) for n, p in ref.named_parameters()}
    our_params = dict(ours.named_parameters())
    # main_pretrain.py:178-180, with timm >= 0.6's name of add_weight_decay (shim)
    from timm.optim import param_groups_weight_decay as add_weight_decay
    ropt = torch.optim.AdamW(add_weight_decay(ref, wd), lr=base_lr, betas=(0.9, 0.95))
    groups = [dict(params=list(ours.parameters()), weight_decay=wd)] if one_group else weight_decay_groups(ours, wd)
    oopt = torch.optim.AdamW([g for g in groups if g['params']], lr=base_lr, betas=(0.9, 0.95))
    trainable = [p for p in ref.parameters() if p.requires_grad]
    assert len(trainable) == sum(p.requires_grad for p in ours.parameters())
    sched = argparse.Namespace(lr=base_lr, min_lr=1e-6, warmup_epochs=1, epochs=4)
    gen = torch.Generator().manual_seed(1)
    diff = dict(loss=0., pred=0., grad=0., state=0., opt=0., lr=0.)
    n_grads = 0
    for i in range(steps):
        e = (0.5, 1.25, 2.0)[i]  # one warm-up step, two on the cosine
        lr_ref = LR_SCHED.adjust_learning_rate(ropt, e, sched)
        lr = warmup_cosine(base_lr, e, 1, 4, 1e-6)
        for g in oopt.param_groups:
            g['lr'] = lr
        diff['lr'] = max(diff['lr'], abs(lr - lr_ref))
        imgs = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
        noise = torch.rand(4, 16, generator=gen, dtype=torch.float64)
        mine = noise.clone()
        if noise_swap:  # the most likely kept patch of sample 0 becomes the least likely
            lo, hi = int(noise[0].argmin()), int(noise[0].argmax())
            mine[0, [lo, hi]] = mine[0, [hi, lo]]
        rand = torch.rand
        torch.rand = lambda *a, **k: noise  # the reference's draw in random_masking (models_mae.py:132)
        try:
            loss_ref, pred_ref, mask_ref = ref(imgs, mask_ratio=0.75)
        finally:
            torch.rand = rand
        loss, pred, mask = ours(imgs, mine)
        diff['loss'] = max(diff['loss'], rel(loss_ref.detach(), loss.detach()))
        diff['pred'] = max(diff['pred'], rel(pred_ref.detach(), pred.detach()), rel(mask_ref, mask))
        ropt.zero_grad(), oopt.zero_grad()
        loss_ref.backward()
        loss.backward()
        for p in trainable:
            q = our_params[names[id(p)]]
            assert p.grad is not None and q.grad is not None, names[id(p)]
            diff['grad'] = max(diff['grad'], rel(p.grad, q.grad))
            n_grads += 1
        ropt.step(), oopt.step()
        ours_sd = ours.state_dict()
        for k, v in ref.state_dict().items():  # every parameter and the two frozen tables
            diff['state'] = max(diff['state'], rel(v, ours_sd[our_name(k)]))
        for p in trainable:
            rs, us = ropt.state[p], oopt.state[our_params[names[id(p)]]]
            assert rs.keys() == us.keys() == {'step', 'exp_avg', 'exp_avg_sq'}
            for s in rs:
                diff['opt'] = max(diff['opt'], rel(rs[s], us[s]))
    return diff, n_grads, len(trainable)


@pytest.mark.parametrize('norm_pix', [True, False])
def test_parity_three_steps(norm_pix):
    diff, n, per_step = compare(norm_pix)
    print(f'norm_pix_loss={norm_pix}: max differences over 3 steps {diff}, {n} gradients compared')
    # encoder: 2 blocks x 12, patch conv 2, cls 1, norm 2; decoder: 2 x 12, embed 2, mask token 1, norm 2, pred 2
    assert n == 3 * per_step and per_step == 29 + 31 and n > 0
    assert all(v < TOL for v in diff.values()), diff


def test_tables_match_reference():
    """Our MAE tables (float64) against util/pos_embed.py's numpy float64 ones, and not MoCo v3's."""
    had = hasattr(np, 'float')
    np.float = float
    try:
        for dim, side in ((64, 4), (32, 4), (192, 8)):
            want = torch.from_numpy(POS_EMBED.get_2d_sincos_pos_embed(dim, side, cls_token=True))[None]
            got = sincos_pos_embed(dim, (side, side), dtype=torch.float64, cols_first=True)
            print(f'D={dim} grid {side}: max |table difference| {(got - want).abs().max().item():.2e}')
            assert torch.allclose(got, want, atol=1e-12, rtol=0)
            assert not torch.allclose(sincos_pos_embed(dim, (side, side), dtype=torch.float64), want, atol=1e-3)
    finally:
        if not had:
            del np.float


def test_negative_controls():
    """The comparison can fail: two swapped noise values of one sample change which patches are kept
    (loss, gradients); weight decay on the biases and LayerNorms changes the weights after one step."""
    diff, _, _ = compare(steps=1, noise_swap=True)
    assert diff['loss'] > 1e-4 and diff['grad'] > 1e-4 and diff['pred'] > 1e-4, diff
    diff, _, _ = compare(steps=1, one_group=True)
    assert diff['loss'] < TOL and diff['grad'] < TOL and diff['state'] > 1e-6, diff
