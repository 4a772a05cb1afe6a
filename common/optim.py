"""Optimisation helpers: linear LR scaling, mmcv-style schedules, regex parameter groups.

Schedule semantics follow mmcv 1.0.3 as every OpenSelfSup config uses them (methods.md §0.2):
the regular LR is evaluated per *epoch* (step: x gamma per passed milestone; cosine to 0), and a
linear warm-up, when asked for, is applied per *iteration* on top of it.
"""
import math
import re

import torch


def scaled_lr(lr_per_256, global_batch):
    """Linear scaling rule (Goyal et al. 2017): the recipe's LR is stated for a global batch of 256."""
    return lr_per_256 * global_batch / 256


def lr_at(base_lr, epoch, it, iters_per_epoch, epochs, cos=False, milestones=(), gamma=0.1,
          warmup_epochs=0, warmup_ratio=0.0):
    """LR of iteration `it` (0-based, within `epoch`)."""
    if cos:
        lr = 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))
    else:
        lr = base_lr * gamma ** sum(epoch >= m for m in milestones)
    cur = epoch * iters_per_epoch + it
    warm = warmup_epochs * iters_per_epoch
    if cur < warm:
        lr *= 1 - (1 - cur / warm) * (1 - warmup_ratio)
    return lr


def warmup_cosine(base_lr, e, warmup_epochs, epochs, min_lr=0.0):
    """LR at fractional epoch e of the modern recipes (MAE:util/lr_sched.py:9-21, M3:main_moco.py:420-428):
    linear from 0 over the warm-up, then a half cosine from base_lr to min_lr at e = epochs."""
    if e < warmup_epochs:
        return base_lr * e / warmup_epochs
    progress = (e - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Sets every group's LR to lr x its lr_mult (default 1)."""
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_mult', 1.0)


PG_KEYS = {'lr_mult': float, 'weight_decay': float, 'momentum': float, 'lars_exclude': lambda v: v.lower() in ('1', 'true', 'yes')}


def parse_param_group(spec):
    """'REGEX:key=value[,key=value]' -> (regex, {key: value}) for argparse `type=`.

    Keys: lr_mult, weight_decay, momentum, lars_exclude (as OpenSelfSup's paramwise_options).
    """
    regex, sep, opts = spec.rpartition(':')
    if not sep or not regex or not opts:
        raise ValueError(f'--param-group {spec!r}: expected REGEX:key=value[,key=value]')
    try:
        re.compile(regex)
    except re.error as e:
        raise ValueError(f'--param-group {spec!r}: bad regex ({e})') from None
    out = {}
    for kv in opts.split(','):
        k, _, v = kv.partition('=')
        if k not in PG_KEYS or not v:
            raise ValueError(f'--param-group {spec!r}: unknown option {kv!r}; keys are {", ".join(PG_KEYS)}')
        out[k] = PG_KEYS[k](v)
    return regex, out


def param_groups(model, rules, log=print):
    """Parameter groups from (regex, options) rules, OpenSelfSup style: a parameter takes the options
    of every rule whose regex it matches (re.search on its name; later rules win on conflicts).
    Parameters with equal options share one group. Frozen parameters are left out. Prints which
    parameters fell in which group."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        opts = {}
        for regex, o in rules:
            if re.search(regex, name):
                opts.update(o)
        key = tuple(sorted(opts.items()))
        groups.setdefault(key, ([], []))
        groups[key][0].append(p)
        groups[key][1].append(name)
    out = []
    for key, (params, names) in groups.items():
        if rules:
            shown = ', '.join(names[:6]) + (f', ... ({len(names)} in all)' if len(names) > 6 else '')
            log(f'param group {dict(key) or "default"}: {shown}')
        out.append({'params': params, **dict(key)})
    return out


def add_param_group_arg(g, default=(), note=''):
    """--param-group REGEX:key=value[,...] (repeatable) on an argparse group; `default` holds the
    method's own rules (as strings), which the user's rules are appended to; `note` ends the help."""
    g.add_argument('--param-group', type=parse_param_group, action='append',
                   default=[parse_param_group(r) for r in default], metavar='REGEX:key=value[,...]',
                   help='options for parameters whose name matches REGEX (keys lr_mult, weight_decay, momentum, '
                        'lars_exclude); repeatable' + (f'; {note}' if note else ''))


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as OpenSelfSup defines it (methods.md §0.3).

    For every parameter w with gradient g, per step:
        trust = eta * ||w|| / (||g|| + wd * ||w||)     (1 for groups with lars_exclude=True)
        d     = (g + wd * w) * lr * trust               (the LR is folded in before momentum)
        buf   = momentum * buf + d                      (buf = d on the first step)
        w    -= buf
    Deviation: trust is 1 where ||w|| or the denominator is 0 (TF SimCLR's guard); OpenSelfSup would
    divide by zero or freeze a zero-initialised weight. The exclusion of BN and bias parameters
    (wd 0, lars_exclude) is expressed with param groups (--param-group), as OpenSelfSup's configs.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, lars_exclude=False, foreach=None):
        """foreach: one multi-tensor kernel per operation over a group (torch._foreach_*) instead of a
        Python loop over its tensors; the same arithmetic. None = on when the parameters are on CUDA,
        where the loop's ~10 small kernels per tensor cost more than the update itself."""
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=lars_exclude, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            foreach = group.get('foreach')  # absent in checkpoints of older versions
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            (self._step_foreach if foreach else self._step_loop)(group, params)
        return loss

    def _trust(self, group, w_norm, g_norm):
        denom = g_norm + group['weight_decay'] * w_norm
        return torch.where((w_norm > 0) & (denom > 0), group['eta'] * w_norm / denom, torch.ones_like(w_norm))

    def _step_loop(self, group, params):
        wd, m = group['weight_decay'], group['momentum']
        for p in params:
            g = p.grad
            if group['lars_exclude']:
                trust = 1.0
            else:
                trust = self._trust(group, torch.linalg.vector_norm(p), torch.linalg.vector_norm(g))
            d = g.add(p, alpha=wd) if wd else g.clone()
            d.mul_(trust * group['lr'])
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = d
            else:
                state['momentum_buffer'].mul_(m).add_(d)
            p.sub_(state['momentum_buffer'])

    def _step_foreach(self, group, params):
        wd, m = group['weight_decay'], group['momentum']
        grads = [p.grad for p in params]
        d = torch._foreach_add(grads, params, alpha=wd) if wd else torch._foreach_mul(grads, 1.0)  # g + wd w
        if group['lars_exclude']:
            torch._foreach_mul_(d, group['lr'])
        else:
            w_norm = torch.stack(torch._foreach_norm(params))  # P
            g_norm = torch.stack(torch._foreach_norm(grads))  # P
            scale = self._trust(group, w_norm, g_norm) * group['lr']  # P: lr * trust per tensor
            torch._foreach_mul_(d, list(scale.unbind()))
        bufs, d_old = [], []
        for p, dp in zip(params, d):
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = dp  # buf = d on the first step
            else:
                bufs.append(state['momentum_buffer'])
                d_old.append(dp)
        if bufs:
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, d_old)  # buf = m buf + d
        torch._foreach_sub_(params, [self.state[p]['momentum_buffer'] for p in params])


class FairLARS(torch.optim.Optimizer):
    """FAIR LARS (methods-modern.md §0a: M3:moco/optimizer.py:10-43, BT:main.py:224-263). Per step, for
    a parameter w with ndim > 1:
        d = g + wd * w;  trust = eta * ||w|| / ||d|| (1 if either norm is 0);  d = trust * d
    parameters with ndim <= 1 (BN, LayerNorm, biases) take d = g (no decay, no adaptation); then
        mu = momentum * mu + d  (mu starts at 0);  w -= lr * mu   (the LR comes after the momentum,
    unlike the OpenSelfSup LARS above, so a change of LR does not rescale the momentum already held).
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group['weight_decay'])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    d = d.mul(torch.where((w_norm > 0) & (d_norm > 0), group['eta'] * w_norm / d_norm,
                                          torch.ones_like(w_norm)))
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                state['mu'].mul_(group['momentum']).add_(d)
                p.add_(state['mu'], alpha=-group['lr'])
        return loss


class LARC(torch.optim.SGD):
    """apex LARC with clip=False around torch SGD (methods-modern.md §0a: SwAV's pretraining
    SW:main_swav.py:171-177, SimSiam's linear evaluation SS:main_lincls.py:231-232). Per parameter,
    when ||w|| and ||g|| are both non-zero:
        a = eta * ||w|| / (||g|| + wd * ||w|| + 1e-8);   g <- (g + wd * w) * a
    (otherwise g is left as it is and gets no decay); then torch SGD with wd 0:
        buf = momentum * buf + g (buf = g on the first step);  w -= lr * buf.
    Every parameter is adapted and decayed, BN and biases included, as apex does. The gradients are
    rewritten in place, as apex does (read them before step())."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-8):
        super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay)
        for group in self.param_groups:
            group.setdefault('eta', eta)
            group.setdefault('eps', eps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decays = []
        for group in self.param_groups:
            wd = group['weight_decay']
            decays.append(wd)
            for p in group['params']:
                if p.grad is None:
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                a = group['eta'] * w_norm / (g_norm + wd * w_norm + group['eps'])
                a = torch.where((w_norm > 0) & (g_norm > 0), a, torch.ones_like(a))
                on = ((w_norm > 0) & (g_norm > 0)).to(p.dtype)
                p.grad.add_(p * (wd * on)).mul_(a)
            group['weight_decay'] = 0.0  # the decay is already in the gradient
        try:
            super().step()
        finally:
            for group, wd in zip(self.param_groups, decays):
                group['weight_decay'] = wd
        return loss


def add_optimizer_arg(g):
    g.add_argument('--optimizer', choices=['lars', 'sgd'], default='lars',
                   help='lars: the paper / OpenSelfSup recipe, BN and bias parameters excluded from weight '
                        'decay and adaptation; sgd: plain SGD with weight decay on every parameter, as '
                        'lightly\'s CIFAR-10 benchmark')


def lars_or_sgd(model, args, lr, log=print, eta=0.001):
    """The --optimizer of SimCLR and BYOL over `model`'s parameters (with --param-group rules). (A resume
    with another --optimizer is refused before, by checkpoint.open_resume's flag comparison.)"""
    if args.optimizer == 'sgd':
        return torch.optim.SGD(param_groups(model, args.param_group, log), lr, momentum=args.momentum,
                               weight_decay=args.wd)
    groups = param_groups(model, LARS_EXCLUDE_RULES + args.param_group, log)
    return LARS(groups, lr, momentum=args.momentum, weight_decay=args.wd, eta=eta)


@torch.no_grad()
def ema_update(target, source, m):
    """target <- m * target + (1 - m) * source, over parameters only (buffers such as BN statistics
    are the target's own). MoCo's key encoder and BYOL's target network."""
    t = list(target.parameters())
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, list(source.parameters()), alpha=1 - m)


# OpenSelfSup's SimCLR/BYOL exclusions (methods.md §0.3): BN and bias parameters get no weight decay
# and no LARS adaptation. As in OpenSelfSup, the downsample BN ('downsample.1.*') does not match the
# first rule; its bias is caught by the second.
LARS_EXCLUDE_RULES = [(r'(bn|gn)(\d+)?.(weight|bias)', {'weight_decay': 0.0, 'lars_exclude': True}),
                      (r'bias', {'weight_decay': 0.0, 'lars_exclude': True})]
