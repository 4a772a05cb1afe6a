"""Augmentation recipes (PIL, torchvision), each cited to the paper/code it reproduces.

Every recipe takes the output crop size, so the same recipe serves ImageNet (224) and CIFAR (32).
"""
import random

from PIL import ImageFilter, ImageOps
import torch
import torchvision.transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


class GaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U(sigma_min, sigma_max) (SimCLR, arXiv:2002.05709 App. A;
    MoCo v2 applies it as PIL radius, moco/loader.py)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    """x >= 128 -> 255 - x on uint8 pixels (BYOL, arXiv:2006.07733 App. B)."""

    def __call__(self, img):
        return ImageOps.solarize(img, 128)


class MultiView:
    """Applies one or more pipelines to the same image and returns the list of views.

    MultiView(t, t) is MoCo's TwoCropsTransform (two independent draws of one recipe); two
    different pipelines give BYOL's asymmetric views.
    """

    def __init__(self, *transforms):
        self.transforms = transforms
        self.n_views = len(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def moco_v1(size=224):
    """MoCo v1 / InstDisc (arXiv:1911.05722 §4; main_moco.py): grayscale *before* an always-on
    ColorJitter with hue 0.4; crop scale (0.2, 1)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomGrayscale(p=0.2),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomHorizontalFlip(),
        T.ToTensor(), normalize])


def moco_v2(size=224, blur=True):
    """MoCo v2 (arXiv:2003.04297; main_moco.py --aug-plus): SimCLR-style jitter p=0.8, grayscale
    0.2, PIL blur sigma U(0.1, 2) p=0.5, crop scale (0.2, 1). blur=False for 32-px data, as the MoCo
    CIFAR demo and the SimCLR CIFAR setting."""
    ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0)),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5))
    ops += [T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    return T.Compose(ops)


def eval_transform(size=224):
    """Deterministic evaluation view: Resize(size*256/224) + CenterCrop(size) (MoCo main_lincls.py);
    small images (size < 64, e.g. CIFAR) are only resized to `size`, no border is cut."""
    resize = size if size < 64 else round(size * 256 / 224)
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalize])


def simclr(size=224, blur=True, strength=1.0):
    """SimCLR (arXiv:2002.05709 App. A; OpenSelfSup simclr/r50_bs256_ep200.py): crop scale (0.08, 1),
    flip, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8 with strength s (1.0; the paper's CIFAR-10 runs
    use 0.5), grayscale 0.2, PIL blur sigma U(0.1, 2) p=0.5. blur=False for 32-px data, as the
    paper's CIFAR-10 setting."""
    s = strength
    ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0)),
           T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5))
    return T.Compose(ops + [T.ToTensor(), normalize])


def byol(size=224, view=1, blur=True):
    """BYOL asymmetric views (arXiv:2006.07733 App. B, Table 6; OpenSelfSup byol/r50_bs256_ep200.py):
    bicubic crop scale (0.08, 1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur
    p=1.0 (view 1) / 0.1 (view 2), solarize p=0 / 0.2. blur=False drops the blur (32-px data)."""
    p_blur, p_sol = (1.0, 0.0) if view == 1 else (0.1, 0.2)
    return byol_view(size, (0.08, 1.0), p_blur, p_sol, blur)


def byol_view(size, scale, p_blur, p_sol=0.0, blur=True):
    """The view BYOL and DINO share: bicubic crop at `scale`, flip, ColorJitter(0.4, 0.4, 0.2, 0.1)
    p=0.8, grayscale 0.2, blur p_blur (if `blur`), solarize p_sol, ImageNet Normalize."""
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=p_blur))
    if p_sol:
        ops.append(T.RandomApply([Solarize()], p=p_sol))
    return T.Compose(ops + [T.ToTensor(), normalize])


# ---------------------------------------------------------------- evaluation recipes

# ImageNet RGB PCA (eigenvalues, eigenvectors as columns) of AlexNet's lighting noise, as
# fb.resnet.torch and OSS datasets/pipelines/transforms.py Lighting use them
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


class Lighting:
    """AlexNet PCA lighting noise on a [0,1] RGB tensor (Krizhevsky et al. 2012 §4.1): adds
    eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, alphastd) per component."""

    def __init__(self, alphastd=0.1):
        self.alphastd = alphastd
        self.eigval, self.eigvec = torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC)

    def __call__(self, img):
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)  # 3
        return img + rgb.view(3, 1, 1).to(img.dtype)

    def __repr__(self):
        return f'Lighting(alphastd={self.alphastd})'


def goyal_linear(size=224):
    """Multi-head linear training augmentation (Goyal et al. 2019; OSS benchmarks r50_multihead.py):
    RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4, 0) + PCA lighting 0.1."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.0),
                      T.ToTensor(), Lighting(0.1), normalize])


def warp_transform(size=224):
    """VOC07 SVM feature view (OSS benchmarks/extract_info/voc07.py): Resize(size*256/224) on the short
    side, then warp (resize, aspect not kept) to size x size, no crop; below 64 px only the warp."""
    ops = [] if size < 64 else [T.Resize(round(size * 256 / 224))]
    return T.Compose(ops + [T.Resize((size, size)), T.ToTensor(), normalize])


def deepcluster(size=224, min_scale=0.08):
    """OpenSelfSup DeepCluster and ODC (methods.md §5.2, §6; OSS configs deepcluster/r50.py,
    odc/r50_v1.py): RandomResizedCrop (scale (min_scale, 1), OSS 0.08), flip, RandomRotation(2 degrees),
    an always-on ColorJitter(0.4, 0.4, 1.0, 0.5), grayscale 0.2. The original DeepCluster uses crop +
    flip only."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomRotation(2),
        T.ColorJitter(0.4, 0.4, 1.0, 0.5),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(), normalize])


# ---------------------------------------------------------------- multi-crop (DINO)

class MultiCrop(MultiView):
    """Multi-crop views of an image (Caron et al. 2020/2021): `n_global` large crops followed by
    `n_local` small ones, each its own PIL pipeline, so views of different sizes come out as a list
    (collated per view into one tensor each). A MultiView, so common/batch_aug.from_transform reads
    it view by view.

    Attributes: transforms (one Compose per view, globals first), n_views, n_global, n_local,
    sizes (the RandomResizedCrop output size of every view) and scales (its scale range).
    """

    def __init__(self, global_transforms, local_transforms):
        super().__init__(*global_transforms, *local_transforms)
        self.n_global, self.n_local = len(global_transforms), len(local_transforms)
        crops = [next(op for op in t.transforms if isinstance(op, T.RandomResizedCrop)) for t in self.transforms]
        self.sizes = [c.size[0] for c in crops]
        self.scales = [tuple(c.scale) for c in crops]


def dino(global_size=224, local_size=96, n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
         blur=True):
    """DINO's multi-crop (arXiv:2104.14294; facebookresearch/dino main_dino.py DataAugmentationDINO,
    methods-modern.md §16.5): every view is a bicubic RandomResizedCrop, then flip p=0.5,
    ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2; global view 1 blur p=1.0, global view 2
    blur p=0.1 + solarize p=0.2, each of the `n_local` local views blur p=0.5; ImageNet Normalize.
    Blur is PIL radius U(0.1, 2). blur=False drops the blur (32-px data, as the other recipes).
    Returns a MultiCrop of 2 global views at global_size and n_local views at local_size."""
    return MultiCrop([byol_view(global_size, global_scale, 1.0, 0.0, blur),
                      byol_view(global_size, global_scale, 0.1, 0.2, blur)],
                     [byol_view(local_size, local_scale, 0.5, 0.0, blur) for _ in range(n_local)])


# ---------------------------------------------------------------- multi-crop (SwAV)

# SwAV's Normalize std: 0.228 for red, a typo for 0.229 kept by its pre-training and linear evaluation
# (methods-modern.md §0a; SW:src/multicropdataset.py:38-39)
SWAV_STD = (0.228, 0.224, 0.225)


def swav_view(size, scale, blur=True):
    """One SwAV crop (SW:src/multicropdataset.py:40-52, 64-94): bilinear RandomResizedCrop at `scale`,
    flip 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale 0.2, PIL blur sigma U(0.1, 2) p=0.5 (if
    `blur`), Normalize with SwAV's std."""
    ops = [T.RandomResizedCrop(size, scale=scale),
           T.RandomHorizontalFlip(p=0.5),
           T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, SWAV_STD)])


def swav(size_crops=(224, 96), nmb_crops=(2, 6), min_scale=(0.14, 0.05), max_scale=(1.0, 0.14), blur=True):
    """SwAV's multi-crop (arXiv:2006.09882; methods-modern.md §14.4; the 2x224 + 6x96 recipe of
    SW:scripts/swav_800ep_pretrain.sh:28-31): nmb_crops[i] crops of size_crops[i] pixels at scale
    (min_scale[i], max_scale[i]), every crop the same pipeline (swav_view, blur p=0.5 on all of them;
    blur=False drops it for 32-px data). Returns a MultiCrop whose 'global' views are the first
    resolution's and 'local' views the others'."""
    groups = [[swav_view(s, (lo, hi), blur) for _ in range(n)]
              for s, n, lo, hi in zip(size_crops, nmb_crops, min_scale, max_scale)]
    return MultiCrop(groups[0], [t for g in groups[1:] for t in g])
