"""eval/knn.py and eval/lincls.py: weighted kNN by hand, both scripts end to end on real images with
tiny backbones, checkpoint acceptance (selfsup, moco, torchvision) and rejection, the frozen-backbone
check, exact resume of the linear run."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision

from conftest import REPO, make_subset, python
from common import augment
from common.checkpoint import load_backbone
from common.data import build_dataset
from common.knn import knn_accuracy, knn_eval, knn_predict
from common.resnet import build_resnet
from eval import lincls

LINCLS = REPO / 'eval' / 'lincls.py'
KNN = REPO / 'eval' / 'knn.py'
# 200 train images, batch 50: 4 iterations per epoch; small LR since random-init features are large
FAST = ['--batch-size', '50', '--workers', '0', '--device', 'cpu', '--lr', '0.05', '--schedule', '1',
        '--print-freq', '2']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """20 train + 10 val real CIFAR-10 images per class (ImageNet layout)."""
    return make_subset(tmp_path_factory.mktemp('data200'), 20, 10)


def tiny_backbone_sd(num_classes=5):
    """State dict of a tiny CIFAR-stem ResNet, fc included (as torchvision's state dicts have)."""
    torch.manual_seed(0)
    return build_resnet('resnet10', num_classes, width=8, cifar_stem=True).state_dict()


def selfsup_ckpt(sd):
    """A checkpoint as this repo's method files write it: full model under 'model' + backbone_prefix."""
    model = {'encoder_q.' + k: v for k, v in sd.items()}
    model.update({'encoder_k.' + k: v.clone() for k, v in sd.items()})
    model['queue'] = torch.randn(5, 8)
    return {'model': model, 'backbone_prefix': 'encoder_q.', 'epoch': 1,
            'args': {'arch': 'resnet10', 'width': 8, 'cifar_stem': True, 'seed': 0}}


def read_json(p):
    assert p.is_file(), f'{p} was not written'
    return json.loads(p.read_text())


# ============ weighted kNN ============


def unit(*sims, dim=4, axis=0, free=2):
    """Unit vectors with cosine `s` to the basis vector e_axis (the rest of the norm on e_free)."""
    v = torch.zeros(len(sims), dim)
    v[:, axis] = torch.tensor(sims)
    v[:, free] = (1 - v[:, axis] ** 2).sqrt()
    return v


def knn_case():
    """Two queries, e0 and e1, each with three bank neighbours of known cosine; the two groups are
    orthogonal, so with k <= 3 a query only sees its own group.
      query e0 (true class 1): neighbours 0.50 (class 0), 0.49 (class 1), 0.48 (class 1)
      query e1 (true class 2): neighbours 0.90 (class 2), 0.80 (class 0), 0.70 (class 0)
    """
    bank = torch.cat([unit(0.50, 0.49, 0.48, axis=0, free=2), unit(0.90, 0.80, 0.70, axis=1, free=3)])
    labels = torch.tensor([0, 1, 1, 2, 0, 0])
    query = torch.eye(4)[:2]
    return query, bank, labels, torch.tensor([1, 2])


def test_knn_predict_scores_by_hand():
    query, bank, labels, _ = knn_case()
    e = lambda s, t=0.07: math.exp(s / t)  # noqa: E731 - the NPID vote weight
    s1 = knn_predict(query, bank, labels, 3, k=1, t=0.07)
    assert torch.allclose(s1, torch.tensor([[e(.50), 0, 0], [0, 0, e(.90)]]), rtol=1e-5)
    s3 = knn_predict(query, bank, labels, 3, k=3, t=0.07)
    expected = torch.tensor([[e(.50), e(.49) + e(.48), 0],   # 1265 vs 2047: two votes beat one
                             [e(.80) + e(.70), 0, e(.90)]])  # 114k vs 383k: the closer vote wins
    assert torch.allclose(s3, expected, rtol=1e-5)
    assert s1.argmax(1).tolist() == [0, 2] and s3.argmax(1).tolist() == [1, 2]
    # nearly unweighted votes (large T): the majority decides the second query
    assert knn_predict(query, bank, labels, 3, k=3, t=100.0).argmax(1).tolist() == [1, 0]


def test_knn_accuracy_by_hand():
    query, bank, labels, truth = knn_case()
    # k=1: query 1 wrong (class 0), query 2 right; k=3: both right; k=3 near-majority: query 2 wrong
    assert knn_accuracy(bank, labels, query, truth, k=1, t=0.07)[0] == pytest.approx(50.0)
    assert knn_accuracy(bank, labels, query, truth, k=3, t=0.07)[0] == pytest.approx(100.0)
    assert knn_accuracy(bank, labels, query, truth, k=3, t=100.0)[0] == pytest.approx(50.0)
    assert knn_accuracy(bank, labels, query, truth, k=1, t=0.07)[1] == pytest.approx(100.0)  # 3 classes < 5


def test_knn_script_end_to_end(data, tmp_path):
    ckpt = tmp_path / 'backbone.pth'
    torch.save(tiny_backbone_sd(), ckpt)
    p = python(KNN, '--pretrained', ckpt, data, '--workers', '0', '--device', 'cpu')
    assert 'top-1' in p.stdout
    res = read_json(tmp_path / 'backbone.pth.knn.json')
    assert set(res['results']) == {'200', '20'}
    pr = res['protocol']
    assert (pr['arch'], pr['width'], pr['cifar_stem'], pr['crop_size']) == ('resnet10', 8, True, 32)
    assert (pr['t'], pr['k'], pr['bank_images'], pr['query_images'], pr['num_classes']) == \
        (0.07, [200, 20], 200, 100, 10)
    # the same numbers as common.knn on the same backbone, computed here
    model, _, _ = load_backbone(ckpt)
    tf = augment.eval_transform(32)
    want = knn_eval(model.eval().pooled, build_dataset(data, tf, 'train'), build_dataset(data, tf, 'val'),
                    (200, 20), workers=0)
    for k, (top1, top5) in want.items():
        got = res['results'][str(k)]
        assert 0 <= got['top1'] <= got['top5'] <= 100
        assert (got['top1'], got['top5']) == pytest.approx((top1, top5), abs=1e-3)


# ============ linear classification ============


def test_lincls_defaults_are_the_moco_protocol():
    a = lincls.get_parser().parse_args(['--pretrained', 'x.pth', 'data'])
    assert (a.lr, a.momentum, a.wd, a.batch_size, a.epochs, a.schedule) == (30.0, 0.9, 0.0, 256, 100, [60, 80])
    assert not a.unsafe_load


@pytest.fixture(scope='module')
def plain_run(data, tmp_path_factory):
    """2 epochs on a plain state dict, no --output-dir: everything lands beside the checkpoint."""
    d = tmp_path_factory.mktemp('plain')
    torch.save(tiny_backbone_sd(), d / 'plain.pth')
    p = python(LINCLS, '--pretrained', d / 'plain.pth', data, '--epochs', '2', *FAST)
    return d, p


def test_lincls_plain_state_dict(plain_run):
    d, p = plain_run
    assert 'sanity check passed' in p.stdout and 'effective LR' in p.stdout
    res = read_json(d / 'plain.pth.lincls.json')
    pr = res['protocol']
    assert (pr['arch'], pr['width'], pr['cifar_stem'], pr['feat_dim'], pr['num_classes']) == \
        ('resnet10', 8, True, 64, 10)
    assert (pr['epochs'], pr['lr'], pr['batch_size'], pr['wd'], pr['momentum'], pr['schedule']) == \
        (2, 0.05, 50, 0.0, 0.9, [1])
    assert pr['effective_lr'] == pytest.approx(0.05 * 50 / 256)
    assert 'RandomCrop' in pr['train_aug'] and 'RandomHorizontalFlip' in pr['train_aug']
    assert 'CenterCrop' in pr['val_aug'] and 'Random' not in pr['val_aug']
    assert 'eval mode' in pr['bn'] and pr['trainable'] == 'fc.weight, fc.bias'
    assert (pr['train_images'], pr['val_images']) == (200, 100)
    assert res['last']['epoch'] == 1 and res['best']['epoch'] in (0, 1)
    assert 0 <= res['top1'] <= res['top5'] <= 100 and res['top1'] == res['last']['top1']
    assert res['best']['top1'] >= res['top1']
    assert res['pretrained'] == str(d / 'plain.pth')
    recs = [json.loads(line) for line in open(d / 'lincls_log.jsonl')]
    assert [r['epoch'] for r in recs if r['type'] == 'lincls'] == [0, 1]
    assert (d / 'lincls_checkpoint.pth').is_file()


def test_lincls_selfsup_checkpoint_and_exact_resume(plain_run, data, tmp_path):
    """The same backbone inside a selfsup checkpoint, trained 1 epoch then resumed to 2, ends
    bitwise where the uninterrupted plain run ended."""
    torch.save(selfsup_ckpt(tiny_backbone_sd()), tmp_path / 'checkpoint_last.pth')
    out = tmp_path / 'lin'
    args = ['--pretrained', tmp_path / 'checkpoint_last.pth', data, *FAST, '--output-dir', out]
    python(LINCLS, *args, '--epochs', '1')
    assert read_json(out / 'checkpoint_last.pth.lincls.json')['last']['epoch'] == 0
    p = python(LINCLS, *args, '--epochs', '2', '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'epoch 0:' not in p.stdout
    res = read_json(out / 'checkpoint_last.pth.lincls.json')
    assert not (tmp_path / 'checkpoint_last.pth.lincls.json').exists()  # --output-dir given
    assert res['protocol']['arch'] == 'resnet10' and res['last']['epoch'] == 1
    ref = read_json(plain_run[0] / 'plain.pth.lincls.json')
    assert (res['top1'], res['top5'], res['best']) == (ref['top1'], ref['top5'], ref['best'])
    a = torch.load(out / 'lincls_checkpoint.pth', weights_only=True)['fc']
    b = torch.load(plain_run[0] / 'lincls_checkpoint.pth', weights_only=True)['fc']
    assert all(torch.equal(a[k], b[k]) for k in ('weight', 'bias'))
    # a linear checkpoint of another backbone is refused
    torch.save(tiny_backbone_sd(), tmp_path / 'other.pth')
    p = python(LINCLS, '--pretrained', tmp_path / 'other.pth', data, *FAST, '--output-dir', out,
               '--resume', 'auto', check=False)
    assert p.returncode != 0 and 'not on' in p.stderr


def test_lincls_rejects_extra_key(data, tmp_path):
    ckpt = selfsup_ckpt(tiny_backbone_sd())
    ckpt['model']['encoder_q.extra.weight'] = torch.zeros(3)
    torch.save(ckpt, tmp_path / 'bad.pth')
    p = python(LINCLS, '--pretrained', tmp_path / 'bad.pth', data, '--epochs', '1', *FAST, check=False)
    assert p.returncode != 0 and 'extra.weight' in p.stderr and 'Traceback' not in p.stderr
    assert not (tmp_path / 'bad.pth.lincls.json').exists()


@pytest.mark.parametrize('tamper, key', [
    ('drop', 'layer1.0.bn1.running_var'),
    ('drop', 'layer3.0.downsample.0.weight'),
    ('add', 'layer2.0.extra.weight'),
    ('add', 'extra.weight'),
])
def test_lincls_loading_names_bad_keys(tmp_path, tamper, key):
    ckpt = selfsup_ckpt(tiny_backbone_sd())
    if tamper == 'drop':
        del ckpt['model']['encoder_q.' + key]
    else:
        ckpt['model']['encoder_q.' + key] = torch.zeros(3)
    torch.save(ckpt, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match=key.replace('.', r'\.')):
        sd, cfg = lincls.backbone_weights(tmp_path / 'bad.pth')
        lincls.build_linear_model(sd, cfg, 10)


def test_lincls_loading_accepts_torchvision_and_moco_checkpoints(tmp_path):
    tv = torchvision.models.resnet18()  # random init: weights=None downloads nothing
    torch.save(tv.state_dict(), tmp_path / 'tv.pth')
    sd, cfg = lincls.backbone_weights(tmp_path / 'tv.pth')
    assert cfg == dict(arch='resnet18', width=64, cifar_stem=False, in_channels=3)
    model = lincls.build_linear_model(sd, cfg, 7)
    assert model.fc.out_features == 7 and 'fc.weight' not in sd
    lincls.check_backbone_unchanged(model, sd)
    model.fc = tv.fc = torch.nn.Identity()  # the same pooled features as torchvision's network
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model.eval()(x), tv.eval()(x), atol=1e-5)
    # facebookresearch/moco main_moco.py: DDP 'module.' prefix, encoder_q/encoder_k, 'state_dict'
    small = tiny_backbone_sd(128)
    moco = {'module.encoder_q.' + k: v for k, v in small.items()}
    moco.update({'module.encoder_k.' + k: v for k, v in small.items()})
    torch.save({'epoch': 200, 'arch': 'resnet10', 'state_dict': moco, 'optimizer': {}}, tmp_path / 'moco.pth')
    sd, cfg = lincls.backbone_weights(tmp_path / 'moco.pth')
    assert cfg['width'] == 8 and cfg['cifar_stem']
    lincls.build_linear_model(sd, cfg, 10)


def test_check_backbone_unchanged_catches_changes():
    model = build_resnet('resnet10', 10, width=8, cifar_stem=True)
    ref = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith('fc.')}
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # the classifier may change
    lincls.check_backbone_unchanged(model, ref)
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(RuntimeError, match=r'layer2\.0\.conv1\.weight'):
        lincls.check_backbone_unchanged(model, ref)
    # BN statistics count too: one forward in train mode moves them
    model.layer2[0].conv1.weight.data.copy_(ref['layer2.0.conv1.weight'])
    lincls.check_backbone_unchanged(model, ref)
    model.train()(torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match='running_mean'):
        lincls.check_backbone_unchanged(model, ref)


def test_lincls_train_one_epoch_moves_only_fc():
    """train_one_epoch puts the whole model in eval mode: fc learns, the backbone (BN statistics
    included) stays bitwise as loaded, even if the model arrives in train mode."""
    sd = {k: v for k, v in tiny_backbone_sd().items() if not k.startswith('fc.')}
    model = lincls.build_linear_model(sd, dict(arch='resnet10', width=8, cifar_stem=True, in_channels=3), 10)
    for name, p in model.named_parameters():
        p.requires_grad = name in ('fc.weight', 'fc.bias')
    fc0 = model.fc.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9)
    cpu = torch.device('cpu')
    loader = [(torch.randn(8, 3, 32, 32), torch.arange(8), torch.arange(8))] * 2
    args = SimpleNamespace(epochs=1, schedule=[], print_freq=1)
    loss, acc = lincls.train_one_epoch(loader, model.train(), opt, torch.amp.GradScaler('cpu', enabled=False),
                                       0, 2, 0.1, args, cpu, dict(device_type='cpu', enabled=False),
                                       SimpleNamespace(print=lambda *a: None))
    assert math.isfinite(loss) and 0 <= acc <= 100 and not model.training
    assert not torch.equal(model.fc.weight, fc0)
    lincls.check_backbone_unchanged(model, sd)
