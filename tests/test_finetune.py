"""End-to-end fine-tuning (eval/finetune.py, common/finetune.py; methods-modern.md §17.4): the layer
decay groups by hand (and against MAE's util/lr_decay.py where SSL_REFS is set), the schedule by
hand, MixUp/CutMix labels that sum to one and match the mixed pixels, smoothed soft-target
cross-entropy by hand, bitwise resume of real runs on the shipped sample (a ViT with drop path,
mixing and gradient accumulation; a ResNet), a real 2-process torchrun that equals one process, and
bad input in one line."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, refused, stop_and_resume, torchrun
from common import finetune as ft
from common import optim
from common.checkpoint import load_backbone
from common.resnet import build_resnet
from common.vit import build_vit
from eval import finetune

FAST = ['--workers', '0', '--device', 'cpu', '--print-freq', '1', '--seed', '0', '-b', '16', '--warmup-epochs', '1']
VIT = dict(patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny runs are faster on one thread on the shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def backbones(tmp_path_factory):
    """backbone.pth files: a ResNet-10 of width 8 (CIFAR stem) and a 2-block ViT at 32 px (patch 8)
    with MoCo v3's fixed sin-cos position table."""
    d = tmp_path_factory.mktemp('ft_backbones')
    torch.manual_seed(0)
    r = {k: v for k, v in build_resnet('resnet10', width=8, cifar_stem=True).state_dict().items()
         if not k.startswith('fc.')}
    torch.save(r, d / 'resnet.pth')
    v = build_vit(None, pos_embed='sincos', init='moco', **VIT).state_dict()
    torch.save({k: t for k, t in v.items() if not k.startswith('head.')}, d / 'vit.pth')
    return d


def tiny_classifier(vit=True):
    torch.manual_seed(0)
    backbone = build_vit(None, **{**VIT, 'depth': 3}) if vit else build_resnet('resnet10', width=8, cifar_stem=True)
    return ft.Classifier(backbone, 10)


# ============ layer-wise decay, weight decay, schedule ============

def test_layer_decay_groups_by_hand():
    """ViT with 3 blocks: n = 4; scale 0.5^(4 - id); wd 0 for 1-D tensors, cls_token and pos_embed."""
    model = tiny_classifier()
    table = ft.decay_table(model, 0.05, 0.5)
    want = {'backbone.cls_token': (0, 1 / 16, 0.0), 'backbone.pos_embed': (0, 1 / 16, 0.0),
            'backbone.patch_embed.proj.weight': (0, 1 / 16, 0.05), 'backbone.patch_embed.proj.bias': (0, 1 / 16, 0.0),
            'backbone.blocks.0.attn.qkv.weight': (1, 1 / 8, 0.05), 'backbone.blocks.0.norm1.weight': (1, 1 / 8, 0.0),
            'backbone.blocks.1.mlp.fc2.bias': (2, 1 / 4, 0.0), 'backbone.blocks.2.mlp.fc1.weight': (3, 1 / 2, 0.05),
            'fc_norm.weight': (4, 1.0, 0.0), 'head.weight': (4, 1.0, 0.05), 'head.bias': (4, 1.0, 0.0)}
    assert {k: table[k] for k in want} == want
    assert not any(k.startswith('backbone.norm.') for k in table)  # MAE's norm is replaced by fc_norm
    assert len(table) == sum(p.requires_grad for p in model.parameters()) == 4 + 3 * 12 + 4
    groups = ft.param_groups(model, 0.05, 0.5)
    assert len(groups) == 10  # (decay, no decay) for each of the 5 layer ids
    opt = torch.optim.AdamW(groups, 1.0)
    optim.set_lr(opt, 2.0)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g['params']:
            lid, scale, wd = want.get(names[id(p)], table[names[id(p)]])
            assert (g['layer_id'], g['lr'], g['weight_decay']) == (lid, 2.0 * scale, wd)


def test_resnet_layer_ids_by_stage():
    model = tiny_classifier(vit=False)
    table = ft.decay_table(model, 0.05, 0.5)
    assert table['backbone.conv1.weight'] == (0, 0.5 ** 5, 0.05) and table['backbone.bn1.weight'] == (0, 0.5 ** 5, 0)
    assert table['backbone.layer1.0.conv1.weight'][0] == 1 and table['backbone.layer4.0.bn2.bias'][:2] == (4, 0.5)
    assert table['head.weight'] == (5, 1.0, 0.05) and table['head.bias'] == (5, 1.0, 0.0)


def test_groups_equal_maes_param_groups_lrd():
    """MAE's util/lr_decay.py (SSL_REFS) on a module with MAE's names (our tensors, 'backbone.'
    dropped): the same groups, scales and weight decays."""
    refs = os.environ.get('SSL_REFS')
    if not refs:
        pytest.skip('SSL_REFS is not set')
    spec = importlib.util.spec_from_file_location('mae_lr_decay', Path(refs) / 'facebookresearch__mae/util/lr_decay.py')
    mae = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mae)
    ours = tiny_classifier()
    flat = torch.nn.Module()
    for name in ('cls_token', 'pos_embed', 'patch_embed', 'blocks'):
        setattr(flat, name, getattr(ours.backbone, name))
    flat.fc_norm, flat.head = ours.fc_norm, ours.head
    theirs = mae.param_groups_lrd(flat, 0.05, ['pos_embed', 'cls_token', 'dist_token'], 0.65)
    mine = ft.param_groups(ours, 0.05, 0.65)
    def key(groups, scale):
        return sorted((tuple(sorted(map(id, g['params']))), g[scale], g['weight_decay']) for g in groups)
    assert key(theirs, 'lr_scale') == key(mine, 'lr_mult') and len(mine) == 10


def test_warmup_cosine_by_hand():
    lr = [optim.warmup_cosine(1.0, e, 5, 105, 1e-6) for e in (0, 2.5, 5, 55, 105)]
    assert lr == pytest.approx([0.0, 0.5, 1.0, 1e-6 + (1 - 1e-6) * 0.5, 1e-6])


# ============ mixing and loss ============

def test_mixup_cutmix_labels_sum_to_one_and_match_the_pixels():
    """30 draws on a batch of 4: every soft label sums to one with weights lam on the own class and
    1 - lam on the neighbour's (roll by one); MixUp: the pixels are lam x + (1 - lam) x_prev;
    CutMix: one box holds x_prev and lam = 1 - box area / image area. Both kinds occur."""
    mix = ft.batch_mixing(10, 0.8, 1.0, 0.5)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([3, 1, 4, 7])
    prev = x.roll(1, 0)
    kinds = set()
    for seed in range(30):
        torch.manual_seed(seed)
        xm, t = mix(x.clone(), y)
        assert t.shape == (4, 10) and torch.allclose(t.sum(1), torch.ones(4))
        lam = t[0, 3].item()
        assert torch.allclose(t[torch.arange(4), y], torch.full((4,), lam))
        assert torch.allclose(t[torch.arange(4), y.roll(1)], torch.full((4,), 1 - lam), atol=1e-6)
        pasted = (xm == prev) & (xm != x)  # pixels that came from the neighbour only
        if torch.allclose(xm, lam * x + (1 - lam) * prev, atol=1e-6) and not pasted.all(1).any():
            kinds.add('mixup')
        else:
            box = pasted.all(1)[0]  # HxW, the same box for the whole batch
            rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
            h, w = (rows.max() - rows.min() + 1).item(), (cols.max() - cols.min() + 1).item()
            assert box.sum().item() == h * w and lam == pytest.approx(1 - h * w / 256)
            kinds.add('cutmix')
    assert kinds == {'mixup', 'cutmix'}


def test_smoothed_soft_target_loss_by_hand():
    """F.cross_entropy(label_smoothing=0.1) on mixed targets == timm's smoothed-then-mixed targets
    ((1 - 0.1) y + 0.1 / C for each label, then mixed) with a soft-target cross-entropy."""
    torch.manual_seed(0)
    logits, lam, c = torch.randn(4, 5), 0.7, 5
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 0, 1, 2])
    smooth = lambda lab: F.one_hot(lab, c) * 0.9 + 0.1 / c  # noqa: E731
    timm = lam * smooth(a) + (1 - lam) * smooth(b)
    want = -(timm * logits.log_softmax(1)).sum(1).mean()
    mixed = lam * F.one_hot(a, c).float() + (1 - lam) * F.one_hot(b, c).float()
    assert F.cross_entropy(logits, mixed, label_smoothing=0.1).item() == pytest.approx(want.item(), rel=1e-6)


def test_recipe_defaults_follow_the_backbone():
    p = finetune.get_parser().parse_args(['d', '--pretrained', 'x'])
    assert (p.batch_size, p.wd, p.min_lr, p.warmup_epochs, p.smoothing, p.mixup, p.cutmix, p.reprob) == \
        (1024, 0.05, 1e-6, 5, 0.1, 0.8, 1.0, 0.25)
    vit = finetune.parse_args(['d', '--pretrained', 'x'], dict(vit=True, arch='vit_base', img_size=224))
    large = finetune.parse_args(['d', '--pretrained', 'x'], dict(vit=True, arch='vit_large', img_size=224))
    res = finetune.parse_args(['d', '--pretrained', 'x', '--epochs', '3'], dict(vit=False, cifar_stem=True))
    assert (vit.epochs, vit.blr, vit.layer_decay, vit.drop_path, vit.crop_size) == (100, 5e-4, 0.65, 0.1, 224)
    assert (large.epochs, large.blr, large.layer_decay, large.drop_path) == (50, 1e-3, 0.75, 0.2)
    assert (res.epochs, res.layer_decay, res.drop_path, res.crop_size) == (3, 1.0, 0.0, 32)
    tf = finetune.describe(finetune.train_transform(vit))
    assert 'RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11' in tf and 'RandomErasing(p=0.25' in tf


# ============ real runs ============

def run_args(data, pretrained, *extra):
    return [data, '--pretrained', pretrained, *FAST, *extra]


def test_resume_is_exact_vit(data64, backbones, tmp_path):
    """ViT, drop path 0.1, MixUp/CutMix, RandAugment, erasing, 2 batches per step: 2 epochs of 2
    steps, stopped after 3 steps (mid-epoch) and resumed == straight, bitwise (weights, AdamW state,
    every logged loss). The sin-cos table became a trained parameter; the unused final norm stayed."""
    args = run_args(data64, backbones / 'vit.pth', '--num-heads', '2', '--epochs', '2', '-b', '8', '--accum-iter', '2',
                    '--deterministic')
    (a, b), (la, lb) = stop_and_resume(finetune.main, args, tmp_path, 3)
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][s], sb[k][s]) for k in sa for s in sa[k])
    assert la == lb and len(la) == 16 and all(v > 0 for v in la)  # 8 batches an epoch, one record each
    assert a['epoch'] == 2 and sa[next(iter(sa))]['step'].item() == 8  # 16 batches, 8 optimizer steps
    start = torch.load(backbones / 'vit.pth', weights_only=True)
    assert not torch.equal(a['model']['backbone.pos_embed'], start['pos_embed'])
    assert torch.equal(a['model']['backbone.norm.weight'], start['norm.weight'])
    res = [json.loads((tmp_path / d / 'finetune.json').read_text()) for d in 'ab']
    ha, hb = ([{k: v for k, v in r.items() if k != 'val_time'} for r in x['history']] for x in res)
    assert ha == hb and [r['epoch'] for r in ha] == [0, 1] and res[0]['top1'] == ha[-1]['top1']
    assert res[0]['protocol']['drop_path'] == 0.1 and res[0]['protocol']['layer_decay'] == 0.65
    model, _, _ = load_backbone(tmp_path / 'a' / 'backbone.pth', num_heads=2)  # the fine-tuned ViT, timm names
    assert torch.equal(model.blocks[1].mlp.fc2.weight, a['model']['backbone.blocks.1.mlp.fc2.weight'])


def test_resume_is_exact_resnet_and_the_output_folder(data64, backbones, tmp_path, capsys):
    """ResNet: resumed == straight; the folder is then refused, continued with --resume auto (nothing
    left to do: the same result), refused for other weights under the same name."""
    args = run_args(data64, backbones / 'resnet.pth', '--epochs', '1', '--deterministic', '--layer-decay', '0.5',
                    '--blr', '0.05')
    (a, b), (la, lb) = stop_and_resume(finetune.main, args, tmp_path, 2)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']) and la == lb and len(la) == 4
    assert sorted({g['lr_mult'] for g in a['optimizer']['param_groups']}) == [0.5 ** k for k in range(5, -1, -1)]
    argv = [*map(str, args), '--output-dir', str(tmp_path / 'a')]
    msg = refused(finetune.main, argv)
    assert msg.startswith(f'--output-dir {tmp_path / "a"} already holds a run (a finetune.py checkpoint at epoch 1')
    first = json.loads((tmp_path / 'a' / 'finetune.json').read_text())
    finetune.main([*argv, '--resume', 'auto'])  # all epochs done: the result again
    assert json.loads((tmp_path / 'a' / 'finetune.json').read_text()) == first
    sd = torch.load(backbones / 'resnet.pth', weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, backbones / 'resnet.pth')
    try:
        msg = refused(finetune.main, [*argv, '--resume', 'auto', '--epochs', '2'])
        assert 'holds other weights' in msg and 'than the run fine-tuned' in msg
    finally:
        torch.save(sd, backbones / 'resnet.pth')


def test_torchrun_two_processes_equal_one(data64, backbones, tmp_path):
    """A ViT (no BN) without mixing, drop path or random augmentation ops: 2 processes (gloo) with 8
    images each end where 1 process with 16 does (DDP averages the gradients of the same global
    batch; the val counts are summed over the processes)."""
    args = run_args(data64, backbones / 'vit.pth', '--num-heads', '2', '--epochs', '1', '--mixup', '0', '--cutmix',
                    '0', '--drop-path', '0', '--randaug-n', '0', '--reprob', '0', '--blr', '0.05')
    one, two = tmp_path / 'one', tmp_path / 'two'
    finetune.main([*map(str, args), '--output-dir', str(one)])
    p = torchrun(2, REPO / 'eval' / 'finetune.py', *args, '--output-dir', two, env={'OMP_NUM_THREADS': '1'})
    assert 'world size 2' in p.stdout
    a, b = (torch.load(d / 'checkpoint_last.pth', weights_only=True)['model'] for d in (one, two))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((a[k] - torch.load(backbones / 'vit.pth', weights_only=True)[k[9:]]).abs().max().item()
               for k in a if k.startswith('backbone.blocks')) > 1e-4  # it did train
    ra, rb = (json.loads((d / 'finetune.json').read_text()) for d in (one, two))
    assert ra['protocol']['val_images'] == 20 and rb['protocol']['world_size'] == 2
    assert all(r['top1'] % 5 == 0 for r in (ra, rb)) and abs(ra['top1'] - rb['top1']) <= 5  # 20 images, once


# ============ bad input ============

def test_bad_input_is_refused_in_one_line(data64, backbones, tmp_path):
    r, v = backbones / 'resnet.pth', backbones / 'vit.pth'
    out = ['--output-dir', str(tmp_path / 'x')]
    assert refused(finetune.main, [str(data64), '--pretrained', str(r), '--drop-path', '0.1', *out]).startswith(
        '--drop-path 0.1: stochastic depth is for ViT backbones')
    assert refused(finetune.main, [str(data64), '--pretrained', str(tmp_path / 'none.pth')]).startswith(
        f'--pretrained {tmp_path / "none.pth"}: checkpoint')
    assert refused(finetune.main, [str(data64), '--pretrained', str(r), '--mixup-switch-prob', '2', *out]) == \
        '--mixup-switch-prob 2.0: out of range (see --help)'
    assert refused(finetune.main, [str(data64 / 'train'), '--pretrained', str(r), *FAST, *out]).startswith(
        f'data: {data64 / "train"} needs train/<class>/ and val/<class>/ folders')
    assert refused(finetune.main, [str(data64), '--pretrained', str(v), *FAST, '--num-heads', '2', '-b', '100',
                                   *out]).startswith('data: dataset has 64 images, fewer than one global batch (100)')
    assert 'embed_dim' in refused(finetune.main, [str(data64), '--pretrained', str(v), *FAST, *out])  # 32 / 64 heads
    assert not (tmp_path / 'x' / 'checkpoint_last.pth').exists()
