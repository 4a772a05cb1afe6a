"""What every method's training program shares around its loop, written once.

A method file keeps its own loop (args -> data -> model -> optimizer -> loop -> save); this module
only holds the bookkeeping that would otherwise be copied into each: the run flags, resume, atomic
checkpoints at epoch ends / every --save-iters steps / at --max-steps, the optional kNN monitor
against the same network at initialisation, and the final backbone-only file. `Run` has no hooks
and calls nothing of the method: the method calls it, at the places its loop names.
"""
import copy
import os

import torch

from . import checkpoint, dist
from .knn import KnnMonitor


def add_run_args(p, output_dir, workers=8, device_aug=False):
    """Adds the flags every training program shares: the 'data and speed' group (returned, so the
    method can add its crop and augmentation flags to it) and 'checkpoints and logging'.
    device_aug=True adds --device-aug, for methods whose recipe common.batch_aug reproduces."""
    g = p.add_argument_group('data and speed')
    g.add_argument('-j', '--workers', type=int, default=workers, help='data loading workers per process')
    if device_aug:
        g.add_argument('--device-aug', choices=['off', 'memory', 'files', 'jpeg'], default='off',
                       help='augment batches on --device (CUDA or CPU) with common/batch_aug.py instead of PIL '
                            'in the workers: memory = whole training set decoded once into a uint8 tensor on the '
                            'device (one image size, e.g. CIFAR); files = workers decode, the device augments; '
                            'jpeg = workers read, decode_jpeg on the device. off = the PIL reference path')
        g.add_argument('--aug-prefetch', type=int, default=None, metavar='N',
                       help='--device-aug: batches augmented ahead by a background thread (on CUDA on a stream '
                            'of its own, overlapping the training step); default 1 on CUDA, 0 (in the training '
                            'loop) on CPU. The batches are the same either way')
    g.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the networks, and with --device-aug the augmentation (the first '
                        'steps compile: about a minute on a GPU)')
    g.add_argument('--compile-mode', default='default',
                   choices=['default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'],
                   help='torch.compile mode of the networks: reduce-overhead replays CUDA graphs, for small '
                        'images whose GPU step is launch-bound (the augmentation keeps the default)')
    g.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto')
    g.add_argument('--seed', type=int, default=None, help='random seed (drawn and logged when omitted)')
    g.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower on GPU)')
    c = p.add_argument_group('checkpoints and logging')
    c.add_argument('--output-dir', default=output_dir)
    c.add_argument('--resume', default='', help="checkpoint path, or 'auto' for output-dir/checkpoint_last.pth")
    c.add_argument('--save-freq', type=int, default=10, help='keep checkpoint_EEEE.pth every N epochs')
    c.add_argument('--save-iters', type=int, default=0, help='also checkpoint every N steps (0 = epoch ends only)')
    c.add_argument('--max-steps', type=int, default=0,
                   help='stop (with a checkpoint) after N steps in all; for smoke tests and benchmarks')
    c.add_argument('--print-freq', type=int, default=10)
    c.add_argument('--knn-every', type=int, default=0,
                   help='weighted-kNN monitor every N epochs on the val split (0 = off)')
    c.add_argument('--knn-k', type=int, default=200)
    c.add_argument('--knn-t', type=float, default=0.07, help='kNN monitor temperature (lightly\'s benchmarks: 0.1)')
    c.add_argument('--tensorboard', action='store_true', help='also write TensorBoard scalars (needs tensorboard)')
    return g


def add_backbone_args(g, arch='resnet50'):
    """--arch/--width/--cifar-stem on the method's 'model' group."""
    g.add_argument('--arch', default=arch, help='resnet10|18|34|50|101|152 (torchvision names)')
    g.add_argument('--width', type=int, default=64, help='ResNet base width (64 = torchvision)')
    g.add_argument('--cifar-stem', action='store_true', help='3x3 stride-1 conv1, no max-pool (32x32 data)')


def autocast(args, device):
    """The --amp context for the forward pass (a no-op with --amp off)."""
    return torch.autocast(device_type=device.type, enabled=args.amp != 'off',
                          dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16)


def compile_modules(args, *modules):
    """--compile: torch.compile each module in place (nn.Module.compile keeps the state_dict names, so
    checkpoints and backbone.pth are unchanged); a --device-aug loader among them compiles its
    batched augmentation (a PIL DataLoader is left as it is). Call it after Run(): the kNN baseline
    of Run() evaluates a deep copy of the backbone, and a copy of a compiled module would run the
    original."""
    if args.compile:
        for m in modules:
            if isinstance(m, torch.nn.Module):
                m.compile(mode=args.compile_mode)
            elif hasattr(m, 'compile'):
                m.compile()


def memory_format(device):
    """channels_last on CUDA (faster convs under AMP), the default layout elsewhere."""
    return torch.channels_last if device.type == 'cuda' else torch.contiguous_format


class Run:
    """Resume, checkpoints, --max-steps, the kNN monitor and the final backbone of one training run.

    core: the unwrapped model (not DDP); backbone: the name of its ResNet submodule (e.g.
    'encoder_q'), whose weights are saved as backbone.pth and evaluated by the kNN monitor.
    ckpt/ckpt_path: from checkpoint.open_resume. After construction, start_epoch/start_iter say where
    the loop begins and `resumed` whether it continues a checkpoint. knn_size: the monitor's image
    size when it is not --crop-size. `extra` is saved into every
    checkpoint (plain values and tensors only) and `ckpt_extra` holds what the resumed one saved.
    """

    def __init__(self, args, core, backbone, optimizer, scaler, ckpt, ckpt_path, git, log, device,
                 knn_size=None):
        self.args, self.core, self.prefix = args, core, backbone + '.'
        self.optimizer, self.scaler, self.git, self.log = optimizer, scaler, git, log
        self.backbone = core.get_submodule(backbone)
        self.start_epoch, self.start_iter, self.knn_random = 0, 0, None
        self.resumed, self.extra, self.ckpt_extra, self.last = ckpt is not None, {}, {}, {}
        if ckpt:
            self.start_epoch, self.start_iter = checkpoint.restore(ckpt, ckpt_path, core, optimizer, scaler, log)
            self.knn_random = ckpt.get('knn_random')
            self.ckpt_extra = ckpt.get('extra', {})
        self.knn = None
        if args.knn_every:
            self.knn = KnnMonitor(args.data, knn_size or args.crop_size, args.knn_k, args.workers, device,
                                  args.knn_t)
            if self.knn_random is None:  # the same network at initialisation, once per run
                self.knn_random = self.knn(copy.deepcopy(self.backbone))
                log.print(f'kNN top-1 of the randomly initialised backbone: {self.knn_random:.2f}')

    def save(self, epoch, it, keep=False):
        """Checkpoint that continues at (epoch, it). Collective: every process calls it."""
        state = checkpoint.training_state(self.core, self.prefix, self.optimizer, self.scaler, epoch, it,
                                          self.args, self.git, knn_random=self.knn_random, extra=self.extra)
        if dist.is_main():
            checkpoint.save_training(state, self.args.output_dir, epoch, keep)

    def step_end(self, step, epoch, it, iters):
        """After optimizer step number `step` (1-based, counted over the run) made at batch `it` of
        `iters`: checkpoint every --save-iters steps; returns True (after a checkpoint) once
        --max-steps is reached, and the loop must stop."""
        a = self.args
        last_batch = it + 1 >= iters
        if a.save_iters and step % a.save_iters == 0 and not last_batch:
            self.save(epoch, it + 1)  # epoch ends are saved by epoch_end
        if a.max_steps and step >= a.max_steps:
            self.save(epoch + 1, 0) if last_batch else self.save(epoch, it + 1)
            self.log.print(f'--max-steps {a.max_steps} reached')
            return True
        return False

    def knn_due(self, epoch):
        a = self.args
        return self.knn is not None and ((epoch + 1) % a.knn_every == 0 or epoch + 1 == a.epochs)

    def epoch_end(self, epoch, **extra):
        """After epoch `epoch` completes: the kNN monitor when due (with the method's `extra` numbers,
        which it computes only when knn_due) and the epoch-end checkpoint."""
        self.last = {}
        if self.knn_due(epoch):
            self.last = dict(knn_top1=self.knn(self.backbone), knn_random=self.knn_random, **extra)
            more = ''.join(f', {k} {v:.2f}' for k, v in extra.items())
            self.log.print(f'epoch {epoch}: kNN top-1 {self.last["knn_top1"]:.2f} '
                           f'(random init {self.knn_random:.2f}){more}')
            self.log.record(type='knn', epoch=epoch, **self.last)
        self.save(epoch + 1, 0, keep=(epoch + 1) % self.args.save_freq == 0 or epoch + 1 == self.args.epochs)

    def finish(self):
        """backbone.pth (torchvision names, no fc), the final kNN line, and shutdown."""
        out = os.path.join(self.args.output_dir, 'backbone.pth')
        if dist.is_main():
            checkpoint.save_backbone(self.backbone, out)
            self.log.print(f'backbone (torchvision names, no fc) saved to {out}')
            if self.last:
                self.log.print(f'weighted kNN top-1 (k={self.args.knn_k}): trained {self.last["knn_top1"]:.2f}  '
                               f'random init {self.knn_random:.2f}')
        self.log.close()
        dist.cleanup()
