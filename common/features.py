"""Frozen-backbone features for the evaluation tools: loading any checkpoint (Sobel front end
included), the fixed multi-layer pooling of the benchmarks, and distributed feature extraction.

Layer names (OSS indices, methods.md §0.1): feat1 = stem after conv1-bn-relu (before the max-pool),
feat2..feat5 = layer1..layer4 (aliases stem, layer1..layer4), avgpool = global-average-pooled layer4
(the 2048-d feature of a ResNet-50).

Fixed pooling ('multi', avg-pool with count_include_pad as nn.AvgPool2d):
  * 224-px input, ImageNet stem: OSS models/utils/multi_pooling.py 'specified' (Goyal et al. 2019),
    giving 9216 / 9216 / 8192 / 9216 / 8192 dims for a ResNet-50 (methods.md §9.1);
  * 32-px input, CIFAR stem (our choice, no reference exists): the same idea on maps of 32, 32, 16, 8, 4
    px, giving grids 8, 4, 3, 2, 2 and 4096 / 4096 / 4608 / 4096 / 8192 dims for a ResNet-50 width 64.
Dims scale with the channel count: a ResNet-18 has 64, 64, 128, 256, 512 channels at the five layers.

ViT backbones (common/vit.py, methods-modern.md §0b) are read off the weights as well (allow_vit):
their features are the normed cls token, the mean patch token and DINO's last-N-blocks cls tokens
(VIT_LAYERS), with DINO's bicubic evaluation view (vit_eval_transform).
"""
import argparse

import numpy as np
import torch
from tqdm import tqdm

from common import checkpoint, dist
from common.data import loader_kwargs
from common.resnet import build_resnet, build_resnet_sobel, infer_resnet_config
from common.vit import is_vit_state_dict

LAYERS = ('feat1', 'feat2', 'feat3', 'feat4', 'feat5', 'avgpool')
ALIASES = {'stem': 'feat1', 'layer1': 'feat2', 'layer2': 'feat3', 'layer3': 'feat4', 'layer4': 'feat5'}
STAGE = {'feat1': 0, 'feat2': 1, 'feat3': 2, 'feat4': 3, 'feat5': 4, 'avgpool': 4}  # index in forward_stages

# input size -> layer -> (map side it expects, kernel, stride, padding)
MULTI_POOL = {
    224: {'feat1': (112, 10, 10, 4), 'feat2': (56, 16, 8, 0), 'feat3': (28, 13, 5, 0),
          'feat4': (14, 8, 3, 0), 'feat5': (7, 6, 1, 0)},                       # grids 12, 6, 4, 3, 2
    32: {'feat1': (32, 4, 4, 0), 'feat2': (32, 8, 8, 0), 'feat3': (16, 6, 5, 0),
         'feat4': (8, 4, 4, 0), 'feat5': (4, 3, 1, 0)},                          # grids 8, 4, 3, 2, 2
}


def layer_name(s):
    """argparse type: a layer name or alias -> its canonical name (feat1..feat5, avgpool)."""
    s = ALIASES.get(s, s)
    if s not in LAYERS:
        raise argparse.ArgumentTypeError(f'unknown layer {s!r}; choose from {", ".join(LAYERS + tuple(ALIASES))}')
    return s


def any_layer_name(s):
    """argparse type of eval/extract.py: a ResNet layer (layer_name) or a ViT feature (VIT_LAYERS,
    cls_lastN); which of the two the backbone takes is checked once it is loaded."""
    try:
        vit_layer(s)
        return s
    except ValueError:
        pass
    try:
        return layer_name(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'unknown layer {s!r}; a ResNet offers {", ".join(LAYERS + tuple(ALIASES))}, '
                                         f'a ViT cls, patch_avg, cls_lastN') from None


def pool_grid(name, input_size, pool='multi'):
    """Side of the pooled grid of layer `name` (1 for global pooling)."""
    if pool == 'avg' or name == 'avgpool':
        return 1
    side, k, s, p = MULTI_POOL[input_size][name]
    return (side + 2 * p - k) // s + 1


class StagePool(torch.nn.Module):
    """[stem, layer1..4] maps (ResNet.forward_stages) -> the chosen layers, each pooled to NxCxgxg.

    pool='multi': the fixed kernels of MULTI_POOL for `input_size` (avgpool stays global);
    pool='avg': global average pooling of every layer. A map of another size than the table expects
    is refused: the fixed kernels are defined for one input size only.
    """

    def __init__(self, layers, input_size, pool='multi'):
        super().__init__()
        if pool not in ('multi', 'avg'):
            raise ValueError(f'pool must be multi or avg, not {pool!r}')
        if pool == 'multi' and any(n != 'avgpool' for n in layers) and input_size not in MULTI_POOL:
            raise ValueError(f'the fixed multi-layer pooling is defined for {" and ".join(map(str, MULTI_POOL))}-px '
                             f'input, not {input_size}; use global pooling (--pool avg) or that input size')
        self.layers, self.input_size, self.pool = list(layers), input_size, pool

    def forward(self, stages):
        out = []
        for name in self.layers:
            x = stages[STAGE[name]]
            if self.pool == 'avg' or name == 'avgpool':
                out.append(torch.nn.functional.adaptive_avg_pool2d(x, 1))
                continue
            side, k, s, p = MULTI_POOL[self.input_size][name]
            if tuple(x.shape[-2:]) != (side, side):
                raise ValueError(f'{name}: the fixed pooling for {self.input_size}-px input expects a {side}x{side} '
                                 f'map, got {tuple(x.shape[-2:])}; is the backbone\'s stem right for this size?')
            out.append(torch.nn.functional.avg_pool2d(x, k, s, p))
        return out


def stage_channels(model):
    """Channels of [stem, layer1, ..., layer4] of a common.resnet.ResNet."""
    last = [layer[-1] for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    return [model.bn1.num_features] + [(b.bn3 if hasattr(b, 'bn3') else b.bn2).num_features for b in last]


def feature_dims(model, layers, input_size, pool='multi'):
    """{layer: flattened feature dimension}."""
    ch = stage_channels(model)
    return {n: ch[STAGE[n]] * pool_grid(n, input_size, pool) ** 2 for n in layers}


# ============ loading ============

def sobel_flag(cfg, args):
    """Whether the backbone sits behind DeepCluster's Sobel front end: a 2-channel conv1 takes only
    Sobel input, so in_channels == 2 decides; the checkpoint's args, when they say, must agree."""
    want = (args or {}).get('sobel')
    if cfg['in_channels'] == 2:
        if want is False:
            raise ValueError('conv1 takes 2 channels but the checkpoint args say sobel=False: unknown input format')
        return True
    if want:
        raise ValueError(f'the checkpoint args ask for the Sobel front end, but conv1 takes {cfg["in_channels"]} '
                         f'channels, not 2')
    if cfg['in_channels'] != 3:
        raise ValueError(f'conv1 takes {cfg["in_channels"]} channels; only RGB (3) and Sobel (2) inputs are known')
    return False


def build_backbone(cfg, num_classes=0):
    """ResNet of `cfg` (infer_resnet_config), behind the Sobel front end when it has 2 input channels."""
    if cfg['in_channels'] == 2:
        return build_resnet_sobel(cfg['arch'], num_classes, cfg['width'], cfg['cifar_stem'])
    return build_resnet(cfg['arch'], num_classes, cfg['width'], cfg['cifar_stem'], cfg['in_channels'])


def load_eval_backbone(path, weights_only=True, allow_vit=False, num_heads=None):
    """(backbone with fc=Identity, its state dict, config, checkpoint args) from any checkpoint that
    common.checkpoint.backbone_state_dict understands; a Sobel backbone comes with its front end.
    With allow_vit a ViT checkpoint gives a common.vit.VisionTransformer (head Identity) and the
    config of checkpoint.vit_config (vit=True; heads from `num_heads`, the args or the size's default);
    without it a ViT is refused. Raises FileNotFoundError / RuntimeError / ValueError with the reason."""
    ckpt = checkpoint.load(path, weights_only=weights_only)
    sd = checkpoint.backbone_state_dict(ckpt, allow_vit=allow_vit)
    args = checkpoint.checkpoint_args(ckpt)
    if is_vit_state_dict(sd):
        cfg = checkpoint.vit_config(sd, ckpt, num_heads, path)
        return checkpoint.build_vit_backbone(sd, cfg), sd, cfg, args
    cfg = infer_resnet_config(sd)
    sobel_flag(cfg, args)
    model = build_backbone(cfg)
    try:
        model.load_state_dict(sd)  # strict: fc is Identity and sd has no fc
    except RuntimeError as e:
        raise ValueError(f'backbone does not match {cfg}: {" ".join(str(e).split())[:500]}') from None
    return model, sd, cfg, args


def default_crop(cfg):
    """The eval input size of a backbone config: a ViT's own (its position table's grid x patch), 32
    for a CIFAR-stem ResNet, else 224."""
    if cfg.get('vit'):
        return cfg['img_size']
    return 32 if cfg['cifar_stem'] else 224


def describe_backbone(cfg):
    """The config fields a protocol JSON records about the backbone."""
    if cfg.get('vit'):
        return {k: cfg[k] for k in ('arch', 'embed_dim', 'depth', 'num_heads', 'heads_from', 'patch_size',
                                    'img_size', 'pos_embed', 'method', 'weights_from')}
    return dict(arch=cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'])


# ============ ViT features ============

# eval/extract.py layer names of a ViT (all computed after the final LayerNorm, eval mode):
#   cls        the normed [CLS] token (D), the representation of MoCo v3 and DINO (methods-modern.md §0b.1)
#   patch_avg  the mean of the normed patch tokens (D)
#   cls_lastN  the normed cls tokens of the last N blocks concatenated (N*D), DINO's linear feature (§16.7)
VIT_LAYERS = ('cls', 'patch_avg', 'cls_last4')


def vit_layer(name):
    """N blocks of a cls_lastN name, 0 for cls/patch_avg; ValueError for other names."""
    if name in ('cls', 'patch_avg'):
        return 0
    if name.startswith('cls_last') and name[len('cls_last'):].isdigit() and int(name[len('cls_last'):]) > 0:
        return int(name[len('cls_last'):])
    raise ValueError(f'{name!r} is not a ViT feature; a ViT offers cls, patch_avg and cls_lastN (N >= 1)')


def vit_feature_fn(model, layers, amp=None):
    """fn(images) -> {layer: NxD} of the VIT_LAYERS-style names `layers`, one backbone pass per call
    (the last max-N blocks' tokens through the final LayerNorm, DINO's get_intermediate_layers);
    model in eval mode."""
    amp = amp or dict(device_type='cpu', enabled=False)
    n = max([1] + [vit_layer(name) for name in layers])
    if n > len(model.blocks):
        raise ValueError(f'cls_last{n}: the ViT has {len(model.blocks)} blocks')

    def fn(x):
        with torch.autocast(**amp):
            outs = model.get_intermediate_layers(x, n)  # n x Bx(1+N)xD, each normed
        feats = {}
        for name in layers:
            k = vit_layer(name)
            feats[name] = (outs[-1][:, 1:].mean(1) if name == 'patch_avg' else
                           torch.cat([o[:, 0] for o in outs[len(outs) - max(k, 1):]], -1))
        return feats
    return fn


def vit_eval_transform(size=224, interpolation='bicubic'):
    """DINO's evaluation view (`DN:eval_knn.py`, `DN:eval_linear.py`; methods-modern.md §16.6-16.7):
    Resize(size*256/224, bicubic) + CenterCrop(size) + ImageNet normalisation; below 64 px only the
    resize to `size` (as common.augment.eval_transform for small images)."""
    import torchvision.transforms as T
    from common.augment import normalize
    mode = T.InterpolationMode(interpolation)
    resize = size if size < 64 else round(size * 256 / 224)
    return T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.ToTensor(), normalize])


# ============ extraction ============

def stage_feature_fn(model, pool, amp=None):
    """fn(images) -> {layer: NxD flattened pooled feature} for iter_features; model in eval mode."""
    amp = amp or dict(device_type='cpu', enabled=False)
    fmt = torch.channels_last if amp['device_type'] == 'cuda' else torch.contiguous_format

    def fn(x):
        with torch.autocast(**amp):
            maps = pool(model.forward_stages(x.contiguous(memory_format=fmt)))
        return {n: m.flatten(1) for n, m in zip(pool.layers, maps)}
    return fn


@torch.no_grad()
def iter_features(fn, dataset, batch_size=256, workers=4, device=torch.device('cpu'), desc='features'):
    """Features of every item of `dataset`, step by step. Collective: every process must run the
    generator to its end.

    Process r computes items r, r+W, r+2W, ... (shares padded to equal length, so every process runs
    the same number of steps); each step's rows are all-gathered. Yields (idx M, {layer: MxD float32},
    labels M[xC]) on every process, all on the CPU, idx the dataset indices of the rows (each index
    exactly once over the run). A tqdm bar counts images on rank 0.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(dataset)
    share = list(range(rank, n, world))
    per = -(-n // world)
    padded = share + [share[-1] if share else 0] * (per - len(share))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, padded), batch_size=batch_size,
                                         shuffle=False, **loader_kwargs(workers, device))
    bar = tqdm(total=n, desc=desc, unit='img', disable=not dist.is_main(), dynamic_ncols=True)
    pos = 0
    for images, labels, _ in loader:
        b = images.shape[0]
        idx = torch.tensor(padded[pos:pos + b])
        idx[torch.arange(pos, pos + b) >= len(share)] = -1  # padding rows
        pos += b
        feats = {k: v.float() for k, v in fn(images.to(device, non_blocking=True)).items()}
        labels = torch.as_tensor(labels)
        if world > 1:
            idx = dist.concat_all_gather(idx.to(device))
            labels = dist.concat_all_gather(labels.to(device))
            feats = {k: dist.concat_all_gather(v.contiguous()) for k, v in feats.items()}
        keep = idx >= 0
        bar.update(int(keep.sum()))
        yield idx[keep].cpu(), {k: v[keep].cpu() for k, v in feats.items()}, labels[keep].cpu()
    bar.close()


def extract_all(fn, dataset, batch_size=256, workers=4, device=torch.device('cpu'), desc='features'):
    """({layer: NxD float32 numpy}, labels numpy) in dataset order, on every process (collective).
    For data that fits in memory; eval/extract.py streams larger sets to disk."""
    feats, labels = {}, None
    for idx, f, lab in iter_features(fn, dataset, batch_size, workers, device, desc):
        if labels is None:
            feats = {k: np.zeros((len(dataset), v.shape[1]), np.float32) for k, v in f.items()}
            labels = np.zeros((len(dataset),) + tuple(lab.shape[1:]), lab.numpy().dtype)
        for k, v in f.items():
            feats[k][idx.numpy()] = v.numpy()
        labels[idx.numpy()] = lab.numpy()
    return feats, labels
