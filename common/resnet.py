"""ResNet builder with torchvision parameter names, configurable base width and a CIFAR stem.

With the default width (64) and stem the state dict of `build_resnet('resnet50')` has exactly the
keys and shapes of `torchvision.models.resnet50()` (fc aside), so backbones move between this repo,
torchvision, timm and detectron2 by renaming alone. Smaller widths/depths (e.g. resnet10 width 32)
exist for CPU demos and tests.

Initialisation follows OpenSelfSup (methods.md §0.1): Kaiming-normal fan_in for every conv, BN
weight 1 / bias 0. torchvision uses fan_out; `init='fan_out'` reproduces that.
"""
import re
from functools import partial

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

ARCHS = {
    'resnet10': (BasicBlock, [1, 1, 1, 1]),  # not in torchvision: the smallest 4-stage ResNet
    'resnet18': (BasicBlock, [2, 2, 2, 2]),
    'resnet34': (BasicBlock, [3, 4, 6, 3]),
    'resnet50': (Bottleneck, [3, 4, 6, 3]),
    'resnet101': (Bottleneck, [3, 4, 23, 3]),
    'resnet152': (Bottleneck, [3, 8, 36, 3]),
}


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per sub-batch of N/num_splits samples.

    Emulates the per-GPU BN of a num_splits-GPU run on one device (the MoCo CIFAR demo's trick), so
    the single-process key encoder cannot "cheat" through batch statistics shared with the query.
    Eval mode uses the running statistics as usual; the state dict equals BatchNorm2d's.
    """

    def __init__(self, num_features, num_splits=1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.num_splits:
            raise ValueError(f'SplitBatchNorm: batch {n} is not divisible by num_splits={self.num_splits}')
        s = self.num_splits
        # fold the splits into channels: one BN call computes s independent batch statistics
        rm, rv = self.running_mean.repeat(s), self.running_var.repeat(s)
        # (a channels_last input cannot be viewed so: reshape copies it, and the output goes back)
        out = nn.functional.batch_norm(
            x.reshape(n // s, c * s, h, w), rm, rv, self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum, self.eps).view(n, c, h, w)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        # running stats: the mean over the splits (each split updated them with momentum), written in
        # place (out=: one kernel each, not a mean and a copy)
        torch.mean(rm.view(s, c), 0, out=self.running_mean)
        torch.mean(rv.view(s, c), 0, out=self.running_var)
        self.num_batches_tracked += 1
        return out


class ResNet(nn.Module):
    """torchvision-compatible ResNet: conv1/bn1/relu/maxpool, layer1-4, global mean pool, fc.

    num_classes=0 makes fc an Identity (forward returns the pooled feature, `feat_dim` wide).
    cifar_stem: 3x3 stride-1 conv1 and no max-pool, for 32x32 inputs.
    """

    def __init__(self, block, layers, num_classes=0, width=64, cifar_stem=False, in_channels=3,
                 norm_layer=None, init='fan_in', zero_init_residual=False):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = width
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.feat_dim = width * 8 * block.expansion
        self.fc = nn.Linear(self.feat_dim, num_classes) if num_classes else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=init, nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                self._norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x):
        """Returns [stem (before max-pool), layer1, layer2, layer3, layer4] maps (OSS indices 0-4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        outs = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs

    def pooled(self, x):
        """Global-average-pooled layer4 feature (N x feat_dim), i.e. forward() without fc."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # torchvision's avgpool as a mean: its CUDA backward has a deterministic kernel (--deterministic)
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.pooled(x))


def build_resnet(arch='resnet50', num_classes=0, width=64, cifar_stem=False, in_channels=3,
                 bn_splits=1, init='fan_in', zero_init_residual=False):
    if arch not in ARCHS:
        raise ValueError(f'--arch {arch!r} is not supported; choose one of {", ".join(ARCHS)}')
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    block, layers = ARCHS[arch]
    return ResNet(block, layers, num_classes, width, cifar_stem, in_channels, norm, init,
                  zero_init_residual)


def infer_resnet_config(state_dict):
    """Reads arch, width, stem and input channels off a backbone state dict (torchvision names).

    Lets eval tools rebuild any backbone of this repo, or torchvision's, without architecture flags.
    """
    if 'conv1.weight' not in state_dict or 'layer4.0.conv1.weight' not in state_dict:
        raise ValueError('not a ResNet state dict: conv1.weight / layer4.* missing')
    w = state_dict['conv1.weight']
    bottleneck = 'layer1.0.conv3.weight' in state_dict
    blocks = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in state_dict for m in [re.match(rf'layer{i}\.(\d+)\.', k)] if m}
        blocks.append(max(idx) + 1)
    for arch, (block, layers) in ARCHS.items():
        if layers == blocks and (block is Bottleneck) == bottleneck:
            break
    else:
        raise ValueError(f'ResNet with blocks {blocks} (bottleneck={bottleneck}) matches no known arch')
    return dict(arch=arch, width=w.shape[0], cifar_stem=w.shape[-1] == 3, in_channels=w.shape[1])


# ---------------------------------------------------------------- DeepCluster's Sobel front end

class Sobel(nn.Module):
    """Fixed Sobel front end (DeepCluster, arXiv:1807.05520 §4; deepcluster models/alexnet.py; OSS
    models/utils/sobel.py): a 1x1 conv averaging R, G, B (weights 1/3), then 3x3 Sobel-x / Sobel-y
    filters (padding 1). Nx3xHxW -> Nx2xHxW, applied to the normalised image.

    The filters are non-persistent buffers: they get no gradient, are not in the state dict (a
    Sobel backbone's state dict is that of a 2-channel ResNet) and move with .to(device).
    """

    def __init__(self):
        super().__init__()
        gx = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])  # d/dx, responds to vertical edges
        self.register_buffer('gray', torch.full((1, 3, 1, 1), 1 / 3), persistent=False)
        self.register_buffer('filters', torch.stack([gx, gx.T]).unsqueeze(1), persistent=False)  # 2x1x3x3

    def forward(self, x):
        x = nn.functional.conv2d(x, self.gray.to(x.dtype))  # Nx1xHxW grayscale
        return nn.functional.conv2d(x, self.filters.to(x.dtype), padding=1)  # Nx2xHxW


class SobelResNet(ResNet):
    """ResNet with in_channels=2 behind the fixed Sobel front end: takes RGB like any backbone here,
    and has exactly the state dict of the 2-channel ResNet (the front end holds no state)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.conv1.in_channels != 2:
            raise ValueError('SobelResNet needs in_channels=2')
        self.sobel = Sobel()

    def forward_stages(self, x):
        return super().forward_stages(self.sobel(x))

    def pooled(self, x):
        return super().pooled(self.sobel(x))


def build_resnet_sobel(arch='resnet50', num_classes=0, width=64, cifar_stem=False, bn_splits=1,
                       init='fan_in', zero_init_residual=False):
    """build_resnet(..., in_channels=2) behind the Sobel front end (DeepCluster; OSS with_sobel=True)."""
    if arch not in ARCHS:
        raise ValueError(f'--arch {arch!r} is not supported; choose one of {", ".join(ARCHS)}')
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    block, layers = ARCHS[arch]
    return SobelResNet(block, layers, num_classes, width, cifar_stem, 2, norm, init, zero_init_residual)
