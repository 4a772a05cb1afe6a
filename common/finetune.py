"""End-to-end fine-tuning, shared by eval/finetune.py (MAE/DeiT recipe) and eval/semi.py (OSS's
semi-supervised protocol): the classifier around a pre-trained backbone, layer-wise LR decay groups,
batch mixing (torchvision's MixUp/CutMix), the warm-up + cosine schedule and the training epoch.

Spec: methods-modern.md §17.4 (citations `MAE:` are to facebookresearch/mae at efb2a80).
  * Classifier (`MAE:models_vit.py:20-53`): a ViT is fine-tuned on the mean of its patch tokens
    (global pool, cls token left out) through a new LayerNorm `fc_norm` (eps 1e-6) into `head`; the
    backbone's own final `norm` is not used (MAE deletes it; here it stays, frozen, so that the
    fine-tuned backbone.pth loads as any other ViT backbone). A ResNet feeds its pooled layer4
    feature to `head`. The head is trunc-normal std 2e-5, bias 0 (`MAE:main_finetune.py:257`).
  * Layer ids (`MAE:util/lr_decay.py:15-76`): with n = depth + 1, cls_token, pos_embed and
    patch_embed.* are layer 0, blocks.i.* layer i + 1, everything else (fc_norm, head) layer n; the LR
    of layer id is scaled by decay^(n - id). ResNets (our choice, MAE has none): the stem (conv1,
    bn1) is layer 0, layer1..layer4 are 1..4 and the head 5 (n = 5).
  * Weight decay (`MAE:util/lr_decay.py:32-37`): 0 for 1-D parameters (biases, norms, BN) and for
    pos_embed / cls_token / dist_token (timm's no_weight_decay()), the given value elsewhere.
  * Schedule (`MAE:util/lr_sched.py:9-21`): per iteration, linear warm-up from 0, then a half cosine
    to min_lr; every group's LR is the schedule's times its lr_mult (the layer's scale).
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import optim
from common.data import EpochSampler, build_dataset, loader_kwargs

NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'dist_token')  # timm VisionTransformer.no_weight_decay()
RESNET_STAGES = 4


# ============ model ============


class Classifier(nn.Module):
    """backbone -> feature (BxD) -> head (BxC). ViT: the mean patch token through fc_norm (MAE's
    global pool); ResNet: the global-average-pooled layer4 feature. See the module docstring."""

    def __init__(self, backbone, num_classes, head_std=2e-5):
        super().__init__()
        self.backbone, self.vit = backbone, hasattr(backbone, 'blocks')
        dim = backbone.feat_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if self.vit else nn.Identity()
        if self.vit:
            backbone.norm.requires_grad_(False)  # replaced by fc_norm (MAE:models_vit.py:27-32)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_std)
        nn.init.zeros_(self.head.bias)

    def features(self, x):
        if not self.vit:
            return self.backbone(x)  # BxD
        x = self.backbone.prepare_tokens(x)  # Bx(1+N)xD
        for blk in self.backbone.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:].mean(1))  # BxD: patch tokens only

    def forward(self, x):
        return self.head(self.features(x))

    def num_layers(self):
        """n of the layer-decay rule: depth + 1 for a ViT, 5 for a ResNet."""
        return len(self.backbone.blocks) + 1 if self.vit else RESNET_STAGES + 1


VIT_KEYS = ('embed_dim', 'depth', 'num_heads', 'patch_size', 'img_size', 'in_chans', 'mlp_ratio', 'qkv_bias',
            'pos_embed')


def build_classifier(sd, cfg, num_classes, drop_path=0.0, random_init=False, head_std=2e-5):
    """Classifier on the backbone of `cfg` (common.checkpoint.vit_config or infer_resnet_config) with
    `sd` loaded strictly (random_init: the architecture only, freshly initialised). A ViT gets
    stochastic depth `drop_path` (linear over the blocks) and a learnable pos_embed (a fixed sin-cos
    table of MoCo v3 / MAE starts from its values, §17.7.3). ValueError when `sd` does not fit."""
    from common.features import build_backbone
    from common.vit import build_vit
    if cfg.get('vit'):
        backbone = build_vit(None, **{k: cfg[k] for k in VIT_KEYS}, drop_path_rate=drop_path)
        backbone.pos_embed.requires_grad_(True)
    else:
        if drop_path:
            raise ValueError('stochastic depth (drop path) is defined for ViT blocks only')
        backbone = build_backbone(cfg)
    if not random_init:
        try:
            backbone.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f'backbone does not match {cfg}: {" ".join(str(e).split())[:300]}') from None
    return Classifier(backbone, num_classes, head_std)


# ============ layer-wise LR decay and weight decay ============


def layer_id(name, num_layers):
    """Layer id of a Classifier parameter (see the module docstring)."""
    if not name.startswith('backbone.'):
        return num_layers  # fc_norm, head
    n = name[len('backbone.'):]
    if n.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'conv1.', 'bn1.')):
        return 0
    m = re.match(r'blocks\.(\d+)\.', n) or re.match(r'layer(\d)\.', n)
    if m:
        return int(m.group(1)) + 1 if n.startswith('blocks.') else int(m.group(1))
    return num_layers  # a ViT's unused norm (frozen)


def decay_table(model, weight_decay, layer_decay):
    """{name: (layer id, LR scale, weight decay)} of every trainable parameter of a Classifier."""
    n = model.num_layers()
    table = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, n)
        short = name.split('.', 1)[1] if name.startswith('backbone.') else name
        wd = 0.0 if p.ndim == 1 or short in NO_WEIGHT_DECAY else weight_decay
        table[name] = (lid, layer_decay ** (n - lid), wd)
    return table


def param_groups(model, weight_decay, layer_decay):
    """Optimizer groups of decay_table, one per (layer id, weight decay) as MAE's param_groups_lrd;
    the scale is the group's lr_mult (common.optim.set_lr multiplies by it)."""
    groups = {}
    params = dict(model.named_parameters())
    for name, (lid, scale, wd) in decay_table(model, weight_decay, layer_decay).items():
        g = groups.setdefault((lid, wd), dict(params=[], lr_mult=scale, weight_decay=wd, layer_id=lid))
        g['params'].append(params[name])
    return list(groups.values())


# ============ schedule, mixing, data ============


def batch_mixing(num_classes, mixup=0.8, cutmix=1.0, switch_prob=0.5):
    """torchvision.transforms.v2 MixUp (Beta(mixup, mixup)) and/or CutMix (Beta(cutmix, cutmix), lam
    corrected for the clipped box), one of the two per batch (CutMix with `switch_prob`), as timm's
    Mixup in batch mode with prob 1 (`MAE:main_finetune.py:219-225`). Called as mix(images, labels)
    -> (images, NxC soft labels). None when both alphas are 0. Differences from timm: each image is
    mixed with its neighbour in the batch (roll by 1) where timm takes the reversed batch (flip); the
    RNG is torch's (timm: numpy); label smoothing is left to the loss (F.cross_entropy's
    label_smoothing on the mixed targets gives timm's smoothed-then-mixed targets exactly)."""
    from torchvision.transforms import v2
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if len(ops) == 2:
        return v2.RandomChoice(ops, p=[1 - switch_prob, switch_prob])
    return ops[0] if ops else None


def val_loader(val_set, batch_size, rank, world, workers, device):
    """Every val image exactly once over all processes: process r takes images r, r + world, ...
    (eval.lincls.validate sums the counts)."""
    share = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    return torch.utils.data.DataLoader(share, batch_size=batch_size, shuffle=False, **loader_kwargs(workers, device))


def open_data(data, train_tf, val_tf, seed):
    """(train set, val set) of an ImageNet-layout root; SystemExit (one line) for bad input."""
    from common.data import has_split
    if not has_split(data, 'val'):
        raise SystemExit(f'data: {data} needs train/<class>/ and val/<class>/ folders (ImageNet layout)')
    try:
        train_set, val_set = build_dataset(data, train_tf, 'train', seed=seed), build_dataset(data, val_tf, 'val')
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    if not train_set.classes or train_set.classes != val_set.classes:
        raise SystemExit(f'data: train and val must have the same class folders; got {len(train_set.classes)} '
                         f'train and {len(val_set.classes)} val classes')
    return train_set, val_set


def train_loader(train_set, batch_size, rank, world, seed, workers, device):
    """(EpochSampler, DataLoader) of global batch `batch_size` over `world` processes."""
    if batch_size % world:
        raise SystemExit(f'--batch-size {batch_size} is the global batch and must be divisible by the number of '
                         f'processes ({world})')
    try:
        sampler = EpochSampler(len(train_set), batch_size, rank, world, seed)
    except ValueError as e:
        raise SystemExit(f'data: {e}') from None
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size // world, sampler=sampler, drop_last=True,
                                         **loader_kwargs(workers, device))
    return sampler, loader


# ============ training ============


def train_one_epoch(model, loader, optimizer, scaler, lr_at, meter, device, amp, start_iter=0, mix=None,
                    smoothing=0.0, accum_iter=1, step_end=None):
    """One epoch of fine-tuning from batch `start_iter`; returns True when step_end asked to stop.

    lr_at(it): the LR of batch `it`, set at the first batch of each accumulation (MAE's
    engine_finetune.py:46-47). mix: batch_mixing's transform or None (hard labels). The loss is
    cross-entropy with `smoothing`, divided by accum_iter; the optimizer steps every accum_iter
    batches (a partial accumulation at the epoch's end is dropped, as MAE does). step_end(it), called
    after each optimizer step, returns True to stop (common.run.Run.step_end). amp: torch.autocast's
    keyword arguments."""
    model.train()
    fmt = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    optimizer.zero_grad(set_to_none=True)
    lr = lr_at(start_iter)
    for it, (images, target, _) in enumerate(loader, start=start_iter):
        meter.data_ready()
        if it % accum_iter == 0:
            lr = lr_at(it)
            optim.set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        hard = target
        if mix is not None:
            images, target = mix(images, target)  # NxC soft targets
        with torch.autocast(**amp):
            output = model(images)  # NxC
        loss = F.cross_entropy(output.float(), target, label_smoothing=smoothing)
        scaler.scale(loss / accum_iter).backward()
        stepped = (it + 1) % accum_iter == 0
        if stepped:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        acc = {} if mix is not None else dict(acc=(output.argmax(1) == hard).float().mean() * 100)  # hard labels only
        meter.step(it, lr, loss=loss, **acc)
        if stepped and step_end is not None and step_end(it):
            return True
    meter.epoch_end()
    return False
