"""Optimisation helpers: linear LR scaling, mmcv-style schedules, regex parameter groups.

Schedule semantics follow mmcv 1.0.3 as every OpenSelfSup config uses them (methods.md §0.2):
the regular LR is evaluated per *epoch* (step: x gamma per passed milestone; cosine to 0), and a
linear warm-up, when asked for, is applied per *iteration* on top of it.
"""
import math
import re


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
