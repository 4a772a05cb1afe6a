"""Weighted k-nearest-neighbour evaluation (NPID, arXiv:1805.01978 §3.4; lemniscate test.py):
cosine similarity on L2-normalised features, each of the k nearest training samples votes for its
class with weight exp(sim / T). k=200, T=0.07 by default. Used by eval/knn.py and by the online
monitors of the method files."""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import dist
from common.data import loader_kwargs


@torch.no_grad()
def extract_features(fn, dataset, batch_size=256, workers=4, device=torch.device('cpu'), desc='features'):
    """L2-normalised fn(images) for every item of `dataset`, in dataset order, on every process.

    Each process computes a strided share of the dataset; the shares are all-gathered. `fn` is
    called in whatever mode the caller set (use eval mode). Returns (features NxD on CPU, labels N).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(dataset)
    idx = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size,
                                         shuffle=False, **loader_kwargs(workers, device))
    feats, labels = [], []
    for images, target, _ in tqdm(loader, desc=desc, disable=None if dist.is_main() else True, leave=False):
        f = fn(images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(target)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return feats, labels
    per = -(-n // world)  # pad every share to the same length for all_gather
    pad = per - feats.shape[0]
    feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])]).to(device)
    labels = torch.cat([labels, labels.new_full((pad,), -1)]).to(device)
    feats, labels = dist.concat_all_gather(feats).cpu(), dist.concat_all_gather(labels).cpu()
    # gathered row r*per + j holds sample r + j*world
    i = torch.arange(n)
    order = (i % world) * per + i // world
    return feats[order], labels[order]


@torch.no_grad()
def knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.07, chunk=1024):
    """Class scores (QxC) of L2-normalised `query` (QxD) against `bank` (NxD) with labels (N)."""
    scores = []
    k = min(k, bank.shape[0])
    for q in query.split(chunk):
        sim = q @ bank.T                                   # BxN cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)              # Bxk
        votes = F.one_hot(bank_labels[top_idx], num_classes).float()  # BxkxC
        scores.append((votes * (top_sim / t).exp().unsqueeze(-1)).sum(1))  # BxC
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, t=0.07, num_classes=None):
    """(top-1, top-5) accuracy in percent of the weighted kNN classifier."""
    c = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(test_feats, train_feats, train_labels, c, k, t)
    top = scores.topk(min(5, c), dim=1).indices
    hit = top == test_labels.view(-1, 1)
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(1).float().mean().item()


def knn_eval(fn, train_set, val_set, ks=(200,), t=0.07, batch_size=256, workers=4, device=torch.device('cpu')):
    """Extracts features of both sets with `fn` and returns {k: (top1, top5)}."""
    tr, trl = extract_features(fn, train_set, batch_size, workers, device, 'kNN train features')
    va, val = extract_features(fn, val_set, batch_size, workers, device, 'kNN val features')
    if (trl < 0).any() or (val < 0).any():
        raise ValueError('kNN needs labelled data (class folders or labels in the image list)')
    c = max(len(train_set.classes), int(trl.max()) + 1)
    return {k: knn_accuracy(tr, trl, va, val, k, t, c) for k in ks}


class KnnMonitor:
    """Online weighted-kNN top-1 of a backbone during pre-training: the train split (deterministic
    eval transform) is the bank, the val split the queries. `monitor(encoder)` evaluates
    encoder.pooled (fc skipped) in eval mode and restores the encoder's mode. Collective."""

    def __init__(self, data, crop_size, k=200, workers=4, device=torch.device('cpu'), t=0.07, train_set=None):
        """train_set: the run's training ImageDataset, whose images (already scanned) become the bank."""
        from common.augment import eval_transform
        from common.data import build_dataset, has_split, same_images
        if not has_split(data, 'val'):
            raise SystemExit(f'--knn-every needs {data}/val/<class>/ images; drop --knn-every')
        tf = eval_transform(crop_size)
        try:
            self.train_set = same_images(train_set, tf, data)
            self.val_set = build_dataset(data, tf, 'val')
        except (FileNotFoundError, ValueError) as e:  # e.g. a 0-byte val image (the stat pass of scan)
            raise SystemExit(f'--knn-every: {e}') from None
        self.k, self.t, self.workers, self.device = k, t, workers, device

    def __call__(self, encoder):
        was_training = encoder.training
        encoder.eval()
        res = knn_eval(encoder.pooled, self.train_set, self.val_set, (self.k,), t=self.t, workers=self.workers,
                       device=self.device)
        encoder.train(was_training)
        return res[self.k][0]
