"""common/batch_aug.py against torchvision and PIL, and the --device-aug loaders and training runs.

Distributions: per-sample parameters of the batched samplers vs torchvision's own get_params over
thousands of draws (fixed seeds, so nothing can flake), compared with two-sample Kolmogorov-Smirnov
statistics at the critical value for alpha = 1e-6, and rates of each op vs binomial 6-sigma bounds.
Outputs: with fixed parameters, each op on real CIFAR-10 images vs torchvision's tensor functional
op (float rounding only: 1e-4) and vs the PIL path (bounds derived from PIL's uint8 rounding, stated
at each test).
"""
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from conftest import REPO, SAMPLE, TINY, stop_and_resume

from common import augment, batch_aug as B, data

LEVEL = 1 / 255  # one uint8 step, in [0, 1] units


def ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic (ties allowed)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    v = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, v, 'right') / len(a) - np.searchsorted(b, v, 'right') / len(b)).max()


def ks_crit(n, m, alpha=1e-6):
    return math.sqrt(-math.log(alpha / 2) * (n + m) / (2 * n * m))


def rate_ok(hits, n, p):
    return abs(hits / n - p) <= 6 * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.fixture(scope='module')
def images():
    """24 real CIFAR-10 train images: PIL list and float 24x3x32x32 in [0, 1]."""
    files = sorted((SAMPLE / 'train').glob('*/*.jpg'))[::200][:24]
    pil = [Image.open(f).convert('RGB') for f in files]
    return pil, B.to_float(torch.stack([data.to_uint8(p) for p in pil]))


def from_pil(imgs):
    return B.to_float(torch.stack([data.to_uint8(p) for p in imgs]))


# ---------------------------------------------------------------- parameter distributions

def tv_crops(h, w, scale, ratio, n, seed=0):
    torch.manual_seed(seed)
    img = torch.empty(3, h, w)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize('h, w, scale', [(32, 32, (0.2, 1.0)), (375, 500, (0.08, 1.0)), (12, 120, (0.08, 1.0))])
def test_crop_params_match_torchvision(h, w, scale):
    """Area fraction, log aspect, position and fallback rate of RandomResizedCrop's draws (the 12x120
    image makes most tries fail, so the 10-try loop and the central fallback are exercised)."""
    n, ratio = 3000, (3 / 4, 4 / 3)
    tv = tv_crops(h, w, scale, ratio, n)
    ours = B.crop_params(torch.tensor([[h, w]]).expand(n, 2), scale, ratio, torch.Generator().manual_seed(0)).numpy()
    crit = ks_crit(n, n)
    for p in (tv, ours):
        assert (p[:, 2] > 0).all() and (p[:, 0] + p[:, 2] <= h).all() and (p[:, 1] + p[:, 3] <= w).all()
        assert (p[:, :2] >= 0).all()

    def stats(p):
        return dict(area=p[:, 2] * p[:, 3] / (h * w), aspect=np.log(p[:, 3] / p[:, 2]),
                    top=(p[:, 0] + 0.5) / (h - p[:, 2] + 1), left=(p[:, 1] + 0.5) / (w - p[:, 3] + 1))

    st, so = stats(tv), stats(ours)
    for k in st:
        assert ks(st[k], so[k]) < crit, k
    fb_h, fb_w = h, min(w, round(h * 4 / 3))  # central fallback box
    fb = lambda p: ((p[:, 2] == fb_h) & (p[:, 3] == fb_w) & (p[:, 1] == (w - fb_w) // 2)).mean()  # noqa: E731
    assert abs(fb(tv) - fb(ours)) < 6 * math.sqrt(0.25 / n)
    if w / h > 4 / 3:
        assert fb(tv) > 0.05  # the fallback really is exercised
    # power: the same statistic tells scale (0.2, 1) from (0.08, 1)
    other = tv_crops(h, w, (0.2 if scale[0] < 0.2 else 0.08, 1.0), ratio, n, seed=1)
    assert ks(stats(other)['area'], so['area']) > crit


def test_jitter_params_match_torchvision():
    """Factor ranges and uniformity, and a uniformly random order of the four ops per sample."""
    cj = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    n = 4000
    torch.manual_seed(0)
    tv = [cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(n)]
    tv_f = np.array([t[1:] for t in tv])
    tv_o = np.array([t[0].tolist() for t in tv])
    f, order = B.jitter_params(n, cj.brightness, cj.contrast, cj.saturation, cj.hue, torch.Generator().manual_seed(0))
    f, order = f.numpy(), order.numpy()
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= f[:, k].min() and f[:, k].max() <= hi
        assert ks(f[:, k], tv_f[:, k]) < ks_crit(n, n)
    assert (np.sort(order, 1) == np.arange(4)).all()
    for o in (order, tv_o):  # each op at each position with probability 1/4
        for pos in range(4):
            for op in range(4):
                assert rate_ok(((o[:, pos]) == op).sum(), n, 0.25)


# recipe -> (crop scale, interpolation, flip p, [(step, p, extra)]) as the papers state them
EXPECTED = {
    'moco_v1': (augment.moco_v1(224), (0.2, 1.0), 'bilinear',
                [('Gray', 0.2, None), ('Jitter', 1.0, [[0.6, 1.4], [0.6, 1.4], [0.6, 1.4], [-0.4, 0.4]])]),
    'moco_v2': (augment.moco_v2(224), (0.2, 1.0), 'bilinear',
                [('Jitter', 0.8, [[0.6, 1.4], [0.6, 1.4], [0.6, 1.4], [-0.1, 0.1]]), ('Gray', 0.2, None),
                 ('Blur', 0.5, (0.1, 2.0))]),
    'simclr': (augment.simclr(224), (0.08, 1.0), 'bilinear',
               [('Jitter', 0.8, [[0.2, 1.8], [0.2, 1.8], [0.2, 1.8], [-0.2, 0.2]]), ('Gray', 0.2, None),
                ('Blur', 0.5, (0.1, 2.0))]),
    'byol1': (augment.byol(224, 1), (0.08, 1.0), 'bicubic',
              [('Jitter', 0.8, [[0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]]), ('Gray', 0.2, None),
               ('Blur', 1.0, (0.1, 2.0))]),
    'byol2': (augment.byol(224, 2), (0.08, 1.0), 'bicubic',
              [('Jitter', 0.8, [[0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]]), ('Gray', 0.2, None),
               ('Blur', 0.1, (0.1, 2.0)), ('Solarize', 0.2, None)]),
    'deepcluster': (augment.deepcluster(224), (0.08, 1.0), 'bilinear',
                    [('Rotate', 1.0, (-2.0, 2.0)), ('Jitter', 1.0, [[0.6, 1.4], [0.6, 1.4], [0.0, 2.0], [-0.5, 0.5]]),
                     ('Gray', 0.2, None)]),
    'moco_v2_32': (augment.moco_v2(32, blur=False), (0.2, 1.0), 'bilinear',
                   [('Jitter', 0.8, [[0.6, 1.4], [0.6, 1.4], [0.6, 1.4], [-0.1, 0.1]]), ('Gray', 0.2, None)]),
}


@pytest.mark.parametrize('name', list(EXPECTED))
def test_recipes_match_augment(name):
    """from_transform reads each PIL recipe into the same steps, order, probabilities and ranges, and
    the sampled per-sample rates match them (20,000 draws, 6-sigma binomial bounds)."""
    t, scale, interp, steps = EXPECTED[name]
    r = B.from_transform(t)
    assert (r.crop.scale, r.crop.ratio, r.crop.interpolation, r.crop.flip_p) == (scale, (3 / 4, 4 / 3), interp, 0.5)
    assert r.crop.size == ((224, 224) if '32' not in name else (32, 32))
    assert (r.mean, r.std) == (augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    assert [type(o).__name__ for o in r.ops] == [s[0] for s in steps]
    n = 20000
    params = r.sample(torch.tensor([[375, 500]]).expand(n, 2), torch.Generator().manual_seed(0))
    assert rate_ok(int(params[0]['flip'].sum()), n, 0.5)
    for op, p, (kind, prob, extra) in zip(r.ops, params[1:], steps):
        assert op.p == pytest.approx(prob)
        assert rate_ok(int(p['on'].sum()), n, prob), kind
        if kind == 'Jitter':
            assert np.allclose([list(x) for x in op.ranges], extra)
        if kind == 'Blur':
            assert op.sigma == extra
            assert extra[0] <= p['sigma'].min() and p['sigma'].max() <= extra[1]
            assert ks(p['sigma'], np.random.default_rng(0).uniform(*extra, n)) < ks_crit(n, n)
        if kind == 'Rotate':  # torchvision RandomRotation.get_params: U(-2, 2) degrees
            assert op.degrees == extra
            torch.manual_seed(0)
            tv = [T.RandomRotation.get_params(list(extra)) for _ in range(n)]
            assert extra[0] <= p['angle'].min() and p['angle'].max() <= extra[1]
            assert ks(p['angle'], tv) < ks_crit(n, n)


def test_rotation_recipe_and_refusals():
    import rotation
    r = B.from_transform(rotation.rotation_augmentation(32))
    assert (r.crop.scale, r.crop.flip_p, r.ops) == ((0.08, 1.0), 0.5, [])
    with pytest.raises(ValueError, match='RandomRotation has a batched equivalent only with nearest'):
        B.from_transform(T.Compose([T.RandomResizedCrop(32), T.RandomRotation(2, expand=True)]))
    with pytest.raises(ValueError, match='RandomPerspective has no batched equivalent'):
        B.from_transform(T.Compose([T.RandomResizedCrop(32), T.RandomPerspective()]))
    with pytest.raises(ValueError, match='RandomHorizontalFlip after RandomRotation'):
        B.from_transform(T.Compose([T.RandomResizedCrop(32), T.RandomRotation(2), T.RandomHorizontalFlip()]))
    mv = B.from_transform(augment.MultiView(augment.byol(32, 1), augment.byol(32, 2)))
    assert mv.n_views == 2 and [len(v.ops) for v in mv.recipes] == [3, 4]


# ---------------------------------------------------------------- fixed parameters vs torchvision / PIL

def test_resized_crop_flip(images):
    """Crop + resize + flip: bilinear equals torchvision's tensor resized_crop(antialias=True) to float
    rounding, up- and down-scaling; bilinear and bicubic are within 1.25/255 of PIL, whose two passes
    each round to uint8 (0.5 level at the end + 0.5 level times the vertical taps' sum of |w|, 1 for
    bilinear and <= 1.25 for bicubic a = -0.5; PIL is also what torchvision runs on PIL images)."""
    pil, x = images
    n = len(pil)
    g = torch.Generator().manual_seed(0)
    flip = B.bernoulli(n, 0.5, g)
    big = [p.resize((96, 80), Image.BICUBIC) for p in pil]  # a larger source, so 32 px output reduces
    for src_pil, src, size in ((pil, x, 32), (big, from_pil(big), 32), (pil, x, 48)):
        boxes = B.crop_params(B.image_sizes(src), (0.08, 1.0), (3 / 4, 4 / 3), g)
        for kind, mode in (('bilinear', T.InterpolationMode.BILINEAR), ('bicubic', T.InterpolationMode.BICUBIC)):
            out = B.resized_crop(src, boxes, (size, size), kind, flip)
            ref = from_pil([TF.resized_crop(p, *b.tolist(), [size, size], mode) for p, b in zip(src_pil, boxes)])
            ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
            assert (out - ref).abs().max() <= 1.25 * LEVEL, (kind, size)
            if kind == 'bilinear':
                tv = torch.stack([TF.resized_crop(s, *b.tolist(), [size, size], mode, antialias=True)
                                  for s, b in zip(src, boxes)])
                tv = torch.where(flip.view(-1, 1, 1, 1), tv.flip(-1), tv)
                assert (out - tv).abs().max() < 1e-4
    # a list of differently sized images gives the same as each one alone
    lst = [x[0], from_pil(big[1:2])[0]]
    boxes = torch.tensor([[1, 2, 20, 25], [5, 7, 60, 70]])
    out = B.resized_crop(lst, boxes, (32, 32), 'bilinear', torch.tensor([True, False]))
    assert torch.equal(out[1], B.resized_crop(lst[1][None], boxes[1:], (32, 32))[0])


def test_color_ops(images):
    """Brightness, contrast, saturation, hue, grayscale, solarize with per-sample factors equal
    torchvision's tensor ops on each image alone (1e-4). Against PIL: blends within 1.5/255 (PIL
    truncates the blend to uint8, <= 1 level, and blends with a uint8 grey, <= 0.5 |1 - f|, f in
    [0.2, 1.8]); grayscale within 1/255 (PIL rounds; weights 0.299 vs 0.2989); solarize equal; hue
    within 16/255 and 1/255 on average: torchvision's PIL hue rounds H to 8 bits (1/255 turn per
    step, 0.5 step), truncates the shift to whole steps (< 1 step) and wraps at 256 not 255 steps
    (1 step); 2.5 steps move a saturated channel by 2.5 x 6 = 15 levels."""
    pil, x = images
    n = len(pil)
    g = torch.Generator().manual_seed(1)
    f = B.uniform(n, 0.2, 1.8, g)
    for ours, tf in ((B.adjust_brightness, TF.adjust_brightness), (B.adjust_contrast, TF.adjust_contrast),
                     (B.adjust_saturation, TF.adjust_saturation)):
        out = ours(x, f)
        assert (out - torch.stack([tf(x[i], f[i].item()) for i in range(n)])).abs().max() < 1e-4
        assert (out - from_pil([tf(pil[i], f[i].item()) for i in range(n)])).abs().max() <= 1.5 * LEVEL
    h = B.uniform(n, -0.5, 0.5, g)
    out = B.adjust_hue(x, h)
    assert (out - torch.stack([TF.adjust_hue(x[i], h[i].item()) for i in range(n)])).abs().max() < 1e-4
    d = (out - from_pil([TF.adjust_hue(pil[i], h[i].item()) for i in range(n)])).abs()
    assert d.max() <= 16 * LEVEL and d.mean() <= LEVEL
    gray = B.rgb_to_gray(x).expand_as(x)
    assert (gray - TF.rgb_to_grayscale(x, 3)).abs().max() < 1e-6
    assert (gray - from_pil([TF.rgb_to_grayscale(p, 3) for p in pil])).abs().max() <= LEVEL
    assert torch.equal(B.solarize(x), TF.solarize(x, 128 / 255))
    assert (B.solarize(x) - from_pil([ImageOps.solarize(p, 128) for p in pil])).abs().max() < 1e-6  # 1 - x/255
    m, s = augment.IMAGENET_MEAN, augment.IMAGENET_STD
    assert (B.normalize(x, m, s) - TF.normalize(x, m, s)).abs().max() < 1e-6


def test_jitter_step_follows_order(images):
    """The ColorJitter step applies each sample's own order of the four ops (vs torchvision's
    functional ops called in that order, on tensors)."""
    _, x = images
    n = len(x)
    step = B.Jitter([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], [-0.4, 0.4], p=0.5)
    p = step.sample(n, torch.Generator().manual_seed(2))
    out = step.apply(x, p)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        ref = x[i]
        if p['on'][i]:
            for op in p['order'][i].tolist():
                ref = fns[op](ref, p['factors'][i, op].item())
        assert (out[i] - ref).abs().max() < 1e-4


def test_blur_matches_pil(images):
    """Per-sample PIL GaussianBlur(radius=sigma): the same three box passes per axis with the edge
    repeated, so within 3/255 of PIL (six passes that each round to uint8, <= 0.5 level each; the
    box kernels are positive and sum to 1, so errors do not grow) and within 1/255 on average."""
    pil, x = images
    sigma = torch.linspace(0.1, 2.0, len(pil))
    out = B.box_blur(x, sigma)
    d = (out - from_pil([p.filter(ImageFilter.GaussianBlur(s.item())) for p, s in zip(pil, sigma)])).abs()
    assert d.max() <= 3 * LEVEL and d.mean() <= LEVEL


def test_rotate_matches_pil(images):
    """RandomRotation's PIL rotate (nearest, centre, black fill) per sample: the same source pixel
    except where PIL's 16.16 fixed-point coordinates round across a pixel border (here at most 0.5%
    of an image's pixels, about 0.02% overall); angle 0 is exact. Checked at a non-square size too."""
    pil, x = images
    for h, w in ((32, 32), (35, 29)):
        ims = [p.resize((w, h)) for p in pil]
        xs = from_pil(ims)
        angle = torch.linspace(-30, 30, len(ims))
        angle[0] = 0.0
        out = B.rotate(xs, angle)
        ref = from_pil([TF.rotate(p, a.item()) for p, a in zip(ims, angle)])
        differ = (out != ref).any(1).float().mean((1, 2))  # fraction of pixels per image
        assert differ[0] == 0 and differ.max() <= 0.005 and differ.mean() <= 0.001, differ
        assert (out[1:] == 0).all(1).any()  # corners filled black


def test_rotate90(images):
    _, x = images
    k = torch.arange(len(x)) % 4
    out = B.rotate90(x, k)
    for i in range(len(x)):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), (1, 2)))


def test_whole_view_vs_pil_path(images):
    """BYOL view 2 (every op: bicubic crop, flip, jitter, grey, blur, solarize) with the batched
    sampler's parameters, replayed through torchvision's PIL functional ops: mean difference within
    2/255 (PIL truncates each of the three blends to uint8, a bias of 0.5 level each on average), 99%
    of values within 8/255 (solarize can flip a pixel near 128 between the two, so no max bound).
    Before normalisation."""
    pil, x = images
    big = [p.resize((96, 96), Image.BICUBIC) for p in pil]
    r = B.from_transform(augment.byol(64, 2))
    r.mean = None
    r.ops[2].p = r.ops[3].p = 0.5  # blur and solarize more often than the recipe, to test them
    n = len(big)
    params = r.sample(B.image_sizes(from_pil(big)), torch.Generator().manual_seed(3))
    out = r.apply(from_pil(big), params)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for i in range(n):
        im = TF.resized_crop(big[i], *params[0]['box'][i].tolist(), [64, 64], T.InterpolationMode.BICUBIC)
        im = TF.hflip(im) if params[0]['flip'][i] else im
        if params[1]['on'][i]:
            for op in params[1]['order'][i].tolist():
                im = fns[op](im, params[1]['factors'][i, op].item())
        im = TF.rgb_to_grayscale(im, 3) if params[2]['on'][i] else im
        im = im.filter(ImageFilter.GaussianBlur(params[3]['sigma'][i].item())) if params[3]['on'][i] else im
        ref.append(ImageOps.solarize(im, 128) if params[4]['on'][i] else im)
    d = (out - from_pil(ref)).abs()
    assert d.mean() <= 2 * LEVEL and torch.quantile(d.flatten(), 0.99) <= 8 * LEVEL


def test_reproducible():
    r = B.from_transform(augment.MultiView(augment.simclr(32), augment.simclr(32)))
    x = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    a = r(x, torch.Generator().manual_seed(5))
    b = r(x, torch.Generator().manual_seed(5))
    c = r(x, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views draw different parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_equals_cpu(images):
    """The same CPU generator gives the same views on CUDA as on the CPU (float rounding only)."""
    _, x = images
    u8 = (x * 255).round().to(torch.uint8)
    for t in (augment.byol(48, 1), augment.byol(48, 2), augment.moco_v1(32), augment.simclr(64)):
        r = B.from_transform(t)
        cpu = r(u8, torch.Generator().manual_seed(0))
        gpu = r(u8.cuda(), torch.Generator().manual_seed(0))
        assert (gpu.cpu() - cpu).abs().max() < 1e-2  # normalised units; TF32 convolutions keep 10 mantissa bits


# ---------------------------------------------------------------- loaders

def test_device_loaders(data64, tmp_path):
    """memory / files / jpeg loaders: the PIL loader's structure and sample order, equal outputs
    (decode_jpeg may differ from PIL's decoder by a level or two), resume from any iteration, rank
    shards that make up the global batch, one-line errors."""
    aug = augment.moco_v2(32, blur=False)
    cpu = torch.device('cpu')
    _, ps, pil_loader = data.train_loader(data64, augment.MultiView(aug, aug), 16, 0, 1, 0, 0, cpu)
    ps.set_epoch(1)
    pil_first = next(iter(pil_loader))
    out = {}
    for mode in ('memory', 'files', 'jpeg'):
        ds, s, loader = data.train_loader(data64, augment.MultiView(aug, aug), 16, 0, 1, 0, 0, cpu, mode)
        assert len(ds) == 64 and s.iters == 4
        s.set_epoch(1)
        out[mode] = list(loader)
        assert len(out[mode]) == len(loader) == 4
        views, labels, idx = out[mode][0]
        assert isinstance(views, list) and len(views) == 2 and views[0].shape == pil_first[0][0].shape
        assert views[0].dtype == torch.float32 and torch.equal(idx, pil_first[2]) and torch.equal(labels, pil_first[1])
        s.set_epoch(1, 2)  # resume at iteration 2
        rest = list(loader)
        assert len(rest) == 2 and all(torch.equal(a[0][0], b[0][0]) for a, b in zip(rest, out[mode][2:]))
    for a, b, c in zip(out['memory'], out['files'], out['jpeg']):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
        assert (a[0][0] - c[0][0]).abs().mean() < 0.05  # normalised units
    # two ranks of a 2-process run hold the halves of the global batch
    halves = []
    for rank in (0, 1):
        _, s, loader = data.train_loader(data64, aug, 16, rank, 2, 0, 0, cpu, 'memory')
        s.set_epoch(1)
        halves.append(next(iter(loader))[2])
    assert sorted(torch.cat(halves).tolist()) == sorted(pil_first[2].tolist())
    with pytest.raises(SystemExit, match='RandomPerspective has no batched equivalent; drop --device-aug'):
        data.train_loader(data64, T.Compose([T.RandomResizedCrop(32), T.RandomPerspective()]), 16, 0, 1, 0, 0, cpu,
                          'memory')
    # differently sized images: refused in memory, a list batch in files mode
    root = tmp_path / 'mixed'
    root.mkdir()
    for i, size in enumerate([(32, 32), (40, 30)] * 4):
        Image.new('RGB', size, (i * 20, 50, 90)).save(root / f'{i}.png')
    with pytest.raises(SystemExit, match=r'--device-aug memory needs images of one size: .*1.png is 40x30'):
        data.train_loader(root, aug, 4, 0, 1, 0, 0, cpu, 'memory')
    _, s, loader = data.train_loader(root, aug, 4, 0, 1, 0, 0, cpu, 'files')
    assert next(iter(loader))[0].shape == (4, 3, 32, 32)
    with pytest.raises(RuntimeError, match='cannot decode .*png as JPEG'):
        next(iter(data.train_loader(root, aug, 4, 0, 1, 0, 0, cpu, 'jpeg')[2]))


def _prefetch_threads():
    import threading
    return [t for t in threading.enumerate() if t.name == 'selfsup-aug-prefetch']


def test_prefetched_loader(data64):
    """--aug-prefetch: batches made ahead by a background thread are those made in the loop, bitwise,
    also from a resumed iteration; leaving the loop early stops the thread (with DataLoader workers
    inside it), and an error in the thread is raised in the loop."""
    aug = augment.MultiView(augment.moco_v2(32, blur=False), augment.byol(32, 2, blur=False))
    cpu = torch.device('cpu')
    for mode, workers in (('memory', 0), ('files', 2)):
        runs = {}
        for depth in (0, 2):
            _, s, loader = data.train_loader(data64, aug, 16, 0, 1, 0, workers, cpu, mode, prefetch=depth)
            s.set_epoch(2, 1)  # resumed at iteration 1
            runs[depth] = list(loader)
            assert len(runs[depth]) == 3
        for a, b in zip(runs[0], runs[2]):
            assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[2], b[2])
        it = iter(loader)
        next(it)
        assert len(_prefetch_threads()) == 1
        it.close()  # what leaving a for loop early does
        assert not _prefetch_threads()

    _, s, loader = data.train_loader(data64, aug, 16, 0, 1, 0, 0, cpu, 'memory', prefetch=1)
    calls = []

    def failing(images, gen):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError('broken recipe')
        return aug_fn(images, gen)
    aug_fn, loader.recipe = loader.recipe, failing
    it = iter(loader)
    next(it)
    with pytest.raises(ValueError, match='broken recipe'):
        next(it)
    assert not _prefetch_threads()


# ---------------------------------------------------------------- training with --device-aug

SMALL = TINY + ['--batch-size', '16', '--moco-k', '32', '--bn-splits', '2']


def train_records(d):
    return [json.loads(line) for line in open(d / 'log.jsonl') if '"train"' in line]


def test_moco_device_aug_resume_is_exact(data64, tmp_path):
    """moco --device-aug memory, batches made ahead by the prefetch thread: 2 steps + resume + 2 steps
    == 4 steps straight, bitwise."""
    import moco
    (a, b), (la, lb) = stop_and_resume(moco.main, [data64, *SMALL, '--epochs', '1', '--deterministic',
                                                   '--device-aug', 'memory', '--aug-prefetch', '2'], tmp_path, 2)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert len(la) == 4 and la == lb


def test_byol_simclr_rotation_npid_smoke(data64, tmp_path):
    """Two steps of each method with --device-aug files (moco, odc, deepcluster and relative_loc have
    their own resume tests on --device-aug memory)."""
    import byol
    import npid
    import relative_loc
    import rotation
    import simclr
    tiny = [a for a in TINY if a not in ('--moco-dim', '16')]
    runs = [(byol, ['--batch-size', '16', '--hidden-dim', '32', '--dim', '16', '--blur']),
            (simclr, ['--batch-size', '16', '--proj-dim', '16']),
            (rotation, ['--batch-size', '16']),
            (npid, ['--batch-size', '16', '--npid-k', '32', '--npid-dim', '16']),
            (relative_loc, ['--batch-size', '16', '--neck-dim', '32'])]
    for mod, extra in runs:
        out = tmp_path / mod.__name__
        mod.main([str(data64), *tiny, *extra, '--epochs', '1', '--max-steps', '2', '--device-aug', 'files',
                  '--output-dir', str(out)])
        recs = train_records(out)
        assert len(recs) == 2 and all(math.isfinite(r['loss']) for r in recs), mod.__name__


@pytest.mark.parametrize('method', ['odc', 'deepcluster'])
def test_odc_deepcluster_device_aug_resume_is_exact(method, data64, tmp_path):
    """ODC and DeepCluster (their own samplers: with replacement / uniform over clusters; the recipe
    with the 2-degree rotation) on --device-aug memory, batches from the prefetch thread across the
    epochs: 3 steps + resume == 8 steps straight, bitwise."""
    import importlib
    mod = importlib.import_module(method)
    small = ['--arch', 'resnet10', '--width', '8', '--cifar-stem', '--crop-size', '32', '--workers', '0',
             '--print-freq', '1', '--seed', '0', '--batch-size', '16', '--num-clusters', '8']
    small += ['--min-cluster', '6'] if method == 'odc' else ['--pca-dim', '16']
    args = [data64, *small, '--epochs', '2', '--deterministic', '--device-aug', 'memory', '--aug-prefetch', '1']
    (a, b), (la, lb) = stop_and_resume(mod.main, args, tmp_path, 3)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert la == lb and len(la) == 8 and all(math.isfinite(v) for v in la)


@pytest.mark.parametrize('method', ['moco', 'simclr', 'byol'])
def test_bf16_autocast_loss(method):
    """bf16 autocast changes each contrastive loss on one batch (ResNet-10 at initialisation, batched
    views) by < 2% of its value vs fp32: bf16 keeps 8 mantissa bits, ~0.4% per rounding, and the
    losses are means over the batch (MoCo and SimCLR divide the logits by T = 0.2 / 0.5)."""
    from common.resnet import build_resnet
    torch.manual_seed(0)
    if method == 'moco':
        from moco import MoCo
        model = MoCo(lambda num_classes: build_resnet('resnet10', num_classes, 16, True), 32, 64, 0.99, 0.2, True)
        loss_fn = lambda q, k: torch.nn.functional.cross_entropy(*[t.float() if t.is_floating_point() else t
                                                                   for t in model(q, k)])
    elif method == 'simclr':
        from simclr import SimCLR, interleave, projection_head
        backbone = build_resnet('resnet10', 0, 16, True)
        model = SimCLR(backbone, projection_head(backbone.feat_dim, backbone.feat_dim, 32), 0.5)
        loss_fn = lambda q, k: torch.nn.functional.cross_entropy(*[t.float() if t.is_floating_point() else t
                                                                   for t in model(interleave([q, k]))])
    else:
        from byol import BYOL
        model = BYOL(build_resnet('resnet10', 0, 16, True), hidden_dim=64, dim=32)
        loss_fn = lambda q, k: model(q, k).float()
    r = B.from_transform(augment.MultiView(augment.moco_v2(32, False), augment.moco_v2(32, False)))
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    q, k = r(x, torch.Generator().manual_seed(0))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    losses = []
    for amp in (False, True):
        model.load_state_dict(state)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            losses.append(loss_fn(q, k).item())
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.02 * abs(losses[0]), losses


def test_bench_cifar_smoke(data64, tmp_path):
    """scripts/bench_cifar.py end to end on CPU: one tiny epoch of MoCo, kNN at the end."""
    from conftest import python
    p = python(REPO / 'scripts' / 'bench_cifar.py', data64, '--methods', 'moco', '--epochs', '1', '--tiny',
               '--workers', '0', '--output-dir', tmp_path)
    rows = json.load(open(tmp_path / 'bench_cifar.json'))['results']
    assert [r['method'] for r in rows] == ['moco'] and rows[0]['img_s'] > 0 and rows[0]['knn_top1'] is not None
    assert 'kNN top-1' in p.stdout


def test_kernel_count_budget():
    """Eager GPU cost in launches (scripts/bench_augment.py --count-kernels): a crop-only view (two
    weight matrices, two products, normalise) stays under 80 image-sized ops and a MoCo v2 view under
    250 (it was 359 before ColorJitter was rewritten: four positions of ~35 ops, a blend and the hue on
    the subset whose op it is)."""
    import rotation
    from scripts.bench_augment import count_kernels
    crop_only = count_kernels(B.from_transform(rotation.rotation_augmentation(32)), 32)
    moco = count_kernels(B.from_transform(augment.moco_v2(32, blur=False)), 32)
    assert 0 < crop_only < 80 and crop_only < moco < 250, (crop_only, moco)


def test_compiled_recipe_equals_eager(images, data64):
    """--compile with --device-aug: Recipe.compiled() draws the same parameters (CPU generator) and,
    computing every op for all samples and selecting (fixed shapes, fixed blur width), gives the
    eager views to float rounding (fused kernels sum in another order); a loader's compile() swaps
    in the compiled recipe. BYOL's two views cover blur, solarize and grey; DeepCluster's rotation."""
    _, x = images
    u8 = (x * 255).round().to(torch.uint8)
    for t in (augment.MultiView(augment.byol(32, 1), augment.byol(32, 2)), augment.deepcluster(24)):
        r = B.from_transform(t)
        eager, comp = r(u8, torch.Generator().manual_seed(1)), r.compiled()(u8, torch.Generator().manual_seed(1))
        eager, comp = (v if isinstance(v, list) else [v] for v in (eager, comp))
        for a, b in zip(eager, comp):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    aug = augment.moco_v2(32, blur=False)
    _, s, loader = data.train_loader(data64, aug, 16, 0, 1, 0, 0, torch.device('cpu'), 'memory')
    s.set_epoch(0)
    ref = next(iter(loader))[0]
    loader.compile()
    assert isinstance(loader.recipe, B.CompiledRecipe)
    assert (next(iter(loader))[0] - ref).abs().max() < 1e-4
