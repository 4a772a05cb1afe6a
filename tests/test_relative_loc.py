"""relative_loc.py: patch geometry, labels and channel order read back from an image whose pixels
encode their own coordinates; grayscale on the whole image; the model's late fusion, init and
param groups; exact resume; eval/ accepts the checkpoints; defaults and errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common import checkpoint
from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.resnet import build_resnet
from conftest import REPO, python, stop_and_resume
from relative_loc import NEIGHBOURS, PatchPairs, RelativeLoc, geometry, grid_patches, parse_args

SMALL = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--neck-dim', '32',
         '--workers', '0', '--print-freq', '1', '--seed', '0', '--batch-size', '16']
STEP = 6  # pixel value = STEP x coordinate


def coord_image(size):
    """RGB image with R = 6 x column, G = 6 x row, B = 0: every pixel names its position."""
    img = Image.new('RGB', (size, size))
    img.putdata([(STEP * x, STEP * y, 0) for y in range(size) for x in range(size)])
    return img


def coords(t):
    """(columns PxP, rows PxP) of a normalised 3xPxP patch cut from coord_image."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    v = (t * std + mean) * 255
    assert torch.allclose(v, v.round(), atol=1e-3)  # ToTensor + Normalize of whole pixels, no resampling
    v = v.round().long()
    assert (v % STEP == 0).all() and (v[2] == 0).all()
    return v[0] // STEP, v[1] // STEP


def test_geometry_from_one_size():
    assert geometry(255) == (292, 255, 85, 64)  # OpenSelfSup: resize 292, crop 255, cells 85, patches 64
    assert geometry(32) == (38, 33, 11, 8)      # CIFAR: jitter 3 (OSS 21/85 = 0.25 of a cell; here 0.27)
    assert geometry(64) == (72, 63, 21, 16)
    with pytest.raises(ValueError, match='too small'):
        PatchPairs(5)


def test_grid_patches_positions_and_gaps():
    """33x33 image, cells 11, patches 8: patch (r, c) is an unscaled 8x8 crop whose top-left corner
    lies at (11c + dx, 11r + dy) with dx, dy in 0..3; neighbouring patches are 0..6 px apart; over
    many draws every jitter value and both extreme gaps occur."""
    img = coord_image(33)
    jitters, gaps = set(), set()
    for seed in range(100):
        torch.manual_seed(seed)
        patches = grid_patches(img, 11, 8)
        assert len(patches) == 9 and all(p.size == (8, 8) for p in patches)
        corners = []
        for i, p in enumerate(patches):
            r, c = divmod(i, 3)
            px = torch.from_numpy(np.array(p)).long()  # 8x8x3 (rows, columns, RGB)
            x0, y0 = px[0, 0, 0].item() // STEP, px[0, 0, 1].item() // STEP
            assert torch.equal(px[..., 0], STEP * (x0 + torch.arange(8)).expand(8, 8))  # unscaled crop
            assert torch.equal(px[..., 1], STEP * (y0 + torch.arange(8)).view(8, 1).expand(8, 8))
            dx, dy = x0 - 11 * c, y0 - 11 * r
            assert 0 <= dx <= 3 and 0 <= dy <= 3
            jitters |= {dx, dy}
            corners.append((x0, y0))
        for r in range(3):
            for c in range(2):
                gap = corners[3 * r + c + 1][0] - (corners[3 * r + c][0] + 8)  # horizontal neighbours
                gaps.add(gap)
                assert 0 <= gap <= 6
    assert jitters == {0, 1, 2, 3} and min(gaps) == 0 and max(gaps) == 6


def test_pairs_labels_and_channel_order():
    """Full pipeline at --crop-size 32 on a 38x38 image (Resize(38) leaves it as is): 8 pairs of
    6x8x8; channels 3-5 hold the same centre patch in every pair, channels 0-2 the neighbour of
    label k, which lies in grid cell NEIGHBOURS[k] (row-major, centre skipped)."""
    assert NEIGHBOURS == [0, 1, 2, 3, 5, 6, 7, 8]
    t = PatchPairs(32, gray_p=0.0)
    img = coord_image(38)
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(img)
        assert out.shape == (8, 6, 8, 8) and out.dtype == torch.float32
        cx, cy = coords(out[0, 3:])
        for k in range(8):
            assert torch.equal(out[k, 3:], out[0, 3:])  # [neighbour, centre]: the centre is second
            nx, ny = coords(out[k, :3])
            r, c = divmod(NEIGHBOURS[k], 3)
            dx, dy = (nx[0, 0] - cx[0, 0]).item(), (ny[0, 0] - cy[0, 0]).item()
            # offset between the two corners: 11 px per cell step, +-3 px of jitter
            assert abs(dx - 11 * (c - 1)) <= 3 and abs(dy - 11 * (r - 1)) <= 3, (k, dx, dy)
            assert torch.equal(nx, nx[0, 0] + torch.arange(8).expand(8, 8))   # columns run left to right
            assert torch.equal(ny, ny[0, 0] + torch.arange(8).view(8, 1).expand(8, 8))
        # all 9 patches lie inside one 33x33 crop of the 38x38 image
        xs = torch.stack([coords(out[k, :3])[0] for k in range(8)] + [cx])
        ys = torch.stack([coords(out[k, :3])[1] for k in range(8)] + [cy])
        assert xs.max() - xs.min() <= 32 and ys.max() - ys.min() <= 32 and xs.max() <= 37 and ys.max() <= 37


def test_grayscale_is_drawn_per_image():
    """RandomGrayscale(0.66) acts on the whole image before the grid: a pair is grey in both patches
    or in neither, in about 66% of the draws."""
    img = coord_image(38)
    grey = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = PatchPairs(32)(img).view(8, 2, 3, 8, 8)
        v = out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        spread = v.amax(2) - v.amin(2)  # 8x2x8x8: zero for every pixel iff R = G = B
        is_grey = [spread[:, h].max() < 1e-5 for h in (0, 1)]
        assert is_grey[0] == is_grey[1]
        grey += bool(is_grey[0])
    assert 0.56 < grey / 200 < 0.76


def tiny_model(neck_dim=4096):
    torch.manual_seed(0)
    return RelativeLoc(build_resnet('resnet10', 0, 8, cifar_stem=True), neck_dim)


def test_model_init_and_structure():
    model = tiny_model()
    fc, bn, _, drop = model.neck
    assert fc.weight.shape == (4096, 128)  # 2 x 64 (layer4 of both patches) -> 4096
    assert fc.weight.std().item() == pytest.approx(0.005, rel=0.02) and torch.all(fc.bias == 0.1)
    assert model.head.weight.shape == (8, 4096) and torch.all(model.head.bias == 0)
    assert model.head.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert bn.momentum == 0.003 and drop.p == 0.5
    n_backbone = sum(p.numel() for p in build_resnet('resnet10', 0, 8, cifar_stem=True).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_backbone + 4096 * 129 + 2 * 4096 + 8 * 4097  # one backbone


def test_late_fusion_with_separate_bn_batches():
    """The neck sees [pooled layer4 of the neighbours, pooled layer4 of the centres], each computed in
    a batch of its own (BN statistics per branch, as OpenSelfSup's two backbone calls)."""
    model = tiny_model(neck_dim=16)
    pairs = torch.randn(2, 8, 6, 8, 8)
    seen = {}
    model.neck.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach()))
    logits, labels = model(pairs)
    assert logits.shape == (16, 8) and labels.tolist() == list(range(8)) * 2
    x = pairs.flatten(0, 1)
    with torch.no_grad():
        want = torch.cat([model.backbone.pooled(x[:, :3]), model.backbone.pooled(x[:, 3:])], 1)
        joint = model.backbone.pooled(torch.cat([x[:, :3], x[:, 3:]])).view(2, 16, -1)
    assert torch.allclose(seen['x'], want, atol=1e-5)
    assert not torch.allclose(seen['x'][:, :64], joint[0], atol=1e-3)  # one joint batch would differ
    # dropout makes train-mode passes differ; eval mode is deterministic
    assert not torch.equal(model(pairs)[0], model(pairs)[0])
    model.eval()
    assert torch.equal(model(pairs)[0], model(pairs)[0])


def ckpt(d, name='checkpoint_last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def losses(d):
    recs = [json.loads(line) for line in open(d / 'log.jsonl')]
    return {(r['epoch'], r['iter']): (r['loss'], r['acc']) for r in recs if r['type'] == 'train'}


@pytest.fixture(scope='module')
def straight(data64, tmp_path_factory):
    """12 steps (3 epochs of 4) without interruption."""
    out = tmp_path_factory.mktemp('rl_straight')
    python('relative_loc.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out)
    return out


def test_resume_is_exact(data64, straight, tmp_path):
    """6 steps (stop mid-epoch 1) + --resume auto == 12 steps straight, bitwise (weights, BN stats of
    backbone and neck, momentum buffers, logged losses; dropout draws come from the restored RNG)."""
    out = tmp_path / 'b'
    p = python('relative_loc.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out,
               '--max-steps', '6')
    assert '--max-steps 6 reached' in p.stdout
    assert (ckpt(out)['epoch'], ckpt(out)['iter']) == (1, 2)
    p = python('relative_loc.py', data64, *SMALL, '--epochs', '3', '--deterministic', '--output-dir', out,
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


def test_param_groups_log_and_checkpoint(straight):
    """Neck and head: wd 5e-4; backbone: 1e-4 (OpenSelfSup paramwise_options); pretext accuracy of
    128 pairs per step; LR 0.1 x 16/256 with warm-up from 0.1."""
    c = ckpt(straight)
    groups = c['optimizer']['param_groups']
    n_model = len([k for k in c['model'] if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))])
    assert [(g['weight_decay'], len(g['params'])) for g in groups] == [(1e-4, n_model - 6), (5e-4, 6)]
    assert c['backbone_prefix'] == 'backbone.'
    assert c['model']['neck.0.weight'].shape == (32, 128) and c['model']['head.weight'].shape == (8, 32)
    train = [json.loads(line) for line in open(straight / 'log.jsonl')]
    train = [r for r in train if r['type'] == 'train']
    assert all(abs(r['acc'] * 128 / 100 - round(r['acc'] * 128 / 100)) < 1e-4 for r in train)
    assert train[0]['lr'] == pytest.approx(0.1 * 16 / 256 * 0.1)
    assert all(1.5 < r['loss'] < 3 for r in train)  # about ln 8 = 2.08 this early


def test_eval_accepts_checkpoints(straight, data64):
    """backbone.pth == the checkpoint's backbone (what eval/lincls.py and eval/knn.py load), and
    eval/knn.py runs on it."""
    model, sd, _ = checkpoint.load_backbone(straight / 'backbone.pth')
    _, sd_ckpt, _ = checkpoint.load_backbone(straight / 'checkpoint_last.pth')
    assert sd.keys() == sd_ckpt.keys() and all(torch.equal(sd[k], sd_ckpt[k]) for k in sd)
    assert not any(k.startswith(('neck', 'head')) for k in sd) and model.feat_dim == 64
    p = python(REPO / 'eval' / 'knn.py', '--pretrained', straight / 'backbone.pth', data64, '--workers', '0',
               '--device', 'cpu', '--k', '20')
    res = json.loads((straight / 'backbone.pth.knn.json').read_text())
    assert 0 <= res['results']['20']['top1'] <= 100 and res['protocol']['crop_size'] == 32
    assert 'top-1' in p.stdout


def test_defaults_are_the_oss_recipe():
    a = parse_args(['/data'])
    assert (a.arch, a.width, a.crop_size, a.neck_dim) == ('resnet50', 64, 255, 4096)
    assert (a.batch_size, a.lr, a.momentum, a.wd, a.neck_wd) == (512, 0.1, 0.9, 1e-4, 5e-4)
    assert a.lr * a.batch_size / 256 == pytest.approx(0.2)  # OSS: 0.2 for 512 images = 4096 pairs
    assert (a.epochs, a.schedule, a.warmup_epochs, a.warmup_ratio) == (70, [30, 50], 5, 0.1)
    demo = parse_args([])
    assert demo.data.endswith('cifar10_sample') and demo.cifar_stem and demo.crop_size == 32
    assert (demo.arch, demo.width) == ('resnet10', 32) and demo.knn_every > 0
    assert parse_args(['--neck-dim', '64']).neck_dim == 64


def test_startup_errors(data64, tmp_path):
    import relative_loc
    with pytest.raises(SystemExit, match='--crop-size 6 is too small'):
        relative_loc.main([str(data64), *SMALL, '--crop-size', '6', '--output-dir', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='does not exist'):
        relative_loc.main([str(tmp_path / 'nope'), *SMALL, '--output-dir', str(tmp_path / 'o')])



# ---------------------------------------------------------------- --device-aug (BatchedPatchPairs)

@pytest.mark.parametrize('crop, size', [(32, (32, 32)), (96, (60, 45))])
def test_batched_pairs_match_pil(crop, size):
    """BatchedPatchPairs with a set of parameters == the PIL steps with the same parameters (Resize,
    crop at (top, left), grey, the nine patch crops, pairing): PIL rounds its two resize passes and
    its 'L' conversion to uint8 (0.5 level each), the batched path keeps floats, so within 2 levels
    and 0.5 on average. Upsampling (32 -> 38 px) and a non-square source are both covered."""
    from common import batch_aug as B, data
    files = sorted((REPO / 'data' / 'cifar10_sample' / 'train').glob('*/*.jpg'))[::300][:16]
    ims = [Image.open(f).convert('RGB').resize(size) for f in files]
    pp = PatchPairs(crop)
    bp = pp.batched()
    x = torch.stack([data.to_uint8(im) for im in ims])
    params = bp.sample(B.image_sizes(x), torch.Generator().manual_seed(0))
    assert params['gray'].any() and not params['gray'].all()
    out = bp.apply(x, params)
    ref = []
    for i, im in enumerate(ims):
        r = pp.image.transforms[0](im)  # Resize
        top, left = params['tl'][i].tolist()
        r = r.crop((left, top, left + pp.grid, top + pp.grid))
        if params['gray'][i]:
            r = r.convert('L').convert('RGB')
        ps = []
        for c in range(9):
            dy, dx = params['off'][i, c].tolist()
            t, l = (c // 3) * pp.cell + dy, (c % 3) * pp.cell + dx
            ps.append(pp.to_tensor(r.crop((l, t, l + pp.patch, t + pp.patch))))
        ref.append(torch.stack([torch.cat([ps[k], ps[4]]) for k in NEIGHBOURS]))
    ref = torch.stack(ref)
    assert out.shape == ref.shape == (16, 8, 6, pp.patch, pp.patch)
    levels = ((out - ref) * torch.tensor(IMAGENET_STD * 2).view(1, 1, 6, 1, 1) * 255).abs()
    assert levels.max() <= 2 and levels.mean() <= 0.5


def test_batched_pairs_parameter_ranges():
    """RandomCrop offsets uniform over [0, resized - grid], patch offsets uniform over
    [0, cell - patch] per axis, grey with p = 0.66 (20,000 images, 6-sigma bounds)."""
    bp = PatchPairs(255).batched()
    n = 20000
    p = bp.sample(torch.tensor([[300, 400]]).expand(n, 2), torch.Generator().manual_seed(0))
    assert p['out'][0].tolist() == [292, 389]  # torchvision: int(292 * 400 / 300)
    for axis, hi in ((0, 292 - 255), (1, 389 - 255)):
        counts = torch.bincount(p['tl'][:, axis], minlength=hi + 1)
        assert len(counts) == hi + 1 and counts.min() > 0
        assert abs(counts.float().mean() - n / (hi + 1)) < 1e-6
        assert (counts.float() - n / (hi + 1)).abs().max() < 6 * (n / (hi + 1)) ** 0.5
    assert p['off'].min() == 0 and p['off'].max() == 85 - 64
    assert abs(p['gray'].float().mean() - 0.66) < 6 * (0.66 * 0.34 / n) ** 0.5


def test_device_aug_resume_is_exact(data64, tmp_path):
    """relative_loc.py --device-aug memory: 3 steps + resume == 8 steps straight, bitwise."""
    import relative_loc
    args = [data64, *SMALL, '--epochs', '2', '--deterministic', '--device-aug', 'memory']
    (a, b), (la, lb) = stop_and_resume(relative_loc.main, args, tmp_path, 3)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert la == lb and len(la) == 8
