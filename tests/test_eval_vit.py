"""ViT backbones in the evaluation programs (issue 15, "Evaluation"): loading every layout off the
weights (selfsup training checkpoint, backbone.pth, facebookresearch/dino and moco-v3 releases), the
features eval/lincls.py trains on (methods-modern.md §15.6 normed cls token, §16.7 DINO's last
blocks) against a hand computation, DINO's kNN vote (§16.6) by hand, eval/knn.py, eval/lincls.py and
eval/extract.py end to end on the shipped sample, and one-line refusals."""
import argparse
import json

import numpy as np
import pytest
import torch

from common import checkpoint
from common.features import load_eval_backbone, vit_eval_transform
from common.knn import knn_accuracy, knn_predict
from common.vit import VisionTransformer
from conftest import refused
from eval import extract, knn, lincls, semi

HEADS = 3  # a 48-d ViT has no standard size, so its heads come from args or --num-heads


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=HEADS).eval()


@pytest.fixture(scope='module')
def vit_files(tmp_path_factory):
    """The tiny ViT in four layouts; DINO's student and MoCo v3's momentum encoder hold other weights,
    so that taking the wrong one shows."""
    d = tmp_path_factory.mktemp('vit')
    net, other = tiny_vit(0), tiny_vit(1)
    sd, sd_other = net.state_dict(), other.state_dict()
    head = {'head.mlp.0.weight': torch.randn(8, 48), 'head.last_layer.weight_g': torch.ones(16, 1)}
    # the keys common.checkpoint.training_state writes (dino.py-like: the teacher's backbone evaluated)
    train = dict(model={**{f'teacher.backbone.{k}': v for k, v in sd.items()},
                        **{f'teacher.{k}': v for k, v in head.items()},
                        **{f'student.backbone.{k}': v for k, v in sd_other.items()}},
                 backbone_prefix='teacher.backbone.', optimizer={}, scaler={}, epoch=1, iter=0,
                 args=dict(method='dino', arch='vit_tiny', num_heads=HEADS, crop_size=32), git='test',
                 rng=[checkpoint.rng_state()])
    dino = dict(teacher={**{f'backbone.{k}': v for k, v in sd.items()}, **head},
                student={**{f'module.backbone.{k}': v for k, v in sd_other.items()},
                         **{f'module.{k}': v for k, v in head.items()}}, epoch=1)
    mocov3 = dict(state_dict={**{f'module.base_encoder.{k}': v for k, v in sd.items()},
                              'module.base_encoder.head.0.weight': torch.randn(64, 48),
                              **{f'module.momentum_encoder.{k}': v for k, v in sd_other.items()},
                              'module.predictor.0.weight': torch.randn(64, 16)}, arch='vit_small', epoch=1)
    (d / 'run').mkdir()
    (d / 'plain').mkdir()
    paths = dict(train=d / 'run' / 'checkpoint_last.pth', backbone=d / 'plain' / 'backbone.pth', dino=d / 'dino.pth',
                 mocov3=d / 'mocov3.pth', run_backbone=d / 'run' / 'backbone.pth')
    torch.save(train, paths['train'])
    checkpoint.save_backbone(net, paths['backbone'])
    checkpoint.save_backbone(net, paths['run_backbone'])  # as a training run leaves it
    torch.save(dino, paths['dino'])
    torch.save(mocov3, paths['mocov3'])
    return net, paths


def test_every_layout_loads_the_same_backbone(vit_files):
    net, paths = vit_files
    ref = net.state_dict()
    assert torch.load(paths['backbone'], weights_only=True).keys() == ref.keys()  # timm names, no head
    x = torch.randn(2, 3, 32, 32)
    methods = dict(train='dino', backbone=None, dino='dino', mocov3='mocov3', run_backbone='dino')
    known = ('train', 'run_backbone')  # only the training checkpoint's args know the heads
    for name, path in paths.items():
        heads = None if name in known else HEADS
        model, sd, args = checkpoint.load_backbone(path, num_heads=heads)
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), name
        assert model.blocks[0].attn.num_heads == HEADS
        with torch.no_grad():
            assert torch.equal(model.eval()(x), net(x)), name
        _, _, cfg, _ = load_eval_backbone(path, allow_vit=True, num_heads=heads)
        assert cfg['vit'] and cfg['method'] == methods[name] and cfg['depth'] == 2 and cfg['img_size'] == 32
        assert cfg['heads_from'] == {'train': "the checkpoint's args", 'run_backbone': 'checkpoint_last.pth beside it'
                                     }.get(name, 'given (--num-heads)')
    # ResNet-only readers (publish_model, detectron2, svm_voc07) refuse a ViT in one line
    with pytest.raises(ValueError, match='ViT backbone'):
        checkpoint.backbone_state_dict(torch.load(paths['train'], weights_only=True))
    with pytest.raises(ValueError, match='ViT backbone'):
        load_eval_backbone(paths['backbone'])


def test_heads_rule():
    """The heads change no shape: args, then MoCo v3's 12 for ViT-S (M3:vits.py), then the size's 6."""
    sd = {'patch_embed.proj.weight': torch.zeros(384, 3, 16, 16), 'pos_embed': torch.zeros(1, 197, 384),
          'blocks.0.mlp.fc1.weight': torch.zeros(1536, 384), 'norm.weight': torch.zeros(384),
          **{f'blocks.{i}.attn.qkv.weight': torch.zeros(1) for i in range(12)}}
    m3 = {'state_dict': {'module.base_encoder.cls_token': torch.zeros(1)}}
    assert checkpoint.vit_config(sd, m3)['num_heads'] == 12
    assert checkpoint.vit_config(sd, {'args': {'method': 'mocov3'}})['num_heads'] == 12
    assert checkpoint.vit_config(sd, {'teacher': {}})['num_heads'] == 6
    assert checkpoint.vit_config(sd, sd)['num_heads'] == 6
    assert checkpoint.vit_config(sd, {'args': {'method': 'mocov3', 'num_heads': 6}})['num_heads'] == 6
    assert checkpoint.vit_config(sd, m3, num_heads=4)['num_heads'] == 4
    dino_args = argparse.Namespace(arch='vit_small', method=None)  # DINO saves its Namespace
    assert checkpoint.vit_config(sd, {'args': dino_args, 'teacher': {}})['method'] == 'dino'


def test_lincls_features_by_hand(vit_files):
    """ViTLinear's inputs to fc: the normed cls token (mocov3), DINO's last-n cls tokens (and the
    interleaved mean patch token), each computed here by calling the blocks one by one."""
    net, _ = vit_files
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = net.prepare_tokens(x)
        after = []
        for blk in net.blocks:
            t = blk(t)
            after.append(net.norm(t))
        cls = [a[:, 0] for a in after]
        m3 = lincls.ViTLinear(net, 10, 'mocov3')
        assert m3.feat_dim == 48 and torch.allclose(m3.features(x), cls[-1], atol=1e-6)
        dn = lincls.ViTLinear(net, 10, 'dino', n_last_blocks=2)
        assert dn.feat_dim == 96 and torch.allclose(dn.features(x), torch.cat(cls, 1), atol=1e-6)
        avg = lincls.ViTLinear(net, 10, 'dino', n_last_blocks=1, avgpool=True)
        want = torch.stack([cls[-1], after[-1][:, 1:].mean(1)], 2).reshape(3, 96)  # [c0, a0, c1, a1, ...]
        assert avg.feat_dim == 96 and torch.allclose(avg.features(x), want, atol=1e-6)
        assert torch.allclose(dn(x), dn.fc(torch.cat(cls, 1)), atol=1e-5)
    assert [n for n, p in dn.named_parameters() if n.startswith('fc.')] == ['fc.weight', 'fc.bias']
    dn.train()
    assert not dn.backbone.training  # the frozen ViT stays in eval mode


def test_dino_knn_vote_by_hand():
    """DINO's eval_knn.py vote: top-k cosine neighbours, each adds exp(sim / T) to its class."""
    bank = torch.nn.functional.normalize(torch.tensor([[1., 0.], [0.8, 0.6], [0., 1.], [-1., 0.], [0.6, -0.8]]), dim=1)
    labels = torch.tensor([0, 1, 1, 2, 0])
    q = torch.nn.functional.normalize(torch.tensor([[1., 0.2], [-0.1, 1.]]), dim=1)
    k, t = 3, 0.07
    want = torch.zeros(2, 3)
    for i in range(2):
        sims = [float(q[i] @ b) for b in bank]
        for j in sorted(range(5), key=lambda j: -sims[j])[:k]:
            want[i, labels[j]] += np.exp(sims[j] / t)
    got = knn_predict(q, bank, labels, 3, k=k, t=t)
    assert torch.allclose(got, want, rtol=1e-5)
    top1, _ = knn_accuracy(bank, labels, q, torch.tensor([int(want[0].argmax()), 0]), k=k, t=t, num_classes=3)
    assert top1 == 50.0


def test_knn_dino_protocol_end_to_end(vit_files, data64, tmp_path):
    net, paths = vit_files
    knn.main([str(data64), '--pretrained', str(paths['dino']), '--num-heads', str(HEADS), '--workers', '0',
              '--output-dir', str(tmp_path)])
    res = json.loads((tmp_path / 'dino.pth.knn.json').read_text())
    p = res['protocol']
    assert 'DINO' in p['protocol'] and p['weights_from'].startswith('teacher') and p['k'] == [10, 20, 100, 200]
    assert p['t'] == 0.07 and p['feature'].startswith('normed [CLS] token')
    assert p['num_heads'] == HEADS and p['feat_dim'] == 48 and 'bicubic' in p['transform']
    assert set(res['results']) == {'10', '20', '100', '200'}
    # k=20 by hand: the teacher's normed cls tokens of the same view, L2-normalised
    from common.data import build_dataset
    tf = vit_eval_transform(32)
    sets = [build_dataset(str(data64), tf, s) for s in ('train', 'val')]
    with torch.no_grad():
        feats = [torch.nn.functional.normalize(torch.cat([net.pooled(torch.stack([ds[i][0] for i in range(len(ds))]))]), dim=1)
                 for ds in sets]
    labels = [torch.tensor([lab for _, lab in ds.samples]) for ds in sets]
    top1, top5 = knn_accuracy(feats[0], labels[0], feats[1], labels[1], k=20, t=0.07, num_classes=10)
    assert res['results']['20']['top1'] == pytest.approx(top1, abs=1e-3)


def test_lincls_protocols_end_to_end(vit_files, data64, tmp_path):
    _, paths = vit_files
    common = [str(data64), '--epochs', '1', '-b', '32', '--workers', '0', '--print-freq', '100']
    # the training checkpoint names dino.py: DINO's protocol, its recipe with our batch and epochs
    lincls.main(common + ['--pretrained', str(paths['train']), '--n-last-blocks', '2', '--output-dir', str(tmp_path / 'd')])
    res = json.loads((tmp_path / 'd' / 'checkpoint_last.pth.lincls.json').read_text())
    p = res['protocol']
    assert 'DINO' in p['protocol'] and p['feat_dim'] == 96 and p['n_last_blocks'] == 2 and not p['avgpool_patchtokens']
    assert p['lr'] == 0.001 and p['wd'] == 0 and p['lr_schedule'].startswith('cosine') and 'bicubic' in p['val_aug']
    assert 0 <= res['top1'] <= 100
    # a plain backbone.pth names no method: MoCo v3's protocol (normed cls token, lr 3)
    lincls.main(common + ['--pretrained', str(paths['backbone']), '--num-heads', str(HEADS),
                          '--output-dir', str(tmp_path / 'm')])
    p = json.loads((tmp_path / 'm' / 'backbone.pth.lincls.json').read_text())['protocol']
    assert 'MoCo v3' in p['protocol'] and p['feat_dim'] == 48 and p['lr'] == 3.0 and p['heads_from'] == 'given (--num-heads)'
    assert (tmp_path / 'm' / 'lincls_log.jsonl').read_text().count('"type": "lincls"') == 1
    # a ViT linear run resumes like a ResNet one (same flags, protocol and weights checked)
    lincls.main(common[:2] + ['2'] + common[3:] + ['--pretrained', str(paths['backbone']), '--num-heads', str(HEADS),
                                                  '--output-dir', str(tmp_path / 'm'), '--resume', 'auto'])
    assert (tmp_path / 'm' / 'lincls_log.jsonl').read_text().count('"type": "lincls"') == 2
    assert json.loads((tmp_path / 'm' / 'backbone.pth.lincls.json').read_text())['last']['epoch'] == 1
    msg = refused(lincls.main, common + ['--pretrained', str(paths['backbone']), '--num-heads', str(HEADS),
                                        '--protocol', 'dino', '--n-last-blocks', '1', '--output-dir', str(tmp_path / 'm'),
                                        '--resume', 'auto', '--epochs', '3'])
    assert '--protocol mocov3 -> dino' in msg


def test_lincls_recipes_and_sanity_check(vit_files):
    net, paths = vit_files
    cfg = dict(arch='vit_small', depth=12, method=None)
    args = lincls.vit_protocol(['d', '--pretrained', 'x'], lincls.parse_args(['d', '--pretrained', 'x']), cfg)
    assert (args.protocol, args.epochs, args.lr, args.batch_size, args.cos, args.wd) == ('mocov3', 90, 3.0, 1024, True, 0)
    argv = ['d', '--pretrained', 'x', '--protocol', 'dino', '--epochs', '5']
    args = lincls.vit_protocol(argv, lincls.parse_args(argv), cfg)
    assert (args.epochs, args.lr, args.batch_size, args.n_last_blocks, args.avgpool_patchtokens) == (5, 0.001, 1024, 4, False)
    args = lincls.vit_protocol(argv, lincls.parse_args(argv), dict(cfg, arch='vit_base'))
    assert (args.n_last_blocks, args.avgpool_patchtokens) == (1, True)  # DINO's ViT-B feature
    # the backbone-unchanged check sees a changed ViT tensor
    sd, _ = lincls.backbone_weights(paths['train'])
    model = lincls.build_vit_linear_model(sd, checkpoint.vit_config(sd, {'args': {'num_heads': HEADS}}), 10, 'mocov3')
    lincls.check_backbone_unchanged(model.backbone, sd)
    with torch.no_grad():
        model.backbone.blocks[1].mlp.fc2.bias.add_(1e-3)
    with pytest.raises(RuntimeError, match='blocks.1.mlp.fc2.bias'):
        lincls.check_backbone_unchanged(model.backbone, sd)


def test_extract_vit_layers(vit_files, data64, tmp_path):
    net, paths = vit_files
    extract.main([str(data64), '--pretrained', str(paths['train']), '--split', 'val', '--workers', '0',
                  '--layers', 'cls', 'patch_avg', 'cls_last2', '--output-dir', str(tmp_path)])
    meta = json.loads((tmp_path / 'val_meta.json').read_text())
    assert meta['dims'] == {'cls': 48, 'patch_avg': 48, 'cls_last2': 96}
    from common.data import build_dataset
    x = build_dataset(str(data64), vit_eval_transform(32), 'val')[0][0][None]
    with torch.no_grad():
        outs = net.get_intermediate_layers(x, 2)
    cls = np.load(tmp_path / 'val_cls.npy')
    assert cls.shape == (20, 48) and np.allclose(cls[0], outs[-1][0, 0].numpy(), atol=1e-5)
    assert np.allclose(np.load(tmp_path / 'val_cls_last2.npy')[0], torch.cat([o[0, 0] for o in outs]).numpy(), atol=1e-5)
    assert np.allclose(np.load(tmp_path / 'val_patch_avg.npy')[0], outs[-1][0, 1:].mean(0).numpy(), atol=1e-5)


def test_refusals_are_one_line(vit_files, data64, tmp_path):
    _, paths = vit_files
    d, tr, bb = str(data64), str(paths['train']), str(paths['backbone'])
    out = ['--output-dir', str(tmp_path), '--workers', '0']
    msg = refused(extract.main, [d, '--pretrained', tr, '--layers', 'feat1', 'feat5', *out])
    assert '--layers feat1 feat5' in msg and 'cls, patch_avg and cls_lastN' in msg
    assert '--pool' in refused(extract.main, [d, '--pretrained', tr, '--pool', 'avg', *out])
    assert '2 blocks' in refused(extract.main, [d, '--pretrained', tr, '--layers', 'cls_last3', *out])
    msg = refused(lincls.main, [d, '--pretrained', tr, '--layers', 'feat5', *out])
    assert msg.startswith('--layers feat5') and '--protocol mocov3' in msg
    assert '--n-last-blocks 1' in refused(lincls.main, [d, '--pretrained', tr, '--avgpool-patchtokens', *out])
    assert '--protocol dino' in refused(lincls.main, [d, '--pretrained', tr, '--protocol', 'mocov3',
                                                      '--n-last-blocks', '2', *out])
    assert '--num-heads' in refused(knn.main, [d, '--pretrained', bb, *out])  # a 48-d ViT has no standard heads
    assert 'ResNets only' in refused(semi.main, [d, '--pretrained', tr, '--fraction', '0.5', *out])
    # and a ResNet is told that the ViT flags are not for it
    from common.resnet import build_resnet
    checkpoint.save_backbone(build_resnet('resnet10', width=8, cifar_stem=True), tmp_path / 'r.pth')
    msg = refused(lincls.main, [d, '--pretrained', str(tmp_path / 'r.pth'), '--protocol', 'dino', *out])
    assert msg.startswith('--protocol: for ViT backbones')
    msg = refused(extract.main, [d, '--pretrained', str(tmp_path / 'r.pth'), '--layers', 'cls', *out])
    assert msg.startswith('--layers cls: ViT features')
