"""eval/svm_voc07.py: VOC AP by hand and its relation to sklearn's average_precision, the label
conventions (difficult = negative in training, dropped at test), the cost grid, the low-shot
sampler and aggregation by hand, and the script end to end on a small VOC-layout folder built from
real CIFAR-10 images (multi-label classes derived from the CIFAR class, some difficult entries)."""
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from conftest import REPO, SAMPLE, python
from common.resnet import build_resnet
from eval import svm_voc07 as svm

SCRIPT = REPO / 'eval' / 'svm_voc07.py'
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # on the shared, oversubscribed test cores 2 threads are ~100x slower
# multi-label classes from the CIFAR class of each image: learnable, overlapping, of unequal size
GROUPS = {'vehicle': ('airplane', 'automobile', 'ship', 'truck'), 'pet': ('cat', 'dog'),
          'wings': ('airplane', 'bird'), 'road': ('automobile', 'truck')}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_voc(root, n_trainval=8, n_test=4):
    """VOCdevkit/VOC2007 with JPEGImages/<id>.jpg and ImageSets/Main/{trainval,test}.txt and
    <class>_{trainval,test}.txt. An image is in class g when its CIFAR class is in GROUPS[g]; the
    second image of each such CIFAR class is marked difficult (0) instead."""
    voc = root / 'VOCdevkit' / 'VOC2007'
    (voc / 'JPEGImages').mkdir(parents=True)
    (voc / 'ImageSets' / 'Main').mkdir(parents=True)
    cifar = sorted(p.name for p in (SAMPLE / 'train').iterdir())
    n = 0
    for split, src, k in (('trainval', 'train', n_trainval), ('test', 'val', n_test)):
        ids, rows = [], {g: [] for g in GROUPS}
        for c in cifar:
            for j, f in enumerate(sorted((SAMPLE / src / c).iterdir())[:k]):
                n += 1
                ids.append(f'{n:06d}')
                shutil.copy(f, voc / 'JPEGImages' / f'{n:06d}.jpg')
                for g, members in GROUPS.items():
                    rows[g].append((0 if j == 1 else 1) if c in members else -1)
        (voc / 'ImageSets' / 'Main' / f'{split}.txt').write_text(''.join(f'{i}\n' for i in ids))
        for g in GROUPS:
            (voc / 'ImageSets' / 'Main' / f'{g}_{split}.txt').write_text(
                ''.join(f'{i} {v:2d}\n' for i, v in zip(ids, rows[g])))
    return voc


# ============ VOC AP ============

def test_voc_ap_by_hand_and_sklearn():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    y = np.array([1, -1, 1, 1, -1])
    # positives at ranks 1, 3, 4: precision 1, 2/3, 3/4; the envelope lifts 2/3 to 3/4
    assert svm.voc_ap(scores, y) == pytest.approx((1 + 3 / 4 + 3 / 4) / 3)
    assert average_precision_score(y > 0, scores) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # precision never increases from one positive to the next: the two coincide
    y2 = np.array([1, 1, -1, 1, -1])  # precision 1, 1, 3/4
    assert svm.voc_ap(scores, y2) == pytest.approx(average_precision_score(y2 > 0, scores)) == \
        pytest.approx((1 + 1 + 3 / 4) / 3)
    assert svm.voc_ap(scores, -np.ones(5)) != svm.voc_ap(scores, -np.ones(5))  # NaN without positives
    assert svm.voc_ap(scores, np.ones(5)) == 1.0


def test_voc_ap_relation_to_sklearn_without_ties():
    """VOC AP >= sklearn AP, with equality exactly when the precision at successive positives
    (in ranking order) never increases."""
    rng = np.random.default_rng(0)
    n_equal = 0
    for _ in range(300):
        n = int(rng.integers(2, 30))
        y = np.where(rng.random(n) < 0.4, 1, -1)
        if (y > 0).sum() == 0:
            continue
        s = rng.random(n)  # continuous: no ties
        voc, sk = svm.voc_ap(s, y), average_precision_score(y > 0, s)
        hits = (y[np.argsort(-s)] > 0)
        prec_at_pos = (np.cumsum(hits) / np.arange(1, n + 1))[hits]
        monotone = bool(np.all(np.diff(prec_at_pos) <= 1e-12))
        assert voc >= sk - 1e-12
        assert (abs(voc - sk) < 1e-12) == monotone
        n_equal += monotone
    assert 0 < n_equal < 300  # both cases occurred


def test_voc_ap_ties_follow_index_order():
    """sklearn scores a tie group at one threshold; VOC AP ranks tied items one by one (here by index)."""
    s = np.array([1.0, 0.5, 0.5])
    a, b = np.array([1, 1, -1]), np.array([1, -1, 1])
    assert average_precision_score(a > 0, s) == average_precision_score(b > 0, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert svm.voc_ap(s, a) == pytest.approx(1.0)
    assert svm.voc_ap(s, b) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_label_conventions():
    assert svm.train_targets(np.array([1, 0, -1])).tolist() == [1, -1, -1]  # difficult trains as negative
    # difficult dropped at test: the top-scored difficult image neither helps nor hurts
    labels, scores = np.array([1, 0, -1]), np.array([0.1, 0.9, 0.5])
    assert svm.eval_ap(scores, labels) == pytest.approx(0.5)
    assert svm.voc_ap(scores, labels) == pytest.approx(1 / 3)  # 0 taken as negative would cost AP
    costs = svm.cost_list([1.0, 10.0, 100.0])
    assert len(costs) == 19 and costs[:3] == [1.0, 10.0, 100.0]
    assert costs[3] == 0.5 ** 4 and costs[-1] == 0.5 ** 19
    x = svm.normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(x[0], [3 / 5.00001, 4 / 5.00001]) and np.all(x[1] == 0) and x.dtype == np.float64
    assert svm.SVM['class_weight'] == {1: 2, -1: 1} and svm.SVM['max_iter'] == 2000 and svm.SVM['dual']


# ============ low-shot ============

def test_low_shot_sampler():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([1, -1, -1, -1, 0], np.int8), size=(200, 4))
    t = svm.low_shot_targets(labels, 3, np.random.default_rng([0, 1, 3]))
    for c in range(4):
        assert (t[:, c] == 1).sum() == 3 and (t[:, c] == -1).sum() == 9  # k and (C-1)k
        assert np.all(labels[t[:, c] == 1, c] == 1) and np.all(labels[t[:, c] == -1, c] == -1)
        assert np.all(t[labels[:, c] == 0, c] == 0)  # difficult never drawn
    assert np.array_equal(t, svm.low_shot_targets(labels, 3, np.random.default_rng([0, 1, 3])))
    assert not np.array_equal(t, svm.low_shot_targets(labels, 3, np.random.default_rng([0, 2, 3])))
    with pytest.raises(ValueError, match='needs 100 positives'):
        svm.low_shot_targets(labels, 100, rng)


def test_low_shot_aggregation_by_hand():
    # 3 samples x 1 k x 2 costs: cost 0 has the better mean (50 vs 40) though cost 1 has the best sample
    m = np.array([[[50.0, 70.0]], [[60.0, 30.0]], [[40.0, 20.0]]])
    r = svm.aggregate_low_shot(m, [1.0, 0.5], [8])['8']
    assert (r['cost'], r['mean'], r['min'], r['max']) == (1.0, 50.0, 40.0, 60.0)
    assert r['std'] == pytest.approx(np.std([50.0, 60.0, 40.0]))


# ============ end to end ============

def test_read_voc(tmp_path):
    voc = make_voc(tmp_path, 3, 2)
    assert svm.voc_root(tmp_path / 'VOCdevkit') == voc
    ids, classes, labels = svm.read_voc(voc, 'trainval')
    assert classes == ['pet', 'road', 'vehicle', 'wings'] and len(ids) == 30 and ids[0] == '000001'
    cat = 3 * 3  # images 9-11 are the cats (airplane, automobile, bird, cat, ...)
    assert labels[cat:cat + 3, 0].tolist() == [1, 0, 1] and labels[:3, 3].tolist() == [1, 0, 1]
    assert labels[cat:cat + 3, 2].tolist() == [-1, -1, -1]
    with pytest.raises(FileNotFoundError):
        svm.voc_root(tmp_path)


def test_svm_script_end_to_end(tmp_path):
    voc = make_voc(tmp_path)
    torch.manual_seed(0)
    model = {'encoder_q.' + k: v for k, v in build_resnet('resnet10', 5, width=8, cifar_stem=True).state_dict().items()}
    torch.save({'model': model, 'backbone_prefix': 'encoder_q.', 'args': {}}, tmp_path / 'ckpt.pth')
    p = python(SCRIPT, tmp_path / 'VOCdevkit', '--pretrained', tmp_path / 'ckpt.pth', '--layers', 'layer4', 'avgpool',
               '--costs', '1', '10', '--low-shot', '--k', '1', '2', '--samples', '2', '--jobs', '2', '--workers', '0',
               '--device', 'cpu', '--save-features', env=ONE_THREAD)
    assert 'VOC07 SVM mAP' in p.stdout and 'low-shot k=  2' in p.stdout
    res = json.loads((tmp_path / 'ckpt.pth.voc07_svm.json').read_text())
    pr = res['protocol']
    assert pr['classes'] == ['pet', 'road', 'vehicle', 'wings'] and (pr['trainval_images'], pr['test_images']) == (80, 40)
    assert len(pr['costs']) == 18 and pr['features']['crop_size'] == 32 and 'Resize(size=(32, 32)' in pr['features']['transform']
    _, _, lab_te = svm.read_voc(voc, 'test')
    chance = 100 * np.mean([(lab_te[:, c] == 1).sum() / (lab_te[:, c] != 0).sum() for c in range(4)])
    for n in ('feat5', 'avgpool'):
        full = res['full'][n]
        assert full['mAP'] == pytest.approx(np.mean(list(full['ap'].values())))
        assert full['mAP'] > chance + 5, (full['mAP'], chance)  # learnable from random-init features
        assert set(res['low_shot'][n]) == {'1', '2'}
        for r in res['low_shot'][n].values():
            assert r['min'] <= r['mean'] <= r['max'] and r['cost'] in pr['costs']
    # one class again, independently, from the saved features: CV picks the cost, then refit and test
    feats = tmp_path / 'voc07_features'
    x_tr, x_te = (svm.normalize_rows(np.load(feats / f'{s}_feat5.npy')) for s in ('trainval', 'test'))
    lab_tr = np.load(feats / 'trainval_labels.npy')
    c = 2  # vehicle: difficult trainval images are negatives, difficult test images are dropped
    y = np.where(lab_tr[:, c] == 1, 1, -1)
    cv = [cross_val_score(LinearSVC(C=C, **svm.SVM), x_tr, y, cv=3, scoring='average_precision').mean()
          for C in pr['costs']]
    assert res['full']['feat5']['cv_ap']['vehicle'] == pytest.approx(cv)
    best = pr['costs'][int(np.argmax(cv))]
    assert res['full']['feat5']['cost']['vehicle'] == best
    scores = LinearSVC(C=best, **svm.SVM).fit(x_tr, y).decision_function(x_te)
    keep = lab_te[:, c] != 0
    assert res['full']['feat5']['ap']['vehicle'] == pytest.approx(100 * svm.voc_ap(scores[keep], lab_te[keep, c]))
