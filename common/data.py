"""Datasets and the epoch sampler.

Accepted data arguments (labels are optional for pre-training):
  * ImageNet layout `ROOT/train/<class>/*`, `ROOT/val/<class>/*` (pass ROOT or ROOT/train);
  * a folder of class folders (torchvision ImageFolder);
  * a flat folder of images (label -1);
  * an image-list file: one `path [label]` per line, paths relative to the file's folder;
  * `synthetic[:SIZE]`: fixed random tensors, no decoding or augmentation (pure-compute timing).

Reproducible augmentation: the sampler yields (index, epoch) keys and the dataset seeds the
augmentation of each sample from (seed, epoch, index). A view is therefore the same whatever the
number of workers or processes, and a run resumed mid-epoch continues exactly.

Unreadable images stop the run with an error naming the file (a silently skipped image would change
batch composition and make resume inexact); remove or replace the file and --resume. Missing and
0-byte files are found before training, by one stat per image when the dataset is built. 16-bit and
float greyscale images are scaled to 8 bits (to_rgb), not clipped.
"""
import contextlib
import os
import queue
import random
import signal
import threading
from functools import partial
from pathlib import Path
from stat import S_ISREG

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_leaves

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / 'data' / 'cifar10_sample'  # 500 train + 100 val images per class, see its README


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS)


def scan(path, split='train'):
    """Returns (samples, classes): samples is a list of (file, label); label -1 when unlabelled.
    Every image is stat'ed once: missing or empty files raise ValueError here, not hours into a run."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f'data path {p} does not exist; pass an ImageNet-layout folder, '
                                f'an image folder or an image-list file')
    if p.is_file():
        return _read_list(p)
    if (p / split).is_dir():
        p = p / split
    entries = sorted(os.scandir(p), key=lambda e: e.name)
    files = [e for e in entries if e.is_file() and _is_image(e.name)]
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith('.')]
    found = [(e, -1) for e in files]
    for label, c in enumerate(classes):  # the order of sorted(os.walk(...)): folders by path, files by name
        for _, names in sorted(_walk(os.path.join(p, c)), key=lambda t: t[0]):
            found += [(e, label) for e in sorted(names, key=lambda e: e.name) if _is_image(e.name)]
    if not found:
        raise FileNotFoundError(f'no images ({"/".join(IMG_EXTENSIONS)}) found in {p}')
    _check(((e.path, _fault(e.stat)) for e, _ in found), len(found), p, 'remove or replace them', p)
    samples = [(e.path, label) for e, label in found]
    if files and classes:  # mixed: unlabelled files beside class folders
        classes = []
        samples = [(f, -1) for f, _ in samples]
    return samples, classes


def _walk(top):
    """Yields (folder, non-folder DirEntries) under `top` like os.walk(top, followlinks=True), keeping
    the DirEntries: their stat() is then the only system call per file (os.walk gives names only)."""
    try:
        it = os.scandir(top)
    except OSError:  # os.walk skips unreadable folders too
        return
    dirs, names = [], []
    with it:
        for e in it:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else names).append(e)
    yield top, names
    for d in dirs:
        yield from _walk(d.path)


def _fault(stat):
    """Why the file behind `stat` (a DirEntry.stat or a bound os.stat) cannot be an image, or None."""
    try:
        st = stat()
    except FileNotFoundError:  # also a dangling symbolic link
        return 'missing'
    except OSError as e:
        return e.strerror or type(e).__name__
    if not S_ISREG(st.st_mode):
        return 'not a file'
    return '0 bytes' if st.st_size == 0 else None


def _check(faults, n, where, fix, root=None):
    """ValueError with the count and the first few of the (path, fault) pairs whose fault is set;
    paths are shown relative to `root` when given."""
    bad = [f'{os.path.relpath(path, root) if root else path} ({why})' for path, why in faults if why]
    if bad:
        more = ', ...' if len(bad) > 5 else ''
        raise ValueError(f'{len(bad)} of {n} images in {where} are missing or empty: '
                         f'{", ".join(bad[:5])}{more}; {fix}')


def _read_list(p):
    samples, listed = [], []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith('#'):
            continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip('-').isdigit()):
            raise ValueError(f'{p}:{i}: expected "path [integer label]", got {line!r}')
        samples.append((str(p.parent / parts[0]), int(parts[1]) if len(parts) == 2 else -1))
        listed.append(parts[0])
    if not samples:
        raise FileNotFoundError(f'image list {p} has no entries')
    _check([(rel, _fault(partial(os.stat, f))) for rel, (f, _) in zip(listed, samples)], len(samples), p,
           'remove them from the list or replace the files')
    n_cls = max(l for _, l in samples) + 1
    return samples, [str(c) for c in range(n_cls)]


def sample_seed(seed, epoch, index):
    """A distinct 63-bit seed per (run seed, epoch, sample)."""
    return (((seed * 1_000_003) ^ (epoch * 998_244_353)) * 6_364_136_223 + index) % (2 ** 63)


def to_rgb(img):
    """PIL image -> 8-bit RGB. convert('RGB') clips high-bit-depth grey to 255 (a 16-bit PNG turns all
    white), so those are scaled here: 16-bit v -> round(v / 257), the exact map of 0..65535 onto
    0..255; mode 'I' (32-bit int, how Pillow holds some 16-bit files) likewise when its values fit
    0..65535, else negatives clipped to 0 and 0..2**31-1 mapped onto 0..255; 'F' times 255 when its
    values lie in [0, 1], else clipped to [0, 255] (NaN -> 0). Other modes are 8-bit: convert('RGB').
    Pillow itself reads 16-bit-per-channel RGB(A) as 8-bit, keeping the high byte (v >> 8)."""
    if img.mode != 'F' and not img.mode.startswith('I'):
        return img.convert('RGB')
    a = np.asarray(img).astype(np.float64)
    if img.mode == 'F':
        a = np.nan_to_num(a, nan=0.0)
        a = a * 255 if a.size and 0 <= a.min() and a.max() <= 1 else np.clip(a, 0, 255)
    elif a.size and (a.min() < 0 or a.max() > 65535):
        a = np.clip(a, 0, None) * (255 / (2 ** 31 - 1))
    else:
        a = a / 257
    grey = np.rint(a).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), 'RGB')


class ImageDataset(torch.utils.data.Dataset):
    """(image -> transform, label, index). Keys may be ints or (index, epoch) from EpochSampler."""

    def __init__(self, samples, classes, transform=None, seed=0):
        self.samples, self.classes, self.transform, self.seed = samples, classes, transform, seed
        self.targets = [l for _, l in samples]

    def __len__(self):
        return len(self.samples)

    def with_transform(self, transform):
        """The same images in the same order under another transform (no second scan of the folder)."""
        return ImageDataset(self.samples, self.classes, transform, self.seed)

    def load(self, index):
        path = self.samples[index][0]
        try:
            with open(path, 'rb') as f:
                return to_rgb(Image.open(f))
        except Exception as e:  # noqa: BLE001 - any decoder error means the same to the user
            raise RuntimeError(f'cannot read image {path}: {e}; remove or replace it, then --resume') from None

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img = self.load(index)
        if self.transform is not None:
            if epoch is None:
                img = self.transform(img)
            else:  # seeded draw that leaves the caller's RNG streams untouched
                s = sample_seed(self.seed, epoch, index)
                py_state = random.getstate()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    random.seed(s)
                    img = self.transform(img)
                random.setstate(py_state)
        return img, self.samples[index][1], index


class SyntheticDataset(torch.utils.data.Dataset):
    """Fixed random normalised tensors (a pool of 64), `n_views` copies per item, ImageNet-sized by
    default so any queue/bank fits. For pure-compute benchmarks."""

    def __init__(self, length=1_281_167, size=224, n_views=1):
        g = torch.Generator().manual_seed(0)
        self.pool = torch.randn(64, 3, size, size, generator=g)
        self.length, self.n_views, self.classes = length, n_views, [str(i) for i in range(10)]
        self.targets = [i % 10 for i in range(length)]

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        x = self.pool[index % len(self.pool)]
        return ([x] * self.n_views if self.n_views > 1 else x), self.targets[index], index


def build_dataset(path, transform=None, split='train', seed=0):
    """Dataset for `path` (see module doc). `transform` may be a MultiView."""
    if str(path).startswith('synthetic'):
        size = int(str(path).partition(':')[2] or 224)
        return SyntheticDataset(size=size, n_views=getattr(transform, 'n_views', 1))
    samples, classes = scan(path, split)
    return ImageDataset(samples, classes, transform, seed)


def same_images(dataset, transform, data):
    """`dataset`'s images in the same order under `transform`, without scanning `data` again (an
    ImageDataset); other datasets (synthetic) are built anew from `data`'s train split."""
    if isinstance(dataset, ImageDataset):
        return dataset.with_transform(transform)
    return build_dataset(data, transform, 'train')


def has_split(path, split):
    p = Path(path)
    return p.is_dir() and (p / split).is_dir()


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded, drop-last sampler yielding (index, epoch) keys.

    The permutation of epoch e is drawn from (seed, e) alone, so every process agrees on it and a
    resumed run sees the same order. Each epoch holds floor(N / global_batch) full global batches;
    process r takes every world-th index. `start_iter` skips the first iterations (mid-epoch resume).
    """

    def __init__(self, dataset_len, global_batch, rank=0, world=1, seed=0, shuffle=True):
        if dataset_len < global_batch:
            raise ValueError(f'dataset has {dataset_len} images, fewer than one global batch '
                             f'({global_batch}); lower --batch-size')
        self.n, self.gb, self.rank, self.world = dataset_len, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.iters = dataset_len // global_batch
        self.epoch, self.start_iter = 0, 0

    def set_epoch(self, epoch, start_iter=0):
        self.epoch, self.start_iter = epoch, start_iter

    def __len__(self):
        return (self.iters - self.start_iter) * self.gb // self.world

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[self.start_iter * self.gb: self.iters * self.gb][self.rank::self.world]
        return iter([(i, self.epoch) for i in order.tolist()])


def loader_kwargs(workers, device):
    """DataLoader options shared by training and evaluation loaders. The loader gets a generator of
    its own: by default each new iterator draws a seed from the global RNG, which would shift the
    model's random stream (ShuffleBN permutations) differently in a resumed run."""
    kw = dict(num_workers=workers, pin_memory=device.type == 'cuda', generator=torch.Generator())
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=ignore_stop_signals)
    return kw


def ignore_stop_signals(worker_id):
    """In a loader worker: Ctrl-C, SIGTERM and SIGUSR1 (which a terminal or SLURM sends to every
    process) are left to the main process, which stops after its step with a checkpoint and then
    ends the workers; by default a worker dies of them, and its death ends the main process."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def train_loader(data, transform, global_batch, rank, world, seed, workers, device, device_aug='off',
                 sampler=None, prefetch=None):
    """(dataset, sampler, DataLoader) for pre-training, with one-line errors for bad input.
    `global_batch` is split evenly over the `world` processes. device_aug != 'off': the loader yields
    the same structure, augmented on `device` by the batched equivalent of `transform` (see
    device_train_loader). sampler: an EpochSampler class (default EpochSampler), called as
    sampler(len(dataset), global_batch, rank, world, seed). prefetch: batches augmented ahead by a
    background thread with device_aug (None: 1 on CUDA, 0 elsewhere; see prefetched)."""
    sampler = sampler or EpochSampler
    if global_batch % world:
        raise SystemExit(f'--batch-size {global_batch} is the global batch and must be divisible by the '
                         f'number of processes ({world})')
    if device_aug != 'off':
        return device_train_loader(data, transform, global_batch, rank, world, seed, workers, device, device_aug,
                                   sampler, prefetch)
    try:
        dataset = build_dataset(data, transform, seed=seed)
        sampler = sampler(len(dataset), global_batch, rank, world, seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    loader = torch.utils.data.DataLoader(dataset, batch_size=global_batch // world, sampler=sampler,
                                         drop_last=True, **loader_kwargs(workers, device))
    return dataset, sampler, loader


# ---------------------------------------------------------------- labelled subsets (semi-supervised)

def balanced_subset(samples, fraction, seed=0):
    """Sorted indices of a class-balanced `fraction` of labelled `samples`: from each class,
    max(1, round(fraction * n_class)) images drawn without replacement by a generator seeded with
    (seed, label), so the subset depends only on the folder's content, the fraction and the seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    by_class = {}
    for i, (_, label) in enumerate(samples):
        if label < 0:
            raise ValueError('a labelled subset needs labelled images (class folders)')
        by_class.setdefault(label, []).append(i)
    out = []
    for label, idx in sorted(by_class.items()):
        n = max(1, round(fraction * len(idx)))
        out += [idx[j] for j in np.random.default_rng([seed, label]).choice(len(idx), n, replace=False)]
    return sorted(out)


def read_split_file(path, samples, root):
    """Indices of the images a split file lists, in the file's order. One image per line, either
    `class/file [label]` relative to `root` (our lists, OSS's train_labeled_*.txt) or a bare file name
    `<class>_<id>.JPEG` whose class is the part before '_' (SimCLR's 1%/10% ImageNet lists).
    Raises ValueError naming the entries that are not in `samples`."""
    index = {os.path.relpath(p, root).replace(os.sep, '/'): i for i, (p, _) in enumerate(samples)}
    out, missing = [], []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith('#'):
            continue
        rel = parts[0] if '/' in parts[0] else f'{parts[0].split("_")[0]}/{parts[0]}'
        if rel in index:
            out.append(index[rel])
        else:
            missing.append(rel)
    if missing:
        raise ValueError(f'{path}: {len(missing)} listed images are not in {root}, e.g. {missing[:5]}')
    if len(set(out)) != len(out):
        raise ValueError(f'{path}: lists some images more than once')
    if not out:
        raise ValueError(f'{path}: no images listed')
    return out


# ---------------------------------------------------------------- uint8 batches, augmented on the device

def batch_seed(seed, epoch, it, rank):
    """The augmentation seed of batch `it` of `epoch` on process `rank` (--device-aug)."""
    return sample_seed(seed, epoch, (it << 16) + rank)


def to_uint8(img):
    """PIL RGB image -> 3xHxW uint8 tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class Uint8Images(ImageDataset):
    """(3xHxW uint8 tensor, label, index), decoded by PIL and not augmented; raw=True: the file's
    bytes (1-D uint8) instead, for decoding on the device. Keys may be (index, epoch)."""

    def __init__(self, samples, classes, raw=False):
        super().__init__(samples, classes)
        self.raw = raw

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        if self.raw:
            data = torch.from_numpy(np.fromfile(self.samples[index][0], dtype=np.uint8))
        else:
            data = to_uint8(self.load(index))
        return data, self.samples[index][1], index


def collate_uint8(batch):
    """(images, labels, indices): same-shaped images stacked into an NxCxHxW tensor, else a list."""
    imgs, labels, idx = zip(*batch)
    same = imgs[0].dim() == 3 and all(x.shape == imgs[0].shape for x in imgs)
    return (torch.stack(imgs) if same else list(imgs)), torch.tensor(labels), torch.tensor(idx)


def load_to_memory(dataset, workers, device):
    """The whole `dataset` (Uint8Images) as one Nx3xHxW uint8 tensor on `device`, decoded once by
    `workers` processes; every image must have the size of the first."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=collate_uint8,
                                         generator=torch.Generator())  # leaves the global RNG alone
    out, size = [], None
    for imgs, _, idx in loader:
        for x, i in zip(imgs, idx.tolist()):
            size = size or tuple(x.shape)
            if tuple(x.shape) != size:
                raise SystemExit(f'--device-aug memory needs images of one size: {dataset.samples[i][0]} is '
                                 f'{x.shape[2]}x{x.shape[1]}, the first {size[2]}x{size[1]}; use --device-aug files')
        out.append(imgs.to(device) if torch.is_tensor(imgs) else torch.stack(imgs).to(device))
    return torch.cat(out)


class DeviceAugLoader:
    """Yields what the PIL DataLoader yields, (views, labels, indices) with views a list of
    NxCxSxS batches for a MultiView recipe or one batch, augmented on `device` by `recipe`
    (common.batch_aug) from uint8 images. The images come from `memory` (the whole set on the
    device: an epoch is pure compute) or from `loader`, a DataLoader of Uint8Images batches (decoded
    by workers, or JPEG bytes decoded on the device when `decode`). Batch `it` of epoch `e` on
    process `rank` draws its parameters from a CPU generator seeded with (seed, e, it, rank), so a run
    resumed at any iteration repeats its batches exactly, on any device; the draws depend on the
    number of processes (the PIL path's do not)."""

    def __init__(self, recipe, sampler, local_bs, device, seed, rank, loader=None, memory=None, labels=None,
                 decode=False, paths=None, prefetch=None):
        self.recipe, self.sampler, self.bs, self.device = recipe, sampler, local_bs, device
        self.seed, self.rank, self.loader, self.memory, self.labels = seed, rank, loader, memory, labels
        self.decode, self.paths = decode, paths
        # batches augmented ahead in a background thread (prefetched); None: 1 on CUDA, 0 elsewhere
        self.prefetch = (1 if device.type == 'cuda' else 0) if prefetch is None else prefetch

    def __len__(self):
        return len(self.sampler) // self.bs

    def compile(self):
        """--compile: the batched augmentation compiled too (common.batch_aug.Recipe.compiled)."""
        if hasattr(self.recipe, 'compiled'):
            self.recipe = self.recipe.compiled()

    def _from_memory(self):
        from .batch_aug import to_device
        keys = [i for i, _ in self.sampler]
        for b in range(len(keys) // self.bs):
            idx = torch.tensor(keys[b * self.bs:(b + 1) * self.bs])
            yield self.memory[to_device(idx % len(self.memory), self.device)], self.labels[idx], idx

    def _decode(self, data, idx):
        import torchvision.io as io
        try:
            return io.decode_jpeg(list(data), mode=io.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            for d, i in zip(data, idx.tolist()):  # find the file to name
                try:
                    io.decode_jpeg(d, mode=io.ImageReadMode.RGB)
                except RuntimeError as e:
                    raise RuntimeError(f'cannot decode {self.paths[i]} as JPEG ({e}); --device-aug jpeg reads '
                                       f'JPEG files only, use --device-aug files') from None
            raise

    def __iter__(self):
        if self.prefetch > 0:
            return prefetched(self._batches(), self.prefetch, self.device)
        return self._batches()

    def _batches(self):
        epoch, it = self.sampler.epoch, self.sampler.start_iter
        for images, labels, idx in (self._from_memory() if self.memory is not None else self.loader):
            if self.decode:
                images = self._decode(images, idx)
                if all(x.shape == images[0].shape for x in images):
                    images = torch.stack(images)
            elif torch.is_tensor(images):
                images = images.to(self.device, non_blocking=True)
            else:
                images = [x.to(self.device, non_blocking=True) for x in images]
            g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, it, self.rank))
            yield self.recipe(images, g), labels, idx
            it += 1


def prefetched(batches, depth, device):
    """Yields the items of the generator `batches`, each made up to `depth` items ahead by a background
    thread, so that augmenting the next batch overlaps the training step on this one. On CUDA the
    thread works on a stream of its own (the augmentation's small kernels run beside the model's); an
    item is handed over behind an event, and its tensors are recorded on the consumer's stream for the
    allocator. The items are those of `batches`, in order (each batch draws from its own generator).
    An error in the thread is raised here; closing this generator (a loop left early) stops it."""
    items, stop, done = queue.Queue(depth), threading.Event(), object()
    stream = None
    if device.type == 'cuda':
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # e.g. the dataset copied into memory

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for item in batches:
                    event = stream.record_event() if stream is not None else None
                    if not put((item, event)):
                        break
        except BaseException as e:  # noqa: B036 -- handed to the consumer, which raises it
            put((e, None))
        finally:
            batches.close()  # ends the loop over a DataLoader inside (its non-persistent workers stop)
        put((done, None))

    thread = threading.Thread(target=work, name='selfsup-aug-prefetch', daemon=True)
    thread.start()
    interrupted = False
    try:
        while True:
            item, event = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if event is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)
                for t in tree_leaves(item):
                    if torch.is_tensor(t) and t.is_cuda:
                        t.record_stream(consumer)
            yield item
    except KeyboardInterrupt:  # Ctrl-C while waiting: do not also wait for the thread (a daemon)
        interrupted = True
        raise
    finally:
        stop.set()
        if not interrupted:
            thread.join()  # the batch in the making, at most


def device_train_loader(data, transform, global_batch, rank, world, seed, workers, device, mode, sampler=None,
                        prefetch=None):
    """train_loader's (dataset, EpochSampler, loader) for --device-aug `mode`: 'memory' (decode the
    whole set once into a uint8 tensor on the device; images of one size, e.g. CIFAR), 'files'
    (workers decode each batch with PIL, the device augments; any sizes, the crop reads the original
    image) or 'jpeg' (workers only read the files, torchvision.io.decode_jpeg decodes on the device).
    `transform` is the PIL pipeline, reproduced by common.batch_aug.from_transform. `synthetic:SIZE`
    data is a fixed pool of 64 random uint8 images on the device in every mode."""
    from .batch_aug import from_transform
    try:
        recipe = from_transform(transform)
    except ValueError as e:
        raise SystemExit(f'--device-aug {mode}: {e}; drop --device-aug') from None
    local_bs = global_batch // world
    synthetic = str(data).startswith('synthetic')
    try:
        if synthetic:
            size = int(str(data).partition(':')[2] or 224)
            dataset = SyntheticDataset(length=1_281_167, size=1)  # lengths, labels and classes only
            g = torch.Generator().manual_seed(0)
            pool = torch.randint(0, 256, (64, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        else:
            samples, classes = scan(data)
            dataset = Uint8Images(samples, classes, raw=mode == 'jpeg')
        sampler = (sampler or EpochSampler)(len(dataset), global_batch, rank, world, seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'data: {e}') from None
    labels = torch.tensor(dataset.targets)
    if synthetic:
        loader = DeviceAugLoader(recipe, sampler, local_bs, device, seed, rank, memory=pool, labels=labels,
                                 prefetch=prefetch)
    elif mode == 'memory':
        loader = DeviceAugLoader(recipe, sampler, local_bs, device, seed, rank, labels=labels,
                                 memory=load_to_memory(dataset, workers, device), prefetch=prefetch)
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_size=local_bs, sampler=sampler, drop_last=True,
                                              collate_fn=collate_uint8, **loader_kwargs(workers, device))
        loader = DeviceAugLoader(recipe, sampler, local_bs, device, seed, rank, loader=batches,
                                 decode=mode == 'jpeg', paths=[p for p, _ in dataset.samples], prefetch=prefetch)
    return dataset, sampler, loader
