"""What every method's training program shares around its loop, written once.

A method file keeps its own loop (args -> data -> model -> optimizer -> loop -> save); this module
only holds the bookkeeping that would otherwise be copied into each: the run flags, resume, atomic
checkpoints at epoch ends / every --save-iters steps / at --max-steps, the optional kNN monitor
against the same network at initialisation, and the final backbone-only file. `Run` has no hooks
and calls nothing of the method: the method calls it, at the places its loop names.
"""
import copy
import hashlib
import os
import shlex
import signal
import sys
import threading

import torch

from . import checkpoint, dist
from .knn import KnnMonitor
from .log import TrainMeter
from .resnet import ARCHS, build_resnet
from .vit import ARCHS as VIT_ARCHS, build_vit


def positive(kind):
    """argparse type: a number of `kind` > 0 (a negative or zero --lr, batch or epoch count is a typo)."""
    def parse(text):
        v = kind(text)
        if not v > 0:
            raise ValueError
        return v
    parse.__name__ = f'positive {kind.__name__}'  # argparse's message: "invalid positive float value: '-0.1'"
    return parse


def add_run_args(p, output_dir, workers=8, device_aug=False, dist_timeout=10):
    """Adds the flags every training program shares: the 'data and speed' group (returned, so the
    method can add its crop and augmentation flags to it) and 'checkpoints and logging'.
    device_aug=True adds --device-aug, for methods whose recipe common.batch_aug reproduces.
    dist_timeout: default of --dist-timeout (longer where rank 0 clusters while the others wait)."""
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
    g.add_argument('--dist-timeout', type=positive(float), default=dist_timeout, metavar='MIN',
                   help='minutes a process waits for the others in a collective before the run fails '
                        '(a stalled or dead process then ends the run instead of hanging it)')
    c = p.add_argument_group('checkpoints and logging')
    c.add_argument('--output-dir', default=output_dir,
                   help='folder of the run; one that holds another run is refused unless --resume auto '
                        'continues it or --overwrite replaces it')
    c.add_argument('--resume', default='', help="checkpoint path, or 'auto' for output-dir/checkpoint_last.pth "
                   "(a fresh run when there is none)")
    c.add_argument('--overwrite', action='store_true',
                   help='delete the run already in --output-dir (checkpoints, backbone, logs) and start over')
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


def add_backbone_args(g, arch='resnet50', vit=False):
    """--arch/--width/--cifar-stem on the method's 'model' group; vit=True (MoCo v3, DINO) also offers
    the ViTs of common/vit.py and --patch-size (see build_backbone)."""
    archs = list(ARCHS) + (list(VIT_ARCHS) if vit else [])
    g.add_argument('--arch', default=arch, choices=archs, metavar='ARCH',
                   help='|'.join(archs) + ' (torchvision / timm names)')
    g.add_argument('--width', type=int, default=64, help='ResNet base width (64 = torchvision)')
    g.add_argument('--cifar-stem', action='store_true', help='3x3 stride-1 conv1, no max-pool (32x32 data)')
    if vit:
        g.add_argument('--patch-size', type=positive(int), default=None,
                       help='ViT patch size; default 16, and 4 when --crop-size is 64 or less')


def is_vit(args):
    return args.arch in VIT_ARCHS


def build_backbone(args, **vit_kwargs):
    """The --arch backbone without classifier: a ViT of common/vit.py at --crop-size (vit_kwargs:
    drop_path_rate, init, pos_embed, num_heads...) or a ResNet of common/resnet.py."""
    if is_vit(args):
        return build_vit(args.arch, args.patch_size, img_size=args.crop_size, **vit_kwargs)
    return build_resnet(args.arch, 0, args.width, args.cifar_stem)


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


STOP_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGINT')  # kill/scancel, SLURM's warning before the time limit, Ctrl-C


class StopSignal:
    """Turns SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next step boundary: the run
    then writes a checkpoint at that step and exits (Run.step_end), instead of dying mid-step with up
    to an epoch lost. Further signals are absorbed (torchrun forwards the one SLURM also sends to
    every process), except a second Ctrl-C on a single process, which stops at once. The handler only
    sets a number; nothing is printed from it (a print inside a print would raise)."""

    def __init__(self, device):
        self.signum, self.device, self.pending, self.previous = 0, device, None, {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT and not dist.is_dist():
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        if dist.is_main():
            os.write(2, f'{signal.Signals(signum).name}: stopping after this step with a checkpoint\n'.encode())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def requested(self, wait=False):
        """The signal number when some process got a stop signal, else 0; the same on every process
        and at the same step (collective). On CUDA, without `wait`, the answer is the previous call's,
        read behind an event, so that the host never waits for the step in flight."""
        if not dist.is_dist():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        if self.device.type != 'cuda' or wait:
            self.pending = None
            return int(flag)
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self.pending = self.pending, (host, event)
        if previous is None:
            return 0
        previous[1].synchronize()
        return int(previous[0])


def continue_command():
    """This program's command line with --resume auto in place of --resume/--overwrite."""
    argv, out, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
        elif a == '--resume':
            skip = True
        elif not a.startswith('--resume=') and a != '--overwrite':
            out.append(a)
    prog = ('torchrun [the same torchrun flags] ' if 'TORCHELASTIC_RUN_ID' in os.environ or
            dist.get_world_size() > 1 else 'python ')
    return prog + shlex.join([sys.argv[0], *out, '--resume', 'auto'])


def data_fingerprint(dataset):
    """{'images', 'fingerprint'} of a training set: its size, and a hash of the class folder, file name
    and label of every image (so a moved dataset still matches, another file list does not)."""
    samples = getattr(dataset, 'samples', None)
    if samples is None:  # synthetic data
        return dict(images=len(dataset), fingerprint=type(dataset).__name__)
    h = hashlib.sha1()
    for path, label in samples:
        h.update(('/'.join(path.replace(os.sep, '/').rsplit('/', 2)[-2:]) + f'\t{label}\n').encode())
    return dict(images=len(samples), fingerprint=h.hexdigest()[:16])


class Run:
    """Resume, checkpoints, stop signals, --max-steps, the kNN monitor and the final backbone of one
    training run.

    core: the unwrapped model (not DDP); backbone: the name of its ResNet submodule (e.g.
    'encoder_q'), whose weights are saved as backbone.pth and evaluated by the kNN monitor.
    ckpt/ckpt_path: from checkpoint.open_resume. dataset: the training set (a resumed run must see
    the same images). After construction, start_epoch/start_iter say where the loop begins and
    `resumed` whether it continues a checkpoint. knn_size: the monitor's image size when it is not
    --crop-size. `extra` is saved into every checkpoint (plain values and tensors only) and
    `ckpt_extra` holds what the resumed one saved. The loop makes its TrainMeter with train_meter().
    """

    def __init__(self, args, core, backbone, optimizer, scaler, ckpt, ckpt_path, git, log, device,
                 dataset, knn_size=None):
        self.args, self.core, self.prefix = args, core, backbone + '.'
        self.optimizer, self.scaler, self.git, self.log = optimizer, scaler, git, log
        self.backbone = core.get_submodule(backbone)
        self.start_epoch, self.start_iter, self.knn_random = 0, 0, None
        self.resumed, self.extra, self.ckpt_extra, self.last = ckpt is not None, {}, {}, {}
        self.data = data_fingerprint(dataset)
        self.meter, self.ckpt_meter, self.saved_at = None, None, None
        if ckpt:
            self._check_data(ckpt, ckpt_path)
            self.start_epoch, self.start_iter = checkpoint.restore(ckpt, ckpt_path, core, optimizer, scaler, log)
            self.knn_random = ckpt.get('knn_random')
            self.ckpt_extra = ckpt.get('extra', {})
            self.ckpt_meter = ckpt.get('meter')
            self.saved_at = (self.start_epoch, self.start_iter)
            if os.path.samefile(ckpt_path.parent, args.output_dir) and (n := log.truncate(ckpt.get('log_bytes'))):
                log.print(f'{n} log records written after that checkpoint moved to log_stale.jsonl')
        self.device = device
        self.stop = StopSignal(device)
        self.knn = None
        if args.knn_every:
            self.knn = KnnMonitor(args.data, knn_size or args.crop_size, args.knn_k, args.workers, device,
                                  args.knn_t, train_set=dataset)
            if self.knn_random is None:  # the same network at initialisation, once per run
                self.knn_random = self.knn(copy.deepcopy(self.backbone))
                log.print(f'kNN top-1 of the randomly initialised backbone: {self.knn_random:.2f}')

    def _check_data(self, ckpt, path):
        old, new = ckpt.get('data'), self.data
        if old is None or old == new:
            return
        what = (f'it was written on {old["images"]} images, {self.args.data} has {new["images"]}'
                if old['images'] != new['images'] else
                f'{self.args.data} has its {new["images"]} images but another file list')
        dist.exit_all(f'--resume {path}: the training data differ ({what}); resume on the same data, or start a '
                      f'new run in another --output-dir')

    def train_meter(self, epoch, iters, batch_size):
        """The epoch's TrainMeter; in the epoch a run resumes mid-way, it continues the statistics the
        checkpoint carried (so the epoch summary covers the whole epoch)."""
        self.meter = TrainMeter(self.log, epoch, iters, batch_size, self.device, self.args.print_freq)
        if self.ckpt_meter and self.ckpt_meter['epoch'] == epoch:
            self.meter.load_state_dict(self.ckpt_meter)
        self.ckpt_meter = None
        return self.meter

    def save(self, epoch, it, keep=False):
        """Checkpoint that continues at (epoch, it). Collective: every process calls it, and every
        process stops, with one line from rank 0, when the file cannot be written (the previous
        checkpoint stays as it was)."""
        meter = self.meter.state_dict() if it and self.meter is not None and self.meter.epoch == epoch else None
        state = checkpoint.training_state(self.core, self.prefix, self.optimizer, self.scaler, epoch, it,
                                          self.args, self.git, knn_random=self.knn_random, extra=self.extra,
                                          method=getattr(self.args, 'method', None), data=self.data, meter=meter,
                                          log_bytes=self.log.tell())
        self._write(lambda: checkpoint.save_training(state, self.args.output_dir, epoch, keep))
        self.saved_at = (epoch, it)

    def _write(self, write):
        """write() on rank 0; an OSError there (full disk, folder gone) ends every process."""
        def attempt():
            try:
                write()
            except OSError as e:
                kept = (f'the previous checkpoint (epoch {self.saved_at[0]} iteration {self.saved_at[1]}) is kept'
                        if self.saved_at else 'no checkpoint was written before')
                raise SystemExit(f'{e}; {kept}; free space or fix {self.args.output_dir}, then continue with: '
                                 f'{continue_command()}') from None
        dist.on_main(attempt)

    def _interrupt(self, signum, epoch, it, iters, saved=False):
        """Stop signal: checkpoint at (epoch, it) unless `saved`, one line, exit 128 + signal."""
        if not saved:
            self.save(epoch, it)
        where = f'at epoch {epoch} step {it} of {iters}' if iters else f'at the end of epoch {epoch - 1}'
        if dist.is_main():
            print(f'interrupted by {signal.Signals(signum).name} {where}; checkpoint '
                  f'{os.path.join(self.args.output_dir, "checkpoint_last.pth")}; continue with: {continue_command()}',
                  file=sys.stderr, flush=True)
        self.stop.restore()
        self.log.close()
        dist.cleanup()
        raise SystemExit(128 + signum)

    def step_end(self, step, epoch, it, iters):
        """After optimizer step number `step` (1-based, counted over the run) made at batch `it` of
        `iters`: checkpoint every --save-iters steps; after a stop signal, checkpoint and exit (the last
        batch of an epoch leaves that to epoch_end); returns True (after a checkpoint) once
        --max-steps is reached, and the loop must stop."""
        a = self.args
        last_batch = it + 1 >= iters
        if not last_batch and (signum := self.stop.requested()):
            self._interrupt(signum, epoch, it + 1, iters)
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
        which it computes only when knn_due), the epoch-end checkpoint, and the exit after a stop
        signal."""
        self.last = {}
        if self.knn_due(epoch):
            self.last = dict(knn_top1=self.knn(self.backbone), knn_random=self.knn_random, **extra)
            more = ''.join(f', {k} {v:.2f}' for k, v in extra.items())
            self.log.print(f'epoch {epoch}: kNN top-1 {self.last["knn_top1"]:.2f} '
                           f'(random init {self.knn_random:.2f}){more}')
            self.log.record(type='knn', epoch=epoch, **self.last)
        self.save(epoch + 1, 0, keep=(epoch + 1) % self.args.save_freq == 0 or epoch + 1 == self.args.epochs)
        if (signum := self.stop.requested(wait=True)) and epoch + 1 < self.args.epochs:
            self._interrupt(signum, epoch + 1, 0, None, saved=True)

    def finish(self):
        """backbone.pth (a ResNet's torchvision names without fc, a ViT's timm names without head), the
        final kNN line, and shutdown."""
        out = os.path.join(self.args.output_dir, 'backbone.pth')
        self._write(lambda: checkpoint.save_backbone(self.backbone, out))
        names = 'timm names, no head' if hasattr(self.backbone, 'blocks') else 'torchvision names, no fc'
        self.log.print(f'backbone ({names}) saved to {out}')
        if self.last:
            self.log.print(f'weighted kNN top-1 (k={self.args.knn_k}): trained {self.last["knn_top1"]:.2f}  '
                           f'random init {self.knn_random:.2f}')
        self.stop.restore()
        self.log.close()
        dist.cleanup()
