"""eval/lincls.py --bn-head / --protocol mae, MAE's linear probe (methods-modern.md §17.5): its
defaults, the warm-up + per-iteration cosine by hand, the BatchNorm1d(affine=False) head trained in
train mode on the normed cls token with FAIR LARS, end to end on real images, and one-line refusals."""
import argparse
import json
import math

import torch

from common import checkpoint, optim
from common.resnet import build_resnet
from common.vit import VisionTransformer
from conftest import refused
from eval import lincls

CFG = dict(method=None, arch=None, depth=2)


def tiny_vit_file(path):
    torch.manual_seed(0)
    net = VisionTransformer(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3).eval()
    checkpoint.save_backbone(net, path)
    return net


def test_defaults_schedule_and_optimizer():
    args = lincls.vit_protocol(['d', '--pretrained', 'p', '--bn-head'], lincls.parse_args(['d', '--pretrained', 'p',
                                                                                           '--bn-head']), CFG)
    assert (args.protocol, args.bn_head, args.epochs, args.lr, args.batch_size, args.wd, args.warmup_epochs) == \
        ('mae', True, 90, 0.1, 16384, 0.0, 10)
    same = lincls.vit_protocol(['d', '--pretrained', 'p', '--protocol', 'mae'],
                               lincls.parse_args(['d', '--pretrained', 'p', '--protocol', 'mae']), CFG)
    assert same.bn_head and same.warmup_epochs == 10
    # an MAE checkpoint chooses the protocol by itself
    assert checkpoint.vit_method(dict(args=dict(method='mae'))) == 'mae'
    # MAE's lr_sched: base * e / 10 in the warm-up, then a cosine over the remaining 80 epochs, per iteration
    a = argparse.Namespace(warmup_epochs=10, epochs=90)
    assert math.isclose(lincls.lr_of(6.4, 2, 50, 100, a), 6.4 * 2.5 / 10, rel_tol=1e-15)
    assert math.isclose(lincls.lr_of(6.4, 50, 0, 100, a), 6.4 * 0.5 * (1 + math.cos(math.pi * 40 / 80)),
                        rel_tol=1e-15)
    assert lincls.lr_of(6.4, 10, 0, 100, a) == 6.4
    opt, text = lincls.build_optimizer([torch.nn.Parameter(torch.ones(2, 2))], 6.4, args)
    assert isinstance(opt, optim.FairLARS) and 'LARS' in text and opt.defaults['weight_decay'] == 0.0


def test_bn_head_end_to_end(data64, tmp_path):
    """Two epochs on real images: only the head's Linear trains, its BN (no affine) collects batch
    statistics in train mode, the backbone is unchanged, and the result records the protocol."""
    bb = tmp_path / 'backbone.pth'
    net = tiny_vit_file(bb)
    out = tmp_path / 'lin'
    lincls.main([str(data64), '--pretrained', str(bb), '--bn-head', '--num-heads', '3', '--epochs', '2',
                 '--warmup-epochs', '1', '-b', '16', '--lr', '0.5', '--workers', '0', '--output-dir', str(out)])
    res = json.loads((out / 'backbone.pth.lincls.json').read_text())
    p = res['protocol']
    assert p['protocol'].startswith('MAE linear probing') and p['optimizer'].startswith('LARS')
    assert 'BatchNorm1d(affine=False' in p['feature'] and p['trainable'] == 'fc.1.weight, fc.1.bias'
    assert 'warm-up 1 epochs' in p['lr_schedule'] and 0 <= res['top1'] <= 100
    state = torch.load(out / 'lincls_checkpoint.pth', weights_only=True)
    fc = state['fc']
    assert set(fc) == {'0.running_mean', '0.running_var', '0.num_batches_tracked', '1.weight', '1.bias'}
    assert fc['0.num_batches_tracked'] == 2 * (64 // 16) and fc['0.running_mean'].abs().sum() > 0
    # the backbone did not move (lincls checks it too): its cls features are those of the file's weights
    after = torch.load(bb, weights_only=True)
    assert all(torch.equal(after[k], v) for k, v in net.state_dict().items())


def test_refusals_one_line(data64, tmp_path):
    bb = tmp_path / 'backbone.pth'
    tiny_vit_file(bb)
    common = [str(data64), '--pretrained', str(bb), '--num-heads', '3', '--output-dir', str(tmp_path / 'o')]
    assert '--bn-head is the mae protocol' in refused(lincls.main, [*common, '--bn-head', '--protocol', 'dino'])
    assert 'the mae protocol is the normed cls token' in refused(lincls.main, [*common, '--bn-head',
                                                                                '--n-last-blocks', '2'])
    rn = tmp_path / 'rn.pth'
    checkpoint.save_backbone(build_resnet('resnet10', 0, width=8, cifar_stem=True), rn)
    msg = refused(lincls.main, [str(data64), '--pretrained', str(rn), '--bn-head', '--output-dir', str(tmp_path / 'r')])
    assert '--bn-head' in msg and 'ResNet' in msg
