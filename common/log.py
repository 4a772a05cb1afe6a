"""Logging: progress lines on stdout, one JSON object per record in output-dir/log.jsonl, optional
TensorBoard scalars. Only rank 0 writes; other ranks' calls are no-ops."""
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from common import dist


class Logger:
    """Rank-0 stdout and log.jsonl writer (see the module docstring)."""

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
        """Appends one JSON line; numeric values also go to TensorBoard (tag = key) at `step`. A write
        that fails (full disk) warns once and stops the file; training goes on, and the next
        checkpoint, which cannot be written either, stops the run with its message."""
        if not self.main:
            return
        kv = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in kv.items()}
        if self.file:
            try:
                self.file.write(json.dumps(kv) + '\n')
            except OSError as e:
                self.print(f'warning: cannot write {self.file.name} ({e.strerror or e}); no more log records')
                self.file = None
        if self.tb is not None and step is not None:
            for k, v in kv.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f'{kv.get("type", "train")}/{k}', v, step)

    def tell(self):
        """Bytes written to the log file so far (saved with a checkpoint; None off rank 0)."""
        if not self.file:
            return None
        self.file.flush()
        return self.file.tell()

    def truncate(self, size):
        """Resume: the records after byte `size` were written after the checkpoint and are redone by
        this run; they move to log_stale.jsonl so that every (epoch, iter) appears once in the log.
        Returns the number of records moved."""
        if not self.file or size is None:
            return 0
        self.file.flush()
        path = Path(self.file.name)
        if path.stat().st_size <= size:
            return 0
        with open(path, 'rb') as f:
            f.seek(size)
            tail = f.read()
        with open(path.with_name('log_stale.jsonl'), 'ab') as f:
            f.write(tail)
        os.truncate(path, size)  # the file is open for appending: the next record follows byte `size`
        return tail.count(b'\n')

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



class TrainMeter:
    """Step statistics of one epoch: scalars are summed on the device (no sync per step) and turned
    into a progress line + a log.jsonl record every `print_freq` steps and at the epoch's end.

        meter = TrainMeter(log, epoch, iters, global_batch, device, print_freq)
        for it, batch in enumerate(loader, start=start_iter):
            meter.data_ready()
            ...
            meter.step(it, lr, loss=loss, acc=acc)   # tensors or floats, averaged over the window
        meter.epoch_end()
    img/s counts whole iterations, data loading included.
    """

    NAMES = {'loss': ('Loss', ':.4e'), 'acc': ('Acc@1', ':.2f')}

    def __init__(self, log, epoch, iters, batch_size, device, print_freq):
        self.log, self.epoch, self.iters, self.bs, self.device = log, epoch, iters, batch_size, device
        self.print_freq = print_freq
        self.time, self.data = Meter('Time', ':.3f'), Meter('Data', ':.3f')
        self.meters = {}
        self._reset()
        self.end = self.start

    def _reset(self):
        self.sums, self.n, self.win_data, self.start = {}, 0, 0.0, time.perf_counter()

    def data_ready(self):
        self.win_data += time.perf_counter() - self.end

    def step(self, it, lr, **scalars):
        for k, v in scalars.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        if (it + 1) % self.print_freq == 0 or it + 1 == self.iters:
            self._flush(it, lr)
        self.end = time.perf_counter()

    def _flush(self, it, lr):
        dt = time.perf_counter() - self.start
        self.time.update(dt / self.n, self.n)
        self.data.update(self.win_data / self.n, self.n)
        vals = {k: (float(v) / self.n) for k, v in self.sums.items()}  # float() of a tensor syncs
        for k, v in vals.items():
            if k not in self.meters:
                name, fmt = self.NAMES.get(k, (k, ':.4f'))
                self.meters[k] = Meter(name, fmt)
            self.meters[k].update(v, self.n)
        self.log.print(progress(self.epoch, it + 1, self.iters, [self.time, self.data, *self.meters.values()]))
        self.log.record(step=self.epoch * self.iters + it + 1, type='train', epoch=self.epoch, iter=it + 1,
                        lr=lr, img_s=self.bs * self.n / dt, data_time=self.data.val,
                        peak_mem_mb=peak_memory_mb(self.device), **vals)
        self._reset()

    def state_dict(self):
        """The epoch's statistics so far, for a checkpoint taken mid-epoch: a resumed run's progress
        lines and epoch summary then cover the whole epoch, not only the steps after the resume."""
        meters = {k: dict(val=m.val, sum=m.sum, count=m.count) for k, m in
                  dict(self.meters, _time=self.time, _data=self.data).items()}
        return dict(epoch=self.epoch, sums={k: float(v) for k, v in self.sums.items()}, n=self.n,
                    win_data=self.win_data, win_time=time.perf_counter() - self.start, meters=meters)

    def load_state_dict(self, s):
        self.sums, self.n, self.win_data = dict(s['sums']), s['n'], s['win_data']
        self.start = time.perf_counter() - s['win_time']
        for k, v in s['meters'].items():
            m = {'_time': self.time, '_data': self.data}.get(k)
            if m is None:
                name, fmt = self.NAMES.get(k, (k, ':.4f'))
                m = self.meters[k] = Meter(name, fmt)
            m.val, m.sum, m.count = v['val'], v['sum'], v['count']
            m.avg = m.sum / m.count if m.count else 0.0

    def epoch_end(self, **extra):
        """Prints the epoch's time and records its averages (of the logged windows, weighted by their
        steps)."""
        self.log.print(f'epoch {self.epoch} done in {self.time.sum:.1f} s '
                       f'({self.bs / max(self.time.avg, 1e-9):.1f} img/s)')
        self.log.record(step=(self.epoch + 1) * self.iters, type='epoch', epoch=self.epoch,
                        **{k: m.avg for k, m in self.meters.items()},
                        img_s=self.bs / max(self.time.avg, 1e-9), epoch_time=self.time.sum,
                        peak_mem_mb=peak_memory_mb(self.device), **extra)


def start_run(args, world, device, filename='log.jsonl'):
    """Logger for args.output_dir; prints the git commit, world size, device and every argument."""
    from common.checkpoint import git_commit
    log = Logger(args.output_dir, getattr(args, 'tensorboard', False), filename)
    git = git_commit()
    log.print(f'git {git}  world size {world}  device {device}')
    log.print('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    return log, git
