"""rotation.py: rotation direction and labels by hand, image-major batch layout, the model learns on
real images, exact resume, eval/ accepts the checkpoints, defaults and errors."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from common import augment, checkpoint
from common.data import build_dataset
from common.resnet import build_resnet
from conftest import REPO, python
from rotation import RotationPred, parse_args, rotate_four

# tiny runs: ResNet-10 of width 8, 16-px crops (4x cheaper than 32 px; exactness does not depend on size)
SMALL = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '16', '--workers', '0',
         '--print-freq', '1', '--seed', '0', '--batch-size', '16']


def test_rotation_counter_clockwise_by_hand():
    """2x2 image [[1, 2], [3, 4]]: 90 deg counter-clockwise moves the top-right pixel (2) to the
    top-left, i.e. [[2, 4], [1, 3]]; 180: [[4, 3], [2, 1]]; 270: [[3, 1], [4, 2]]."""
    img = torch.tensor([[[[1., 2.], [3., 4.]]]])  # 1x1x2x2
    x, labels = rotate_four(img)
    assert x[:, 0].tolist() == [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]
    assert labels.tolist() == [0, 1, 2, 3]


def test_rotated_copy_k_is_pil_rotate_90k():
    """An asymmetric RGB image (a bright square near the top-left corner, a colour ramp): copy k is
    exactly PIL's counter-clockwise rotate(90 k) of it, with label k."""
    pil = Image.new('RGB', (8, 8))
    for y in range(8):
        for x in range(8):
            pil.putpixel((x, y), (30 * x, 20 * y, 255 if (x < 3 and y < 2) else 0))
    img = T.ToTensor()(pil).unsqueeze(0)
    x, labels = rotate_four(img)
    for k in range(4):
        assert torch.equal(x[k], T.ToTensor()(pil.rotate(90 * k))), k
        assert labels[k].item() == k
    # the marker (blue, top-left 3 wide x 2 high) is at the bottom-left after 90 deg counter-clockwise
    blue = x[1, 2]
    assert blue[-3:, :2].eq(1).all() and blue.sum() == 6
    assert len({tuple(x[k].flatten().tolist()) for k in range(4)}) == 4  # no symmetry: 4 distinct copies


def test_batch_is_image_major():
    img = torch.randn(3, 3, 5, 5)
    x, labels = rotate_four(img)
    assert x.shape == (12, 3, 5, 5)
    for i in range(3):
        for k in range(4):
            assert torch.equal(x[4 * i + k], torch.rot90(img[i], k, (1, 2)))
    assert labels.tolist() == [0, 1, 2, 3] * 3
    with pytest.raises(ValueError, match='square'):
        rotate_four(torch.randn(1, 3, 4, 5))


class Pool(nn.Module):
    """Stub backbone: pooled feature = per-channel mean tiled to feat_dim (no parameters)."""

    def __init__(self, feat_dim):
        super().__init__()
        self.feat_dim = feat_dim

    def pooled(self, x):
        return x.mean((2, 3)).repeat(1, self.feat_dim // x.shape[1])


def test_model_head_and_outputs():
    model = RotationPred(Pool(3072))
    w = model.head.weight
    assert w.shape == (4, 3072) and model.head.bias.abs().sum() == 0
    assert w.std().item() == pytest.approx((2 / 3072) ** 0.5, rel=0.05)  # Kaiming fan_in (OSS head)
    img = torch.randn(2, 3, 4, 4)
    logits, labels = model(img)
    assert logits.shape == (8, 4) and labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # the head sees the feature of each rotated copy, in batch order
    want = model.head(Pool(3072).pooled(rotate_four(img)[0]))
    assert torch.allclose(logits, want)


def test_model_learns_rotations_on_real_images(data64):
    """16 real CIFAR images (32 px), all 4 rotations per step: the loss falls from about chance
    (ln 4 = 1.386) to well below it, and the rotations of those images are then classified right,
    within 20 SGD steps of a tiny ResNet."""
    torch.manual_seed(0)
    ds = build_dataset(data64, augment.eval_transform(32))
    img = torch.stack([ds[i][0] for i in range(0, 64, 4)])  # 16 images from all 10 classes
    model = RotationPred(build_resnet('resnet10', 0, 8, cifar_stem=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        logits, labels = model(img)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert 1.2 < losses[0] < 1.8
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0]
    model.eval()
    with torch.no_grad():
        logits, labels = model(img)
    assert (logits.argmax(1) == labels).float().mean() > 0.75


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def losses(d):
    recs = [json.loads(line) for line in open(d / 'log.jsonl')]
    return {(r['epoch'], r['iter']): (r['loss'], r['acc']) for r in recs if r['type'] == 'train'}


@pytest.fixture(scope='module')
def straight(data64, tmp_path_factory):
    """12 steps (3 epochs of 4) without interruption."""
    out = tmp_path_factory.mktemp('rot_straight')
    python('rotation.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out)
    return out


def test_resume_is_exact(data64, straight, tmp_path):
    """6 steps (stop mid-epoch 1) + --resume auto == 12 steps straight, bitwise (weights, BN stats,
    momentum buffers, logged losses)."""
    out = tmp_path / 'b'
    p = python('rotation.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out,
               '--max-steps', '6')
    assert '--max-steps 6 reached' in p.stdout
    assert (ckpt(out)['epoch'], ckpt(out)['iter']) == (1, 2)
    p = python('rotation.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out,
               '--resume', 'auto')
    assert 'resumed from' in p.stdout and 'iteration 2' in p.stdout
    a, b = ckpt(straight), ckpt(out)
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for k, s in a['optimizer']['state'].items():
        assert torch.equal(s['momentum_buffer'], b['optimizer']['state'][k]['momentum_buffer'])
    assert (b['epoch'], b['iter']) == (3, 0)
    assert losses(straight) == losses(out) and len(losses(out)) == 12


def test_run_log_and_checkpoint_contents(straight):
    recs = [json.loads(line) for line in open(straight / 'log.jsonl')]
    train = [r for r in recs if r['type'] == 'train']
    assert all(0 < r['loss'] < 5 and 0 <= r['acc'] <= 100 for r in train)
    # 16 images x 4 = 64 rotated copies per step: accuracy is a multiple of 100/64
    assert all(abs(r['acc'] * 64 / 100 - round(r['acc'] * 64 / 100)) < 1e-4 for r in train)
    # LR: 0.4 x 16/256 = 0.025, warm-up 5 epochs of 4 iterations from 0.1: step 0 -> 0.0025,
    # step 10 (epoch 2, iteration 2) -> 0.025 (1 - 0.5 x 0.9) = 0.01375 (the log counts iterations from 1)
    lr = {(r['epoch'], r['iter']): r['lr'] for r in train}
    assert lr[(0, 1)] == pytest.approx(0.0025) and lr[(2, 3)] == pytest.approx(0.01375)
    c = ckpt(straight)
    assert c['backbone_prefix'] == 'backbone.' and set(k.split('.')[0] for k in c['model']) == {'backbone', 'head'}
    assert c['model']['head.weight'].shape == (4, 64)


def test_eval_accepts_checkpoints(straight, data64):
    """backbone.pth == the checkpoint's backbone (what eval/lincls.py and eval/knn.py load), and
    eval/knn.py runs on it."""
    model, sd, _ = checkpoint.load_backbone(straight / 'backbone.pth')
    _, sd_ckpt, args = checkpoint.load_backbone(straight / 'checkpoint_last.pth')
    assert sd.keys() == sd_ckpt.keys() and all(torch.equal(sd[k], sd_ckpt[k]) for k in sd)
    assert args['arch'] == 'resnet10' and model.feat_dim == 64
    p = python(REPO / 'eval' / 'knn.py', '--pretrained', straight / 'backbone.pth', data64, '--workers', '0',
               '--device', 'cpu', '--k', '20')
    res = json.loads((straight / 'backbone.pth.knn.json').read_text())
    assert 0 <= res['results']['20']['top1'] <= 100 and res['protocol']['query_images'] == 20
    assert 'top-1' in p.stdout


def test_defaults_are_the_oss_recipe():
    a = parse_args(['/data'])
    assert (a.arch, a.width, a.cifar_stem, a.crop_size) == ('resnet50', 64, False, 224)
    assert (a.batch_size, a.lr, a.momentum, a.wd) == (128, 0.4, 0.9, 1e-4)
    assert a.lr * a.batch_size / 256 == pytest.approx(0.2)  # OSS: 0.2 for 128 images = 512 rotated copies
    assert (a.epochs, a.schedule, a.warmup_epochs, a.warmup_ratio) == (70, [30, 50], 5, 0.1)
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.cifar_stem and demo.crop_size == 32
    assert (demo.arch, demo.width) == ('resnet10', 32) and demo.knn_every > 0
    assert parse_args(['--epochs', '3']).epochs == 3  # explicit flags beat the demo's


def test_data_errors(tmp_path):
    import rotation
    with pytest.raises(SystemExit, match='does not exist'):
        rotation.main([str(tmp_path / 'nope'), *SMALL, '--output-dir', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='fewer than one global batch'):
        (tmp_path / 'few').mkdir()
        Image.new('RGB', (32, 32)).save(tmp_path / 'few' / 'a.png')
        rotation.main([str(tmp_path / 'few'), *SMALL, '--output-dir', str(tmp_path / 'o')])
