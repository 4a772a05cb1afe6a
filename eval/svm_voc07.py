#!/usr/bin/env python
"""VOC07 linear-SVM classification on frozen features, full and low-shot (methods.md §9.2).

Goyal et al., "Scaling and Benchmarking Self-Supervised Visual Representation Learning", ICCV 2019;
reference code facebookresearch/fair_self_supervision_benchmark tools/svm/ as OpenSelfSup's
benchmarks/svm_tools run it.

  python eval/svm_voc07.py --pretrained output/moco/checkpoint_last.pth /data/VOCdevkit/VOC2007
  python eval/svm_voc07.py --pretrained CKPT /data/VOCdevkit --layers feat5 --low-shot
  torchrun --nproc_per_node=8 eval/svm_voc07.py --pretrained CKPT /data/VOCdevkit   # features on 8 GPUs

Protocol:
  * data: VOCdevkit layout, JPEGImages/<id>.jpg and ImageSets/Main/<class>_{trainval,test}.txt with
    1 (present), -1 (absent), 0 (difficult only); classes are the <class>_trainval.txt files found;
  * features: Resize(256) then warp to 224x224, backbone in eval mode, each --layers layer with the
    fixed multi-layer pooling (feat5 = 2x2x2048 = 8192-d for a ResNet-50, not the 2048-d GAP);
    rows L2-normalised (norm + 1e-5);
  * full: per class and cost C in --costs + 0.5^4..0.5^19, LinearSVC(C, class_weight {1: 2, -1: 1},
    squared hinge, L2, dual, tol 1e-4, max_iter 2000); 3-fold cross-validated AP (sklearn
    average_precision, StratifiedKFold) picks the cost; refit on all of trainval; difficult images
    are negatives in training and dropped at test; VOC AP on test; mAP = mean over classes;
  * --low-shot: for k in --k and --samples independent samples, per class k positives and
    (classes-1)*k negatives of trainval (difficult never drawn), one SVM per cost on them (no CV),
    test AP on the whole test set, mAP over classes per (sample, k, cost); per k the cost with the
    best mean-over-samples mAP is reported (chosen on the test set, as the protocol does) with the
    min/max/std over samples at that cost.

VOC AP is the area under the monotone precision envelope, summed at the recall change points (not
the 11-point VOC07 variant). It is >= sklearn's average_precision (which uses the raw precision at
each threshold), with equality exactly when, without tied scores, the precision at successive
positives never increases; with ties sklearn takes one threshold per tie group, VOC AP ranks tied
items one by one (here in index order). The cross-validation uses sklearn's AP, as the reference.

Deviations: LinearSVC gets random_state=0 (liblinear's coordinate order; the reference leaves it
unseeded); ties in AP are broken by index (stable sort) instead of an unstable argsort; classes run
in parallel with joblib (--jobs; each job holds a float64 copy of the features for liblinear).
Results (AP in %) go to <pretrained>.voc07_svm.json.
"""
import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/svm_voc07.py` finds common/

import numpy as np  # noqa: E402
import torch  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402
from PIL import Image  # noqa: E402

from common import augment, checkpoint, dist  # noqa: E402
from common.features import (LAYERS, StagePool, extract_all, layer_name, load_eval_backbone,  # noqa: E402
                             stage_feature_fn)
from common.log import Logger  # noqa: E402

SVM = dict(class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty='l2', loss='squared_hinge', tol=1e-4,
           dual=True, max_iter=2000, random_state=0)


def get_parser():
    p = argparse.ArgumentParser(description='VOC07 linear SVM (full and low-shot) on frozen features',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('voc', help='VOCdevkit/VOC2007 folder (or VOCdevkit holding VOC2007/)')
    p.add_argument('--pretrained', required=True,
                   help='selfsup checkpoint, backbone.pth, facebookresearch/moco checkpoint or torchvision '
                        'ResNet state dict')
    p.add_argument('--unsafe-load', action='store_true', help='torch.load with weights_only=False (trusted files only)')
    p.add_argument('--layers', type=layer_name, nargs='+', default=list(LAYERS[:5]),
                   help='feat1..feat5 (aliases stem, layer1..layer4) and/or avgpool; one SVM set per layer')
    p.add_argument('--costs', type=float, nargs='+', default=[1.0, 10.0, 100.0],
                   help='SVM costs, to which 0.5^4..0.5^19 are added (OSS: 1 10 100; FAIR: 1e-7 ... 100)')
    p.add_argument('--low-shot', action='store_true', help='also run the low-shot protocol')
    p.add_argument('--k', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32, 64, 96], help='low-shot positives per class')
    p.add_argument('--samples', type=int, default=5, help='independent low-shot samples per k')
    p.add_argument('--seed', type=int, default=0, help='seed of the low-shot samples')
    p.add_argument('--full', action=argparse.BooleanOptionalAction, default=True, help='run the full-data protocol')
    p.add_argument('--jobs', type=int, default=None, help='parallel SVM jobs (classes); None = min(classes, CPUs)')
    p.add_argument('--crop-size', type=int, default=None, help='None = 32 for a CIFAR-stem backbone, else 224')
    p.add_argument('-b', '--batch-size', type=int, default=64, help='feature extraction batch per process')
    p.add_argument('-j', '--workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off', help='mixed precision features')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='auto: CUDA when visible')
    p.add_argument('--save-features', action='store_true', help='also write the features to output-dir/voc07_features/')
    p.add_argument('--load-features', default=None, help='folder written by --save-features: skip the extraction')
    p.add_argument('--output-dir', default=None, help='where the result JSON goes; None = beside --pretrained')
    return p


# ============ VOC data ============

def voc_root(path):
    p = Path(path)
    if not (p / 'ImageSets' / 'Main').is_dir() and (p / 'VOC2007' / 'ImageSets' / 'Main').is_dir():
        p = p / 'VOC2007'
    if not (p / 'ImageSets' / 'Main').is_dir() or not (p / 'JPEGImages').is_dir():
        raise FileNotFoundError(f'{path}: expected a VOC2007 folder with JPEGImages/ and ImageSets/Main/')
    return p


def read_voc(root, split):
    """(image ids, class names, labels NxC int8 with VOC's 1 present / -1 absent / 0 difficult).

    Classes are the ImageSets/Main/<class>_<split>.txt files, sorted (the 20 VOC classes in their
    usual order); images in the order of <split>.txt if present, else of the first class file."""
    main = Path(root) / 'ImageSets' / 'Main'
    files = sorted(main.glob(f'*_{split}.txt'))
    if not files:
        raise FileNotFoundError(f'no {main}/<class>_{split}.txt files')
    classes = [f.name[:-len(f'_{split}.txt')] for f in files]
    per_class = []
    for f in files:
        entries = {}
        for i, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ('1', '-1', '0'):
                raise ValueError(f'{f}:{i}: expected "<image id> 1|-1|0", got {line!r}')
            entries[parts[0]] = int(parts[1])
        per_class.append(entries)
    ids = (main / f'{split}.txt').read_text().split() if (main / f'{split}.txt').is_file() else list(per_class[0])
    labels = np.zeros((len(ids), len(classes)), np.int8)
    for c, entries in enumerate(per_class):
        missing = [i for i in ids if i not in entries]
        if missing:
            raise ValueError(f'{files[c]}: no label for images {missing[:5]}')
        labels[:, c] = [entries[i] for i in ids]
    return ids, classes, labels


class VOCImages(torch.utils.data.Dataset):
    """(transformed JPEGImages/<id>.jpg, labels row C, index)."""

    def __init__(self, root, ids, labels, transform):
        self.root, self.ids, self.labels, self.transform = Path(root), ids, torch.from_numpy(labels), transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        path = self.root / 'JPEGImages' / f'{self.ids[i]}.jpg'
        try:
            with open(path, 'rb') as f:
                img = Image.open(f).convert('RGB')
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f'cannot read image {path}: {e}') from None
        return self.transform(img), self.labels[i], i


# ============ SVM protocol ============

def cost_list(costs):
    """The given costs + 0.5^4 .. 0.5^19 (FAIR svm_helper.py parse_cost_list)."""
    return [float(c) for c in costs] + [0.5 ** n for n in range(4, 20)]


def normalize_rows(x):
    """Row L2 normalisation with +1e-5 in the denominator, in float64 (FAIR normalize_features)."""
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def voc_ap(scores, targets):
    """VOC AP: items ranked by decreasing score (ties in index order); precision made monotone from
    the right (the envelope), summed over the recall change points. targets > 0 are positives.
    NaN without positives."""
    order = np.argsort(-np.asarray(scores, np.float64), kind='stable')
    tp = (np.asarray(targets)[order] > 0).astype(np.float64)
    npos = tp.sum()
    if npos == 0:
        return float('nan')
    ctp = np.cumsum(tp)
    rec = np.concatenate([[0.0], ctp / npos, [1.0]])
    prec = np.concatenate([[0.0], ctp / np.arange(1, len(tp) + 1), [0.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]  # envelope: max precision at this recall or beyond
    i = np.flatnonzero(rec[1:] != rec[:-1]) + 1
    return float(np.sum((rec[i] - rec[i - 1]) * prec[i]))


def eval_ap(scores, labels):
    """VOC AP on test, difficult (0) images dropped."""
    keep = labels != 0
    return voc_ap(scores[keep], labels[keep])


def train_targets(labels):
    """VOC labels -> SVM targets: present +1, absent and difficult -1 (difficult stays a negative)."""
    return np.where(labels == 1, 1, -1)


def svm_one_class(x_tr, y_tr, x_te, lab_te, costs):
    """Full protocol for one class: 3-fold CV AP per cost, refit with the best, test AP.
    Returns dict(cv_ap [costs], cost, ap, not_converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_validate
    from sklearn.svm import LinearSVC
    warnings.filterwarnings('ignore', category=ConvergenceWarning)
    cv_ap, not_conv = [], 0
    for c in costs:
        res = cross_validate(LinearSVC(C=c, **SVM), x_tr, y_tr, cv=3, scoring='average_precision',
                             return_estimator=True)
        cv_ap.append(float(res['test_score'].mean()))
        not_conv += sum(int(e.n_iter_ >= SVM['max_iter']) for e in res['estimator'])
    best = int(np.argmax(cv_ap))  # first of equal maxima, as np.argmax in the reference
    clf = LinearSVC(C=costs[best], **SVM).fit(x_tr, y_tr)
    not_conv += int(clf.n_iter_ >= SVM['max_iter'])
    return dict(cv_ap=cv_ap, cost=costs[best], ap=eval_ap(clf.decision_function(x_te), lab_te),
                not_converged=not_conv)


def low_shot_targets(labels, k, rng):
    """NxC SVM targets of one low-shot sample: per class k positives (+1) and (C-1)*k negatives (-1)
    drawn without replacement from the absent images; 0 = not used. Difficult images are never drawn
    (FAIR extra_scripts/create_voc_low_shot_samples.py)."""
    n_cls = labels.shape[1]
    out = np.zeros(labels.shape, np.int8)
    for c in range(n_cls):
        pos, neg = np.flatnonzero(labels[:, c] == 1), np.flatnonzero(labels[:, c] == -1)
        if len(pos) < k or len(neg) < (n_cls - 1) * k:
            raise ValueError(f'class {c}: k={k} needs {k} positives and {(n_cls - 1) * k} negatives, the data has '
                             f'{len(pos)} and {len(neg)}')
        out[rng.choice(pos, k, replace=False), c] = 1
        out[rng.choice(neg, (n_cls - 1) * k, replace=False), c] = -1
    return out


def low_shot_one_class(x_tr, targets, x_te, lab_te, costs):
    """targets: SxKxN targets of this class (samples x k values); returns test AP SxKxcosts."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC
    warnings.filterwarnings('ignore', category=ConvergenceWarning)
    ap = np.zeros(targets.shape[:2] + (len(costs),))
    for s in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            used = targets[s, j] != 0
            for ci, c in enumerate(costs):
                clf = LinearSVC(C=c, **SVM).fit(x_tr[used], targets[s, j][used])
                ap[s, j, ci] = eval_ap(clf.decision_function(x_te), lab_te)
    return ap


def aggregate_low_shot(map_skc, costs, ks):
    """map_skc: mAP per (sample, k, cost). Per k: the mean over samples for each cost, the cost with
    the highest mean, and the mean/min/max/std over samples at that cost (FAIR
    aggregate_low_shot_svm_stats.py)."""
    out = {}
    for j, k in enumerate(ks):
        m = map_skc[:, j, :]  # samples x costs
        best = int(np.argmax(m.mean(0)))
        col = m[:, best]
        out[str(k)] = dict(mean=float(col.mean()), min=float(col.min()), max=float(col.max()),
                           std=float(col.std()), cost=costs[best])
    return out


# ============ main ============

def load_voc(path):
    """(root, {'trainval': (ids, classes, labels), 'test': ...}) or one line naming the problem."""
    try:
        root = voc_root(path)
        splits = {s: read_voc(root, s) for s in ('trainval', 'test')}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'voc: {e}') from None
    if splits['test'][1] != splits['trainval'][1]:
        raise SystemExit(f'voc: trainval classes {splits["trainval"][1]} differ from test classes {splits["test"][1]}')
    return root, splits


def load_features(src, splits, layers, log):
    """Features written by an earlier --save-features run: ({split: {layer: NxD}}, their meta.json)."""
    src = Path(src)
    info = json.loads((src / 'meta.json').read_text())
    feats = {s: {n: np.load(src / f'{s}_{n}.npy') for n in layers} for s in splits}
    log.print(f'features of {info["pretrained"]} loaded from {src}')
    return feats, info


def compute_features(args, pretrained, root, splits, layers, device):
    """The backbone's fixed multi-layer pooled features of both splits (every process takes its share)."""
    try:
        model, _, cfg, _ = load_eval_backbone(pretrained, weights_only=not args.unsafe_load)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f'--pretrained {pretrained}: {e}') from None
    crop = args.crop_size or (32 if cfg['cifar_stem'] else 224)
    try:
        pool = StagePool(layers, crop)
    except ValueError as e:
        raise SystemExit(f'--layers: {e}') from None
    model = model.to(device).eval()
    amp = dict(device_type=device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16,
               enabled=args.amp != 'off')
    tf = augment.warp_transform(crop)
    info = dict(pretrained=str(pretrained), arch=cfg['arch'], width=cfg['width'], cifar_stem=cfg['cifar_stem'],
                sobel=cfg['in_channels'] == 2, crop_size=crop, transform=' + '.join(map(repr, tf.transforms)),
                pool='fixed multi-layer pooling (common/features.py)', amp=args.amp)
    feats = {}
    for s, (ids, _, labels) in splits.items():
        ds = VOCImages(root, ids, labels, tf)
        feats[s], _ = extract_all(stage_feature_fn(model, pool, amp), ds, args.batch_size, args.workers,
                                  device, f'VOC07 {s} features')
    return feats, info


def save_features(dst, feats, splits, info, log):
    dst.mkdir(parents=True, exist_ok=True)
    for s in splits:
        for n in feats[s]:
            np.save(dst / f'{s}_{n}.npy', feats[s][n])
        np.save(dst / f'{s}_labels.npy', splits[s][2])
    (dst / 'meta.json').write_text(json.dumps(info, indent=1) + '\n')
    log.print(f'features written to {dst}')


def full_svms(x_tr, lab_tr, x_te, lab_te, classes, costs, jobs, n, log):
    """One SVM per class on all trainval images, cost by 3-fold cross-validation: the layer's result."""
    t0 = time.perf_counter()
    res = Parallel(n_jobs=jobs)(delayed(svm_one_class)(x_tr, train_targets(lab_tr[:, c]), x_te, lab_te[:, c], costs)
                                for c in range(len(classes)))
    aps = [100 * r['ap'] for r in res]
    log.print(f'{n}: VOC07 SVM mAP {np.mean(aps):.2f}  (' + ', '.join(f'{c} {a:.1f}' for c, a in zip(classes, aps)) + ')')
    return dict(mAP=float(np.mean(aps)), ap=dict(zip(classes, aps)), cost=dict(zip(classes, [r['cost'] for r in res])),
                cv_ap={c: r['cv_ap'] for c, r in zip(classes, res)},
                not_converged=sum(r['not_converged'] for r in res), seconds=time.perf_counter() - t0)


def low_shot_svms(args, x_tr, lab_tr, x_te, lab_te, costs, jobs, n, log):
    """SVMs on k positives per class, --samples draws per k: mean/min/max/std mAP per k."""
    try:
        tg = np.stack([np.stack([low_shot_targets(lab_tr, k, np.random.default_rng([args.seed, s, k]))
                                 for k in args.k]) for s in range(args.samples)])  # S x K x N x C
    except ValueError as e:
        raise SystemExit(f'--low-shot: {e}') from None
    ap = Parallel(n_jobs=jobs)(delayed(low_shot_one_class)(x_tr, tg[..., c], x_te, lab_te[:, c], costs)
                               for c in range(lab_tr.shape[1]))
    result = aggregate_low_shot(100 * np.mean(ap, axis=0), costs, args.k)  # mean over classes: S x K x costs
    for k, r in result.items():
        log.print(f'{n}: low-shot k={k:>3}  mAP mean {r["mean"]:.2f}  min {r["min"]:.2f}  max {r["max"]:.2f}'
                  f'  std {r["std"]:.2f}  (cost {r["cost"]:g})')
    return result


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, device = dist.init_distributed(args.device)
    log = Logger()
    pretrained = Path(args.pretrained).resolve()
    out_dir = Path(args.output_dir) if args.output_dir else pretrained.parent
    result_path = out_dir / (pretrained.name + '.voc07_svm.json')
    layers = list(dict.fromkeys(args.layers))
    root, splits = load_voc(args.voc)
    classes = splits['trainval'][1]

    # ============ features (all processes), then SVMs on rank 0 ============
    if args.load_features:
        feats, info = load_features(args.load_features, splits, layers, log)
    else:
        feats, info = compute_features(args, pretrained, root, splits, layers, device)
        if args.save_features and dist.is_main():
            save_features(out_dir / 'voc07_features', feats, splits, info, log)
    main_process = dist.is_main()
    dist.cleanup()  # the SVMs run on rank 0 alone, for as long as they take
    if not main_process:
        return

    costs = cost_list(args.costs)
    jobs = args.jobs or min(len(classes), os.cpu_count() or 1)
    lab_tr, lab_te = splits['trainval'][2], splits['test'][2]
    protocol = dict(protocol='VOC07 linear SVM (Goyal et al. 2019; FAIR tools/svm via OSS benchmarks)',
                    voc=str(root), classes=classes, trainval_images=len(lab_tr), test_images=len(lab_te),
                    layers=layers, costs=costs, svm={k: str(v) for k, v in SVM.items()}, cv_folds=3,
                    row_norm='L2 + 1e-5', ap='VOC AP (monotone precision envelope, recall change points)',
                    features=info, jobs=jobs, git=checkpoint.git_commit())
    result = dict(pretrained=str(pretrained), protocol=protocol, full={}, low_shot={})
    log.print('protocol: ' + json.dumps({k: v for k, v in protocol.items() if k != 'classes'}))
    for n in layers:
        x_tr, x_te = normalize_rows(feats['trainval'][n]), normalize_rows(feats['test'][n])
        log.print(f'{n}: {x_tr.shape[1]}-d features, {len(classes)} classes x {len(costs)} costs')
        if args.full:
            result['full'][n] = full_svms(x_tr, lab_tr, x_te, lab_te, classes, costs, jobs, n, log)
        if args.low_shot:
            result['low_shot'][n] = low_shot_svms(args, x_tr, lab_tr, x_te, lab_te, costs, jobs, n, log)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + '\n')
    log.print(f'written to {result_path}')


if __name__ == '__main__':
    main()
