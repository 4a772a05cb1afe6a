"""Batched augmentation on the device the model runs on (CUDA or CPU): one call per batch, with
independent random parameters per sample, for the recipes of common/augment.py (issue 8).

Input: uint8 RGB images, an NxCxHxW tensor (one size) or a list of CxHxW tensors (any sizes).
Output: float32 NxCxSxS, normalised; for a MultiView, a list with one such batch per view, S and
every range and probability its own (multi-crop: 2 global + N local views of two sizes, what the
PIL DataLoader's default collate makes of a list of per-view tensors). A recipe is built from the
very torchvision pipeline the PIL path uses, `from_transform(augment.moco_v2(224))`, so the
order, probabilities and ranges cannot drift from it; an op without a batched equivalent is refused
with its name.

Randomness: every parameter is drawn from the torch.Generator passed in, on that generator's device
(a CPU generator gives the same augmentation on every device); `sample()` returns the per-sample
parameters and `apply()` uses them, so tests can inject either. Per op, as torchvision draws them:
  * RandomResizedCrop: torchvision's get_params per sample (10 tries of area ~ U(scale) x source
    area and log-aspect ~ U(log ratio), w/h rounded half-to-even, accepted if the crop fits, offsets
    uniform integers; else the central fallback); flip ~ Bernoulli(p);
  * ColorJitter: brightness/contrast/saturation factors ~ U(max(0, 1 - x), 1 + x), hue ~ U(-x, x), a
    uniformly random order of the four per sample (torchvision's randperm(4));
  * RandomApply / RandomGrayscale: Bernoulli(p) per sample; blur sigma ~ U(sigma_min, sigma_max).

How each op corresponds to torchvision / PIL, and where it differs:
  * crop + resize + flip is one separable resampling per sample, out = Wy X Wx^T, with PIL's filter
    weights (bilinear support 1, bicubic a = -0.5; support widened by the scale when reducing, i.e.
    antialiased) computed over the crop only, exactly as PIL resizes the cropped image. The flip
    reverses Wx's rows; every later op is flip-equivariant (pointwise, or a symmetric blur), so
    folding the flip into the resampling changes nothing. Equals torchvision's tensor
    `resized_crop(..., antialias=True)` to float rounding; PIL also rounds to uint8 after each of its
    two passes (and uses 22-bit fixed-point weights), hence <= 1.25/255 from the PIL path.
  * ColorJitter / grayscale / solarize: torchvision's tensor formulas on float images in [0, 1]
    (blend with 0, the grey mean or the grey image, clamped; hue rotated in HSV; grey = 0.2989 R +
    0.587 G + 0.114 B; solarize x >= 128/255 -> 1 - x). The PIL path rounds to uint8 after every op
    and shifts hue on an 8-bit H channel; we keep floats until the end (no intermediate rounding).
  * Gaussian blur: common.augment.GaussianBlur is PIL's GaussianBlur(radius=sigma), which is not a
    sampled Gaussian but three box blurs per axis whose combined standard deviation is sigma, the
    edge pixel repeated in each pass. We run the same passes with the same fixed-point taps (at most
    5 taps for sigma <= 2), in float: a true Gaussian of the same sigma differs from PIL by up to
    11/255 inside the image (small sigma: PIL's 3-box kernel has heavier tails) and 30/255 at the
    border (reflect vs repeated edge), which is why it is not used.
"""
import functools

import torch
import torch.nn.functional as F
import torchvision.transforms as T

from . import augment

# ---------------------------------------------------------------- per-sample parameter samplers

def to_device(t, device, dtype=None):
    """t on `device` (as `dtype`) without a host-device sync: a CPU tensor bound for CUDA goes through
    pinned memory asynchronously (a plain .to() waits until the GPU has drained its queue, so the CPU
    could not run ahead of it)."""
    if device.type == 'cuda' and t.device.type == 'cpu':
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)


def uniform(n, lo, hi, gen):
    """N floats ~ U(lo, hi) on gen's device."""
    return torch.empty(n, device=gen.device).uniform_(lo, hi, generator=gen)


def bernoulli(n, p, gen):
    """N bools, True with probability p (torchvision: `torch.rand(1) < p`)."""
    return torch.rand(n, device=gen.device, generator=gen) < p


def crop_params(sizes, scale, ratio, gen):
    """torchvision RandomResizedCrop.get_params for each of the N source sizes (Nx2 (H, W) ints):
    returns Nx4 int64 (top, left, height, width)."""
    sizes = sizes.to(gen.device, torch.float64)
    n = sizes.shape[0]
    hgt, wid = sizes[:, :1], sizes[:, 1:]
    area = hgt * wid
    s = torch.empty(n, 10, device=gen.device).uniform_(scale[0], scale[1], generator=gen).double()
    log_r = torch.log(torch.tensor(ratio))
    a = torch.exp(torch.empty(n, 10, device=gen.device).uniform_(log_r[0], log_r[1], generator=gen)).double()
    w = torch.round(torch.sqrt(area * s * a))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(area * s / a))
    ok = (w > 0) & (w <= wid) & (h > 0) & (h <= hgt)  # Nx10
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)  # first accepted try, -1: none
    pick = first.clamp(min=0).unsqueeze(1)
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    u = torch.rand(n, 2, device=gen.device, generator=gen, dtype=torch.float64)
    hgt, wid = hgt.squeeze(1), wid.squeeze(1)
    top = torch.floor(u[:, 0] * (hgt - h + 1)).clamp(max=hgt - h)
    left = torch.floor(u[:, 1] * (wid - w + 1)).clamp(max=wid - w)
    # fallback: central crop of the aspect ratio clamped into `ratio`
    in_ratio = wid / hgt
    lo, hi = min(ratio), max(ratio)
    fw = torch.where(in_ratio > hi, torch.round(hgt * hi), wid)
    fh = torch.where(in_ratio < lo, torch.round(wid / lo), hgt)
    none = first < 0
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    top = torch.where(none, torch.div(hgt - h, 2, rounding_mode='floor'), top)
    left = torch.where(none, torch.div(wid - w, 2, rounding_mode='floor'), left)
    return torch.stack([top, left, h, w], 1).long()


def jitter_params(n, brightness, contrast, saturation, hue, gen):
    """torchvision ColorJitter.get_params for N samples: (factors Nx4 float (b, c, s, h), order Nx4
    int64, a random permutation of 0..3 per row: 0 brightness, 1 contrast, 2 saturation, 3 hue).
    A range of None gives the identity factor (1, or 0 for hue)."""
    order = torch.rand(n, 4, device=gen.device, generator=gen).argsort(1)
    cols = []
    for rng, ident in ((brightness, 1.0), (contrast, 1.0), (saturation, 1.0), (hue, 0.0)):
        cols.append(torch.full((n,), ident, device=gen.device) if rng is None else uniform(n, *rng, gen))
    return torch.stack(cols, 1), order


# ---------------------------------------------------------------- functional ops (float NxCxHxW in [0, 1])

def _pil_filter(x, kind):
    """PIL's resampling filters (Resample.c): triangle for bilinear, Keys cubic a = -0.5 for bicubic."""
    x = x.abs()
    if kind == 'bilinear':
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


SUPPORT = {'bilinear': 1.0, 'bicubic': 2.0}


def resample_weights(start, length, in_size, out_size, kind='bilinear', flip=None):
    """N x out_size x in_size weights that resize the crop [start, start + length) of each row of
    in_size pixels to out_size pixels as PIL does (precompute_coeffs: centre (x + 0.5) * scale in the
    crop, support x max(scale, 1), taps clipped to the crop, weights normalised); rows reversed where
    `flip`."""
    start, length = start.double(), length.double()
    scale = (length / out_size)[:, None, None]  # Nx1x1
    fscale = scale.clamp(min=1)
    support = SUPPORT[kind] * fscale
    center = (torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5)[None, :, None] * scale
    p = torch.arange(in_size, dtype=torch.float64, device=start.device)[None, None, :] - start[:, None, None]
    lo = torch.trunc(center - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length[:, None, None])
    w = _pil_filter((p - center + 0.5) / fscale, kind) * ((p >= lo) & (p < hi))
    w = w / w.sum(-1, keepdim=True)
    if flip is not None:
        w = torch.where(flip.view(-1, 1, 1), w.flip(1), w)
    return w.float()


def to_float(images):
    """uint8 -> float32 in [0, 1]: a tensor, or each tensor of a list."""
    if isinstance(images, (list, tuple)):
        return [to_float(x) for x in images]
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def resized_crop(images, boxes, size, kind='bilinear', flip=None):
    """Crops boxes (Nx4 top, left, height, width) of the N images (float NxCxHxW, or a list of
    CxHxW) and resizes them to size (h, w) with PIL's filters, flipping where `flip` (N bools):
    horizontal pass then vertical pass, each clamped to [0, 1] as PIL clips to uint8."""
    if isinstance(images, (list, tuple)):  # any sizes: one sample at a time
        return torch.cat([resized_crop(x[None], boxes[i:i + 1], size, kind, None if flip is None else flip[i:i + 1])
                          for i, x in enumerate(images)])
    boxes = to_device(boxes, images.device)
    if flip is not None:
        flip = to_device(flip, images.device)
    _, _, hgt, wid = images.shape
    wy = resample_weights(boxes[:, 0], boxes[:, 2], hgt, size[0], kind)[:, None]  # Nx1xSHxH
    wx = resample_weights(boxes[:, 1], boxes[:, 3], wid, size[1], kind, flip)[:, None]  # Nx1xSWxW
    x = (images @ wx.transpose(-1, -2)).clamp_(0, 1)  # NxCxHxSW
    return (wy @ x).clamp_(0, 1)  # NxCxSHxSW


def _per_sample(v, x):
    return to_device(v, x.device, x.dtype).view(-1, 1, 1, 1)


_CONSTS = {}


def _const(values, x):
    """A small constant tensor on x's device and dtype, made once (no copy per batch)."""
    key = (tuple(values), x.device, x.dtype)
    if key not in _CONSTS:
        _CONSTS[key] = torch.tensor(values, dtype=x.dtype).to(x.device)
    return _CONSTS[key]


def rgb_to_gray(x):
    """Nx3xHxW -> Nx1xHxW, torchvision's weights (ITU-R 601-2 luma)."""
    return (x * _const((0.2989, 0.587, 0.114), x).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _blend(x, ref, f):
    return (f * x + (1.0 - f) * ref).clamp(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), _per_sample(f, x))


def adjust_contrast(x, f):
    return _blend(x, rgb_to_gray(x).mean((1, 2, 3), keepdim=True), _per_sample(f, x))


def adjust_saturation(x, f):
    return _blend(x, rgb_to_gray(x), _per_sample(f, x))


def adjust_hue(x, h):
    """Rotates the hue of each image by h (N, in turns, [-0.5, 0.5]) in HSV space; saturation and
    value are kept. Written with few whole-batch kernels (~25): on a GPU this op is bound by kernel
    launches at small sizes and by memory passes at large ones."""
    v = x.amax(1, keepdim=True)  # Nx1xHxW: value
    c = v - x.amin(1, keepdim=True)  # chroma = v s
    cd = torch.where(c == 0, 1.0, c)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # hue in sextants [-1, 5): red max: (g - b)/c; green max: 2 + (b - r)/c; blue max: 4 + (r - g)/c
    # (grey pixels, c = 0, come out as v whatever their hue)
    hue = torch.where(v == r, g - b, torch.where(v == g, (b - r) + 2.0 * cd, (r - g) + 4.0 * cd)) / cd
    hue = hue + 6.0 * _per_sample(h, x)
    # HSV -> RGB: channel n in (R, G, B) = v - c clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6, n = 5, 3, 1
    k = torch.remainder(hue + _const((5.0, 3.0, 1.0), x).view(1, 3, 1, 1), 6.0)  # Nx3xHxW
    return (v - c * torch.minimum(k, 4.0 - k).clamp(0, 1)).clamp(0, 1)


def pil_box_kernels(sigma, passes=3, rad=None):
    """The 1-D kernel of one of PIL's `passes` box-blur passes that make GaussianBlur(radius=sigma)
    (Pillow BoxBlur.c: box radius r = l + a from Gwosdek et al. 2011, so that `passes` boxes have
    variance sigma^2; taps 1/(2r+1) at |x| <= l and the remainder split over |x| = l + 1, in PIL's
    24-bit fixed point). Returns N x (2 R + 1) taps, R = max(l) + 1, zero where a sample's is shorter."""
    s2 = sigma.double() ** 2 / passes
    big = torch.sqrt(12.0 * s2 + 1.0)
    lo = torch.floor((big - 1.0) / 2.0)
    r = lo + (2 * lo + 1) * (lo * (lo + 1) - 3 * s2) / (6 * (s2 - (lo + 1) ** 2))
    r = r.float().double()  # PIL computes the radius in C float
    ww = torch.floor(2.0 ** 24 / (2 * r + 1))
    fw = torch.floor((2.0 ** 24 - (2 * lo + 1) * ww) / 2)
    if rad is None:  # the widest sample's (a fixed `rad` avoids reading sigma back from a device)
        rad = int(lo.max()) + 1 if len(lo) else 1
    t = torch.arange(-rad, rad + 1, dtype=torch.float64, device=sigma.device).abs()[None]
    k = torch.where(t <= lo[:, None], ww[:, None], torch.where(t == lo[:, None] + 1, fw[:, None], 0.0))
    return (k / 2.0 ** 24).float()


def box_blur(x, sigma, passes=3, rad=None):
    """PIL's GaussianBlur(radius=sigma) per sample (sigma: N): `passes` horizontal box blurs, then
    `passes` vertical ones, each with the edge pixel repeated (replicate padding), in float (PIL
    rounds to uint8 after each pass)."""
    n, c, hgt, wid = x.shape
    k = to_device(pil_box_kernels(sigma, passes, rad), x.device).repeat_interleave(c, 0)  # (N C) x (2R+1)
    rad = (k.shape[1] - 1) // 2
    y = x.reshape(1, n * c, hgt, wid)
    for _ in range(passes):
        y = F.conv2d(F.pad(y, (rad, rad, 0, 0), mode='replicate'), k.view(n * c, 1, 1, -1), groups=n * c)
    for _ in range(passes):
        y = F.conv2d(F.pad(y, (0, 0, rad, rad), mode='replicate'), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def solarize(x, threshold=128 / 255):
    """x >= threshold -> 1 - x (PIL ImageOps.solarize(img, 128) on uint8 pixels)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def rotate90(x, k):
    """Rotates image i by k[i] x 90 degrees counter-clockwise (torch.rot90 in the (H, W) plane)."""
    k = to_device(k, x.device).view(-1, 1, 1, 1) % 4
    out = x
    for r in (1, 2, 3):
        out = torch.where(k == r, torch.rot90(x, r, (2, 3)), out)
    return out


def rotate(x, angle):
    """PIL's Image.rotate(angle, NEAREST, expand=False, fillcolor=0) of each image (angle: N degrees,
    counter-clockwise, about the centre (W/2, H/2)), as torchvision's RandomRotation calls it: output
    pixel (x, y) takes the source pixel floor(M (x + 0.5, y + 0.5)) of PIL's inverse affine matrix M
    (cos and sin rounded to 15 decimals as PIL does), black where that falls outside the image."""
    n, c, hgt, wid = x.shape
    a = -torch.deg2rad(angle.double())
    cos, sin = torch.round(torch.cos(a), decimals=15), torch.round(torch.sin(a), decimals=15)
    cx, cy = wid / 2, hgt / 2
    m = torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)
    m = to_device(m, x.device).view(n, 6, 1, 1)
    xs = (torch.arange(wid, dtype=torch.float64, device=x.device) + 0.5).view(1, 1, wid)
    ys = (torch.arange(hgt, dtype=torch.float64, device=x.device) + 0.5).view(1, hgt, 1)
    sx = torch.floor(m[:, 0] * xs + m[:, 1] * ys + m[:, 2])  # NxHxW source column
    sy = torch.floor(m[:, 3] * xs + m[:, 4] * ys + m[:, 5])  # NxHxW source row
    inside = (sx >= 0) & (sx < wid) & (sy >= 0) & (sy < hgt)
    idx = (sy.clamp(0, hgt - 1) * wid + sx.clamp(0, wid - 1)).long().view(n, 1, -1).expand(n, c, -1)
    out = x.flatten(2).gather(2, idx).view(n, c, hgt, wid)
    return torch.where(inside[:, None], out, 0.0)


def normalize(x, mean, std):
    m = _const(mean, x).view(1, -1, 1, 1)
    s = _const(std, x).view(1, -1, 1, 1)
    return (x - m) / s


def _where_on(fn, x, on, *params, static=False):
    """fn(x, *params) for the samples where `on`, x elsewhere. Eager: only the selected samples are
    computed, indexed from the CPU mask (the parameters are drawn there), so the device is never
    waited for. static=True (compiled recipes): computed for all and selected, shapes fixed."""
    if static:
        return torch.where(to_device(on, x.device).view(-1, 1, 1, 1), fn(x, *params), x)
    on = on.cpu()
    if bool(on.all()):
        return fn(x, *params)
    idx = on.nonzero().squeeze(1)
    if len(idx) == 0:
        return x
    sel = to_device(idx, x.device)
    return x.index_copy(0, sel, fn(x.index_select(0, sel), *[p.cpu()[idx] for p in params]))


# ---------------------------------------------------------------- recipe steps (sample, then apply)

class Crop:
    """RandomResizedCrop(size, scale, ratio, interpolation) + RandomHorizontalFlip(flip_p)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bilinear', flip_p=0.0):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio, self.interpolation, self.flip_p = scale, ratio, interpolation, flip_p

    def sample(self, sizes, gen):
        return dict(box=crop_params(sizes, self.scale, self.ratio, gen), flip=bernoulli(len(sizes), self.flip_p, gen))

    def apply(self, images, p, static=False):
        return resized_crop(images, p['box'], self.size, self.interpolation, p['flip'])


class Jitter:
    """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p): ranges as torchvision
    stores them ((lo, hi) or None)."""

    def __init__(self, brightness, contrast, saturation, hue, p=1.0):
        self.ranges, self.p = (brightness, contrast, saturation, hue), p

    def sample(self, n, gen):
        on = bernoulli(n, self.p, gen)
        factors, order = jitter_params(n, *self.ranges, gen)
        return dict(on=on, factors=factors, order=order)

    def apply(self, x, p, static=False):
        on, factors, order = p['on'], p['factors'], p['order']  # CPU (eager): the plan is made there
        # position k of each sample's own order: brightness, contrast and saturation are all a blend
        # f x + (1 - f) ref with ref = 0, the image's mean grey or its grey; f = 1 where the op is
        # elsewhere or jitter is off. Nx4 each, one copy to the device.
        blend = on[:, None] & (order < 3)
        f = torch.where(blend, factors.gather(1, order.clamp(max=2)), 1.0)
        w_gray = (blend & (order == 2)).to(f.dtype)  # ref = grey (saturation)
        w_mean = (blend & (order == 1)).to(f.dtype)  # ref = mean grey (contrast)
        plan = to_device(torch.stack([f, 1.0 - f, w_gray, w_mean], 0), x.device, x.dtype)  # 4xNx4
        hue_on = on[:, None] & (order == 3) if self.ranges[3] is not None else torch.zeros_like(order, dtype=torch.bool)
        for k in range(4):
            fk, gk, sk, ck = (plan[i, :, k].view(-1, 1, 1, 1) for i in range(4))
            gray = rgb_to_gray(x)
            ref = gray * sk + gray.mean((2, 3), keepdim=True) * ck
            x = torch.addcmul(ref * gk, x, fk).clamp_(0, 1)
            x = _where_on(adjust_hue, x, hue_on[:, k], factors[:, 3], static=static)
        return x


class Gray:
    """RandomGrayscale(p): 3 equal channels."""

    def __init__(self, p):
        self.p = p

    def sample(self, n, gen):
        return dict(on=bernoulli(n, self.p, gen))

    def apply(self, x, p, static=False):
        return torch.where(to_device(p['on'], x.device).view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)


class Blur:
    """RandomApply([augment.GaussianBlur(sigma)], p): per-sample sigma ~ U(sigma), PIL's box blur."""

    def __init__(self, sigma=(0.1, 2.0), p=1.0):
        self.sigma, self.p = tuple(sigma), p
        self.rad = (pil_box_kernels(torch.tensor([float(max(sigma))])).shape[1] - 1) // 2  # the widest kernel's

    def sample(self, n, gen):
        return dict(on=bernoulli(n, self.p, gen), sigma=uniform(n, *self.sigma, gen))

    def apply(self, x, p, static=False):
        if static:  # one kernel width for every batch: zero taps beyond a sample's own radius
            return _where_on(functools.partial(box_blur, rad=self.rad), x, p['on'], p['sigma'], static=True)
        return _where_on(box_blur, x, p['on'], p['sigma'])


class Solarize:
    """RandomApply([augment.Solarize()], p)."""

    def __init__(self, p=1.0):
        self.p = p

    def sample(self, n, gen):
        return dict(on=bernoulli(n, self.p, gen))

    def apply(self, x, p, static=False):
        return torch.where(to_device(p['on'], x.device).view(-1, 1, 1, 1), solarize(x), x)


class Rotate:
    """RandomRotation(degrees) with nearest resampling, no expansion, black fill: angle ~ U(degrees)."""

    def __init__(self, degrees, p=1.0):
        self.degrees, self.p = tuple(degrees), p

    def sample(self, n, gen):
        return dict(on=bernoulli(n, self.p, gen), angle=uniform(n, *self.degrees, gen))

    def apply(self, x, p, static=False):
        return _where_on(rotate, x, p['on'], p['angle'], static=static)


class Recipe:
    """One view: crop (+ flip) on the uint8 source, then `ops` in order, then normalisation.
    recipe(images, gen) -> float NxCxSxS; sample(sizes, gen) / apply(images, params) separately."""

    def __init__(self, crop, ops=(), mean=None, std=None):
        self.crop, self.ops, self.mean, self.std = crop, list(ops), mean, std

    def sample(self, sizes, gen):
        return [self.crop.sample(sizes, gen)] + [op.sample(len(sizes), gen) for op in self.ops]

    def apply(self, images, params, static=False):
        """static=True: every op computed for the whole batch and selected per sample, with fixed
        shapes and no value read back (for torch.compile; `params` already on the device)."""
        x = self.crop.apply(to_float(images), params[0])
        for op, p in zip(self.ops, params[1:]):
            x = op.apply(x, p, static)
        return x if self.mean is None else normalize(x, self.mean, self.std)

    def __call__(self, images, gen):
        return self.apply(images, self.sample(image_sizes(images), gen))

    def compiled(self):
        """This recipe with its apply compiled (torch.compile, static shapes): the draws stay on the
        CPU generator (the same views as eager, to float rounding), are copied to the device in one
        go, and the compiler fuses the several hundred eager kernels of a view into a few. A list
        batch (images of several sizes) runs eagerly."""
        return CompiledRecipe(self)

    def __repr__(self):
        return f'Recipe({self.crop.__dict__}, {[(type(o).__name__, o.__dict__) for o in self.ops]})'


class MultiView:
    """augment.MultiView (and its multi-crop subclasses) for batches: a list with one batch per
    recipe, drawn in turn from `gen`. The views may differ in output size (multi-crop's global and
    local crops), crop scale and every probability: each recipe is its own batch, never stacked with
    another. out_sizes: each view's (H, W); n_global / n_local are copied from a multi-crop transform
    (from_transform). compiled(): one compiled recipe per view; the compiler guards on the recipe's
    values (output size, ops), so views of one configuration (the local crops) share one graph and a
    2 + N multi-crop compiles 3 graphs for any N (torch._dynamo's recompile limit, 8, counts the
    graphs of every compiled recipe of the process: they share one code object)."""

    def __init__(self, *recipes):
        self.recipes, self.n_views = recipes, len(recipes)
        crops = [getattr(getattr(r, 'recipe', r), 'crop', None) for r in recipes]
        self.out_sizes = [getattr(c, 'size', None) for c in crops]  # None: a method's own batched view

    def __call__(self, images, gen):
        images = to_float(images)  # converted once for all views
        return [r(images, gen) for r in self.recipes]

    def compiled(self):
        out = MultiView(*[r.compiled() for r in self.recipes])
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k in ('n_global', 'n_local')})
        return out


class CompiledRecipe:
    """Recipe.compiled(): recipe(images, gen) with the apply step compiled."""

    def __init__(self, recipe):
        self.recipe, self.warm = recipe, False
        self.fn = torch.compile(functools.partial(recipe.apply, static=True), dynamic=False)

    def __call__(self, images, gen):
        params = self.recipe.sample(image_sizes(images), gen)
        if isinstance(images, (list, tuple)):
            return self.recipe.apply(images, params)
        if not self.warm:  # one eager batch first: its constants (_const) are made outside the graph
            self.recipe.apply(images, params)
            self.warm = True
        return self.fn(images, params_to(params, images.device))


def params_to(params, device):
    """A parameter tree of Recipe.sample (lists and dicts of tensors) on `device`."""
    if isinstance(params, dict):
        return {k: params_to(v, device) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return [params_to(v, device) for v in params]
    return to_device(params, device)


def image_sizes(images):
    """Nx2 (H, W) of a batch tensor or of each image of a list."""
    if isinstance(images, (list, tuple)):
        return torch.tensor([x.shape[-2:] for x in images])
    return torch.tensor(images.shape[-2:]).expand(images.shape[0], 2)


# ---------------------------------------------------------------- from the PIL pipelines

_INTERP = {T.InterpolationMode.BILINEAR: 'bilinear', T.InterpolationMode.BICUBIC: 'bicubic'}


def _step(op, p=1.0):
    if isinstance(op, T.ColorJitter):
        return Jitter(op.brightness, op.contrast, op.saturation, op.hue, p)
    if isinstance(op, T.RandomGrayscale):
        return Gray(op.p * p)
    if isinstance(op, augment.GaussianBlur):
        return Blur(op.sigma, p)
    if isinstance(op, augment.Solarize):
        return Solarize(p)
    if isinstance(op, T.RandomRotation):
        fill = op.fill if isinstance(op.fill, (list, tuple)) else [op.fill]
        if op.interpolation != T.InterpolationMode.NEAREST or op.expand or op.center is not None or any(fill):
            raise ValueError('RandomRotation has a batched equivalent only with nearest resampling, no expand, '
                             'the default centre and fill 0')
        return Rotate(op.degrees, p)
    raise ValueError(f'{type(op).__name__} has no batched equivalent')


def _flat(t):
    """The ops of a pipeline in order, nested Composes opened (DINO's reference pipelines nest
    Compose([flip, jitter, grey]) and Compose([ToTensor, Normalize]) in each view's Compose)."""
    if isinstance(t, T.Compose):
        return [op for o in t.transforms for op in _flat(o)]
    return [t]


def from_transform(t):
    """The batched equivalent of a PIL pipeline of common/augment.py (a Compose, nested Composes
    included, or a MultiView of them, one recipe per view whatever its size), or what a method's own
    transform returns from its `batched()` method. Raises ValueError naming the first op it cannot
    reproduce."""
    if callable(getattr(t, 'batched', None)):
        return t.batched()
    if isinstance(t, augment.MultiView):
        out = MultiView(*[from_transform(v) for v in t.transforms])
        for k in ('n_global', 'n_local'):  # multi-crop (augment.MultiCrop)
            if hasattr(t, k):
                setattr(out, k, getattr(t, k))
        return out
    crop, flip_p, ops, mean, std = None, 0.0, [], None, None
    for op in _flat(t):
        if isinstance(op, T.RandomResizedCrop) and crop is None:
            if op.interpolation not in _INTERP:
                raise ValueError(f'RandomResizedCrop with {op.interpolation} has no batched equivalent')
            crop = Crop(op.size, tuple(op.scale), tuple(op.ratio), _INTERP[op.interpolation])
        elif crop is None:
            raise ValueError(f'{type(op).__name__} before RandomResizedCrop: the batched path starts with the crop')
        elif isinstance(op, T.RandomHorizontalFlip) and not flip_p:
            # folded into the crop's resampling, i.e. moved before the ops so far: they must commute
            # with it (pointwise ops and the symmetric blur do, a rotation does not)
            if any(isinstance(o, Rotate) for o in ops):
                raise ValueError('RandomHorizontalFlip after RandomRotation has no batched equivalent (the flip '
                                 'is folded into the crop)')
            flip_p = op.p
        elif isinstance(op, T.RandomApply):
            if len(op.transforms) != 1:
                raise ValueError('RandomApply of several ops has no batched equivalent')
            ops.append(_step(op.transforms[0], op.p))
        elif isinstance(op, T.ToTensor):
            continue
        elif isinstance(op, T.Normalize):
            mean, std = tuple(op.mean), tuple(op.std)
        else:
            ops.append(_step(op))
    if crop is None:
        raise ValueError('the batched path needs a RandomResizedCrop')
    crop.flip_p = flip_p
    return Recipe(crop, ops, mean, std)
