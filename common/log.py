"""Logging: progress lines on stdout, one JSON object per record in output-dir/log.jsonl, optional
TensorBoard scalars. Only rank 0 writes; other ranks' calls are no-ops."""
import json
import resource
import sys
from pathlib import Path

import torch

from common import dist


class Logger:
    def __init__(self, output_dir=None, tensorboard=False, filename='log.jsonl'):
        self.main = dist.is_main()
        self.file = self.tb = None
        if self.main and output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(output_dir) / filename, 'a', buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    self.print('--tensorboard: the tensorboard package is not installed '
                               '(pip install tensorboard); continuing without it')
                else:
                    self.tb = SummaryWriter(Path(output_dir) / 'tb')

    def print(self, *a):
        if self.main:
            print(*a, flush=True)

    def record(self, step=None, **kv):
        """Appends one JSON line; numeric values also go to TensorBoard (tag = key) at `step`."""
        if not self.main:
            return
        kv = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in kv.items()}
        if self.file:
            self.file.write(json.dumps(kv) + '\n')
        if self.tb is not None and step is not None:
            for k, v in kv.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f'{kv.get("type", "train")}/{k}', v, step)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Meter:
    """Running average of a scalar (MoCo's AverageMeter)."""

    def __init__(self, name, fmt=':.4f'):
        self.name, self.fmt = name, fmt
        self.val = self.sum = self.count = 0.0
        self.avg = 0.0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += self.val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ('{name} {val' + self.fmt + '} ({avg' + self.fmt + '})').format(**self.__dict__)


def progress(epoch, it, iters, meters):
    w = len(str(iters))
    return f'Epoch: [{epoch}][{it:>{w}}/{iters}]  ' + '  '.join(str(m) for m in meters)


def peak_memory_mb(device):
    """Peak CUDA memory allocated on `device`, or this process's peak RSS on CPU, in MiB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2 ** 20 if sys.platform == 'darwin' else ru / 2 ** 10

