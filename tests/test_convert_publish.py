"""Checkpoint tools: detectron2 conversion (key mapping and shapes against detectron2's ResNet
naming, pickle format, refusals), scripts/convert.py (torchvision strict load, timm, detectron2),
scripts/publish_model.py (stripping, sha256 name, read-back) with common.checkpoint's check of
published names, and scripts/count_parameters.py."""
import hashlib
import importlib.util
import json
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision

from conftest import REPO, python
from common import checkpoint
from common.resnet import build_resnet, infer_resnet_config
from eval import lincls
from eval.detection import convert_to_detectron2 as d2

ONE_THREAD = {'OMP_NUM_THREADS': '1'}


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / 'scripts' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert, publish, count_parameters = (load_script(n) for n in ('convert', 'publish_model', 'count_parameters'))


def backbone_sd(arch='resnet50', width=8, cifar_stem=False, in_channels=3, seed=0):
    torch.manual_seed(seed)
    m = build_resnet(arch, 16, width=width, cifar_stem=cifar_stem, in_channels=in_channels)
    for mod in m.modules():  # non-trivial BN statistics, so a swapped tensor would show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
    return m.state_dict()


def training_ckpt(sd, **extra):
    """A MoCo-like training checkpoint: encoder_q/encoder_k, a queue, optimizer and RNG state."""
    model = {'encoder_q.' + k: v for k, v in sd.items()}
    model.update({'encoder_k.' + k: v.clone() for k, v in sd.items()})
    model.update(queue=torch.randn(16, 32), queue_ptr=torch.zeros(1, dtype=torch.long))
    return dict(model=model, backbone_prefix='encoder_q.', args={'arch': 'x', 'seed': 0}, epoch=3, iter=0,
                optimizer={'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0]}]},
                scaler={}, rng=[{'torch': torch.get_rng_state()}], git='abc', **extra)


# ============ detectron2 ============

def detectron2_resnet_keys(blocks, bottleneck):
    """The keys of detectron2's ResNet (modeling/backbone/resnet.py: BasicStem, BottleneckBlock /
    BasicBlock, stages res2-res5), written out independently of the converter."""
    norm = ['norm.weight', 'norm.bias', 'norm.running_mean', 'norm.running_var']
    keys = ['stem.conv1.weight'] + [f'stem.conv1.{n}' for n in norm]
    convs = ['conv1', 'conv2', 'conv3'] if bottleneck else ['conv1', 'conv2']
    for s, n in enumerate(blocks, start=2):
        for b in range(n):
            names = convs + (['shortcut'] if b == 0 and (bottleneck or s > 2) else [])
            for c in names:
                keys += [f'res{s}.{b}.{c}.weight'] + [f'res{s}.{b}.{c}.{x}' for x in norm]
    return keys


@pytest.mark.parametrize('arch, blocks, bottleneck', [('resnet50', [3, 4, 6, 3], True), ('resnet18', [2, 2, 2, 2], False)])
def test_detectron2_key_mapping_and_shapes(arch, blocks, bottleneck):
    sd = {k: v for k, v in backbone_sd(arch).items() if not k.startswith('fc.')}
    out = d2.detectron2_state(sd, infer_resnet_config(sd))
    assert sorted(out) == sorted(detectron2_resnet_keys(blocks, bottleneck))
    pairs = {'conv1.weight': 'stem.conv1.weight', 'bn1.running_var': 'stem.conv1.norm.running_var',
             'layer1.0.conv2.weight': 'res2.0.conv2.weight', 'layer2.1.bn2.bias': 'res3.1.conv2.norm.bias',
             'layer4.0.downsample.0.weight': 'res5.0.shortcut.weight',
             'layer3.0.downsample.1.running_mean': 'res4.0.shortcut.norm.running_mean'}
    for tv, d in pairs.items():
        assert isinstance(out[d], np.ndarray) and np.array_equal(out[d], sd[tv].numpy())
    n_bn = sum(k.endswith('num_batches_tracked') for k in sd)
    assert len(out) == len(sd) - n_bn  # every tensor but the BN counters, once
    for tv, v in sd.items():
        if not tv.endswith('num_batches_tracked'):
            assert out[d2.rename(tv)].shape == tuple(v.shape)


def test_detectron2_script_pickle_and_refusals(tmp_path):
    torch.save(training_ckpt(backbone_sd('resnet50', width=8)), tmp_path / 'ckpt.pth')
    p = python(REPO / 'eval' / 'detection' / 'convert_to_detectron2.py', tmp_path / 'ckpt.pth', tmp_path / 'm.pkl',
               env=ONE_THREAD)
    assert 'MODEL.RESNETS.WIDTH_PER_GROUP 8' in p.stdout and 'MODEL.RESNETS.RES2_OUT_CHANNELS 32' in p.stdout
    with open(tmp_path / 'm.pkl', 'rb') as f:
        obj = pickle.load(f)
    assert set(obj) == {'model', '__author__', 'matching_heuristics'} and obj['matching_heuristics'] is True
    assert len(obj['model']) == 265 and all(isinstance(v, np.ndarray) for v in obj['model'].values())
    assert d2.d2_config_overrides(dict(arch='resnet50', width=64, cifar_stem=False, in_channels=3)) == \
        {'MODEL.RESNETS.DEPTH': 50}
    # refusals: what detectron2 cannot build, and leftover / missing tensors
    for sd, msg in [(backbone_sd('resnet10', cifar_stem=True), 'CIFAR-stem'), (backbone_sd('resnet10'), 'depths'),
                    (backbone_sd('resnet18', in_channels=2), 'channels')]:
        sd = {k: v for k, v in sd.items() if not k.startswith('fc.')}
        with pytest.raises(ValueError, match=msg):
            d2.detectron2_state(sd, infer_resnet_config(sd))
    sd = {k: v for k, v in backbone_sd('resnet18').items() if not k.startswith('fc.')}
    cfg = infer_resnet_config(sd)
    with pytest.raises(ValueError, match=r"leftover keys \['layer1\.0\.extra\.weight'\]"):
        d2.detectron2_state({**sd, 'layer1.0.extra.weight': torch.zeros(1)}, cfg)
    del sd['layer2.0.bn1.running_var']
    with pytest.raises(ValueError, match=r"missing keys \['res3\.0\.conv1\.norm\.running_var'\]"):
        d2.detectron2_state(sd, cfg)


# ============ scripts/convert.py ============

def test_convert_torchvision_timm_detectron2(tmp_path, capsys):
    tv = torchvision.models.resnet18()
    torch.save(training_ckpt(tv.state_dict()), tmp_path / 'ckpt.pth')
    convert.main([str(tmp_path / 'ckpt.pth'), str(tmp_path / 'tv.pth'), '--to', 'torchvision'])
    assert 'loads strictly into torchvision.models.resnet18()' in capsys.readouterr().out
    sd = torch.load(tmp_path / 'tv.pth', weights_only=True)
    tv2 = torchvision.models.resnet18()
    tv2.fc = torch.nn.Identity()
    tv2.load_state_dict(sd)  # strict
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(tv2.eval()(x), tv.eval()(x))
    convert.main([str(tmp_path / 'ckpt.pth'), str(tmp_path / 'timm.pth'), '--to', 'timm'])
    out = capsys.readouterr().out
    assert 'timm' in out
    timm_sd = torch.load(tmp_path / 'timm.pth', weights_only=True)
    assert timm_sd.keys() == sd.keys() and all(torch.equal(timm_sd[k], sd[k]) for k in sd)  # same names
    convert.main([str(tmp_path / 'ckpt.pth'), str(tmp_path / 'd2.pkl'), '--to', 'detectron2'])
    with open(tmp_path / 'd2.pkl', 'rb') as f:
        assert np.array_equal(pickle.load(f)['model']['res5.1.conv2.weight'], sd['layer4.1.conv2.weight'].numpy())


def test_convert_non_torchvision_backbones_and_leftovers(tmp_path, capsys):
    torch.save(backbone_sd('resnet10', cifar_stem=True), tmp_path / 'tiny.pth')
    convert.main([str(tmp_path / 'tiny.pth'), str(tmp_path / 'out.pth'), '--to', 'torchvision'])
    assert 'torchvision cannot build' in capsys.readouterr().out
    assert set(torch.load(tmp_path / 'out.pth', weights_only=True)) == \
        {k for k in backbone_sd('resnet10', cifar_stem=True) if not k.startswith('fc.')}
    torch.save(backbone_sd('resnet10', in_channels=2), tmp_path / 'sobel.pth')
    convert.main([str(tmp_path / 'sobel.pth'), str(tmp_path / 'out2.pth'), '--to', 'timm'])
    assert 'Sobel' in capsys.readouterr().out
    bad = backbone_sd('resnet18', width=64)
    bad['layer1.0.extra.weight'] = torch.zeros(2)
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match=r'leftover keys \[.layer1\.0\.extra\.weight.\]'):
        convert.main([str(tmp_path / 'bad.pth'), str(tmp_path / 'x.pth'), '--to', 'torchvision'])
    bad = backbone_sd('resnet18', width=64)
    del bad['layer3.1.bn2.weight']
    torch.save(bad, tmp_path / 'bad2.pth')
    with pytest.raises(SystemExit, match=r'missing keys \[.layer3\.1\.bn2\.weight.\]'):
        convert.main([str(tmp_path / 'bad2.pth'), str(tmp_path / 'x.pth'), '--to', 'timm'])
    assert not (tmp_path / 'x.pth').exists()


# ============ scripts/publish_model.py and published-file checks ============

def test_publish_model_script(tmp_path):
    ckpt = training_ckpt(backbone_sd('resnet10', cifar_stem=True))
    torch.save(ckpt, tmp_path / 'checkpoint_last.pth')
    p = python(REPO / 'scripts' / 'publish_model.py', tmp_path / 'checkpoint_last.pth', tmp_path / 'rel' / 'moco_tiny.pth',
               env=ONE_THREAD)
    files = list((tmp_path / 'rel').iterdir())
    assert len(files) == 1 and re.fullmatch(r'moco_tiny-[0-9a-f]{8}\.pth', files[0].name)
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert files[0].name == f'moco_tiny-{digest[:8]}.pth' and f'sha256 {digest}' in p.stdout
    assert 'queue' in p.stdout and 'optimizer' in p.stdout
    out = checkpoint.load(files[0])  # verifies the name against the content
    assert set(out) == {'model', 'backbone_prefix', 'args', 'epoch', 'iter', 'git'}
    assert set(out['model']) == set(ckpt['model']) - {'queue', 'queue_ptr'}
    assert all(torch.equal(out['model'][k], ckpt['model'][k]) for k in out['model'])
    sd, cfg = lincls.backbone_weights(files[0])  # eval/ accepts the published file
    assert cfg['width'] == 8 and 'conv1.weight' in sd


def test_published_name_is_checked_on_load(tmp_path):
    ckpt = training_ckpt(backbone_sd('resnet10', cifar_stem=True))
    path, sha = publish.publish(publish.strip(ckpt)[0], tmp_path / 'm.pth')
    assert path.name == f'm-{sha[:8]}.pth' and checkpoint.verify_published(path) == sha
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f'starts with {sha[:8]}.*corrupt'):
        checkpoint.load(path)
    with pytest.raises(SystemExit, match='corrupt or incomplete'):
        lincls.backbone_weights(path)
    # a name that only looks published is refused too, with the advice to rename it
    torch.save(backbone_sd('resnet10', cifar_stem=True), tmp_path / 'model-20240101.pth')
    with pytest.raises(RuntimeError, match='rename it'):
        checkpoint.load(tmp_path / 'model-20240101.pth')
    torch.save({'a': torch.zeros(1)}, tmp_path / 'checkpoint_0010.pth')  # other names: not checked
    assert checkpoint.verify_published(tmp_path / 'checkpoint_0010.pth') is None
    assert torch.equal(checkpoint.load(tmp_path / 'checkpoint_0010.pth')['a'], torch.zeros(1))


def test_publish_strip_variants():
    ckpt = training_ckpt(backbone_sd('resnet10', cifar_stem=True))
    ckpt['model']['memory_bank'] = torch.randn(100, 16)
    ckpt['model']['head.centroids'] = torch.randn(5, 16)
    out, dropped, top = publish.strip(ckpt, drop=[r'^encoder_k\.'])
    assert {'queue', 'queue_ptr', 'memory_bank', 'head.centroids'} <= set(dropped)
    assert not any(k.startswith('encoder_k.') for k in out['model']) and set(top) == {'optimizer', 'scaler', 'rng'}
    bb, _, _ = publish.strip(ckpt, backbone_only=True)
    assert bb['backbone_prefix'] == '' and 'conv1.weight' in bb['model'] and 'fc.weight' not in bb['model']
    assert checkpoint.backbone_state_dict(bb).keys() == bb['model'].keys() and bb['args'] == ckpt['args']
    moco = {'epoch': 200, 'arch': 'resnet50', 'optimizer': {}, 'state_dict': {'module.encoder_q.conv1.weight': torch.zeros(1),
                                                                             'module.queue': torch.zeros(2)}}
    out, dropped, top = publish.strip(moco)
    assert set(out) == {'epoch', 'arch', 'state_dict'} and dropped == ['module.queue'] and top == ['optimizer']
    with pytest.raises(ValueError, match='unrecognised'):
        publish.strip({'foo': 1})


# ============ scripts/count_parameters.py ============

def test_count_parameters_by_hand(tmp_path, capsys):
    sd = backbone_sd('resnet10', cifar_stem=True)
    params = {k: v.numel() for k, v in build_resnet('resnet10', 16, width=8, cifar_stem=True).named_parameters()}
    bn_stats = sum(v.numel() for k, v in sd.items() if k not in params)
    backbone = sum(n for k, n in params.items() if not k.startswith('fc.'))
    ckpt = training_ckpt(sd)
    ckpt['model']['predictor.0.weight'] = torch.zeros(7, 3)
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    count_parameters.main([str(tmp_path / 'ckpt.pth'), '--json', str(tmp_path / 'c.json')])
    out = capsys.readouterr().out
    assert 'training state (not parameters)' in out and 'queue' in out and '16x32' in out
    c = json.loads((tmp_path / 'c.json').read_text())
    g = c['groups']
    assert g['encoder_q']['parameters'] == backbone and g['encoder_q']['backbone'] and g['encoder_q']['bn_stats'] == bn_stats
    assert g['encoder_q.fc']['parameters'] == 64 * 16 + 16 and not g['encoder_q.fc']['backbone']
    assert g['encoder_k']['parameters'] == sum(params.values()) and g['predictor']['parameters'] == 21
    assert c['backbone'] == backbone and c['total'] == 2 * sum(params.values()) + 21
    assert set(c['state']) == {'queue', 'queue_ptr'}
    torch.save(sd, tmp_path / 'plain.pth')  # a plain state dict: grouped by its top-level modules
    count_parameters.main([str(tmp_path / 'plain.pth')])
    out = capsys.readouterr().out
    assert re.search(r'^layer4\s', out, re.M) and f'{backbone:,} parameters' in out
