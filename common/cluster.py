"""Clustering helpers of the clustering methods (ODC, DeepCluster): faiss k-means, PCA-whitening,
cluster-size statistics and NMI.

Follows DeepCluster's clustering.py (facebookresearch/deepcluster; OpenSelfSup third_party/clustering.py,
methods.md §5.1, §6): features are optionally PCA-whitened (faiss PCAMatrix, eigen_power -0.5), then
L2-normalised row-wise, then clustered by faiss k-means (20 iterations, no subsampling of the points).
Inputs may be numpy arrays or CPU tensors; outputs are numpy arrays.
"""
import numpy as np


def _float32(x):
    if hasattr(x, 'numpy'):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def l2_normalize(x, eps=1e-10):
    """Rows divided by their L2 norm + eps (DeepCluster / OSS preprocess_features)."""
    x = _float32(x)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)


def pca_whiten(x, dim):
    """PCA to `dim` dimensions with whitening: centred, projected on the top `dim` principal axes and
    each axis scaled by eigenvalue^-0.5 (faiss PCAMatrix(d_in, dim, eigen_power=-0.5)), so the output
    covariance is proportional to the identity."""
    import faiss
    x = _float32(x)
    if not 0 < dim <= x.shape[1]:
        raise ValueError(f'PCA dimension {dim} must be in 1..{x.shape[1]} (the feature dimension)')
    mat = faiss.PCAMatrix(x.shape[1], dim, -0.5)
    mat.train(x)
    return mat.apply(x)


def preprocess_features(x, pca_dim=-1):
    """DeepCluster's preprocessing: PCA-whitening to `pca_dim` (skipped when pca_dim <= 0, as ODC's
    pca_dim=-1), then row L2 normalisation. NaN rows (a dead network) raise a clear error."""
    x = pca_whiten(x, pca_dim) if pca_dim > 0 else _float32(x)
    x = l2_normalize(x)
    if np.isnan(x).any():
        raise FloatingPointError('NaN in the features to cluster; the network has diverged')
    return x


def kmeans(x, k, niter=20, seed=0, gpu=None, verbose=False):
    """faiss k-means of the rows of `x` (NxD) into k clusters; every point is then assigned to its
    nearest centroid (L2). As DeepCluster's run_kmeans: `niter` Lloyd iterations and
    max_points_per_centroid 1e7, so no point is left out of training. gpu=None uses a GPU when the
    installed faiss has one. Returns (labels N int64, centroids kxD float32, final objective)."""
    import faiss
    x = _float32(x)
    n, d = x.shape
    if n < k:
        raise ValueError(f'k-means: {n} points cannot form {k} clusters')
    if gpu is None:
        gpu = faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, max_points_per_centroid=10_000_000,
                      min_points_per_centroid=1, verbose=verbose, gpu=bool(gpu))
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), np.array(km.centroids), float(km.obj[-1])


def cluster_sizes(labels, k):
    """Number of members of each of the k clusters (k,) int64."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)


def size_stats(labels, k):
    """Summary of a clustering for the logs: non-empty clusters, smallest/largest size, and the
    share of the points in the largest cluster (near 1 = collapse)."""
    sizes = cluster_sizes(labels, k)
    nonempty = sizes[sizes > 0]
    return dict(nonempty=int(len(nonempty)), empty=int(k - len(nonempty)), min_size=int(nonempty.min()),
                max_size=int(nonempty.max()), max_share=float(nonempty.max() / sizes.sum()))


def nmi(a, b):
    """Normalised mutual information of two labelings (sklearn, arithmetic mean): DeepCluster's
    agreement between consecutive clusterings, or clusters against ground-truth classes."""
    from sklearn.metrics import normalized_mutual_info_score
    return float(normalized_mutual_info_score(np.asarray(a), np.asarray(b)))


FAISS_INSTALL = ('pip install faiss-cpu (CPU k-means), or for GPU k-means: conda install -c pytorch '
                 '-c nvidia faiss-gpu')


def require_faiss():
    """Imports faiss, or raises ImportError saying how to install it (the clustering methods call
    this at start-up rather than failing at the first clustering round)."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f'the k-means of DeepCluster/ODC needs faiss, which cannot be imported ({e}); '
                          f'install it: {FAISS_INSTALL}') from None
    return faiss
