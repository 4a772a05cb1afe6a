"""Distributed helpers. Every function works without a process group (it is then a no-op on one
process), so the same script runs under plain `python` and under torchrun on N processes/nodes."""
import datetime
import inspect
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return get_rank() == 0


def init_distributed(device_arg=None, timeout_min=None):
    """Sets up from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPU, gloo on CPU.

    Returns (rank, world_size, device). `device_arg` ('cpu', 'cuda') overrides auto-selection.
    `timeout_min`: minutes a collective may wait for the other processes before the run fails
    (--dist-timeout), instead of hanging on a stalled one; None = PyTorch's default.
    """
    world = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = torch.cuda.is_available() if device_arg in (None, 'auto') else device_arg == 'cuda'
    if device_arg == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda given but no CUDA device is visible; use --device cpu')
    device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_dist():
        timeout = datetime.timedelta(minutes=timeout_min) if timeout_min else None
        dist.init_process_group('nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None,
                                timeout=timeout)
    return get_rank(), get_world_size(), device


def ddp(model, device, sync_buffers=True):
    """DistributedDataParallel over this process's device. sync_buffers=False: buffers are not copied
    from rank 0 before each forward, for models that keep them identical by construction (queues,
    banks) or per process (BN statistics; rank 0's are saved). torch 2.14 renamed that option
    (forward_sync_buffers) and warns on every process about the old name."""
    kw = {}
    if not sync_buffers:
        new = 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        kw = {'forward_sync_buffers' if new else 'broadcast_buffers': False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                                     **kw)


def place(model, device, sync_bn=False, sync_buffers=False, channels_last=True):
    """The placement every training program does: SyncBatchNorm if asked, onto the device,
    channels_last on CUDA (faster convs under AMP), then DDP with several processes. Buffers are not
    broadcast by default: BN statistics stay per process (rank 0's are saved) and queues/banks are
    kept identical by construction. Returns (the module to call, the unwrapped module)."""
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last and device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    return (ddp(model, device, sync_buffers) if get_world_size() > 1 else model), model


def seed_all(seed, deterministic=False):
    """Seeds python, numpy and torch alike on every process (so models start identical), and with
    `deterministic` asks for deterministic kernels (slower on GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def cleanup():
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def concat_all_gather(t):
    """All-gather along dim 0, no gradient. Assumes the same shape on every process."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast(t, src=0):
    if is_dist():
        dist.broadcast(t, src)
    return t


def all_reduce_sum(t):
    if is_dist():
        dist.all_reduce(t)
    return t


def gather_objects(obj):
    """List with every process's `obj` (picklable), in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn):
    """fn() on rank 0, its (picklable) result on every process. A SystemExit in fn ends every process:
    rank 0 with its message, the others silently (so that a refusal at start does not leave them
    waiting at the next collective, and is printed once)."""
    out = [None]
    if is_main():
        try:
            out = [('ok', fn())]
        except SystemExit as e:
            out = [('exit', e.code)]
    if is_dist():
        dist.broadcast_object_list(out, 0)
    kind, value = out[0]
    if kind == 'exit':
        raise SystemExit(value if is_main() else 1)
    return value


def exit_all(message):
    """SystemExit on every process for an error they all found alike: printed by rank 0 only."""
    raise SystemExit(message if is_main() else 1)


def barrier():
    if is_dist():
        dist.barrier()


@torch.no_grad()
def batch_shuffle(x, perm=None):
    """ShuffleBN, shuffle half (MoCo, arXiv:1911.05722 §3.3): permute the *global* batch and give each
    process its slice, so no process computes BN statistics over the keys of its own queries.

    x: local batch (NxCxHxW). perm: optional permutation of the global batch (injected by tests);
    otherwise drawn on rank 0 from the CPU generator and broadcast. Returns (local slice, the
    global inverse permutation for batch_unshuffle).
    """
    x_all = concat_all_gather(x)
    n_all = x_all.shape[0]
    if perm is None:
        perm = torch.randperm(n_all)
    perm = broadcast(perm.to(x.device))
    n = x.shape[0]
    r = get_rank()
    return x_all[perm[r * n:(r + 1) * n]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x, idx_unshuffle):
    """Inverse of batch_shuffle: gathers the shuffled outputs and returns this process's rows in the
    original order."""
    x_all = concat_all_gather(x)
    n = x.shape[0]
    r = get_rank()
    return x_all[idx_unshuffle[r * n:(r + 1) * n]]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)  # world x N x ...: this process's loss w.r.t. every process's rows
        dist.all_reduce(g)      # summed over processes: every loss's gradient w.r.t. every row
        return g[get_rank()]


def gather_with_grad(x):
    """All-gather along dim 0 that carries gradients back to every process's rows.

    The backward all-reduces the incoming gradients before taking this process's slice, so rows of
    process r receive the gradient of *every* process's loss, not only of process r's (the defect of
    the GatherLayer most SimCLR ports copy, methods.md §2.1). With DDP averaging parameter gradients
    over W processes, the result equals the gradient of the mean of the W losses, i.e. of one process
    running the whole batch with a loss that is the mean over all anchors.
    """
    if not is_dist():
        return x
    return torch.cat(_GatherWithGrad.apply(x))
