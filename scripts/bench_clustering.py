#!/usr/bin/env python
"""Times one DeepCluster clustering round without the feature extraction: PCA-whitening (D -> 256),
row L2 normalisation and faiss k-means on random features, with the parameters deepcluster.py uses
(common.cluster). Each size runs in a fresh process, so its peak RSS is its own; the result is
extrapolated to ImageNet's 1,281,167 images.

  python scripts/bench_clustering.py --sizes 20000 40000 80000 --k 10000 --threads 2
  python scripts/bench_clustering.py --sizes 10000 20000 40000 --k-ratio 128   # k = N / 128 (timings only)

k-means: faiss stops as soon as the objective stops changing, which random points reach within ~3
iterations and real features need not, so the benchmark forces --timed-iters iterations and scales
the per-iteration cost to --iters (20, DeepCluster's). Every iteration costs the same: N x k distances
in d = 256 dimensions and the centroid update. Extrapolation: k-means by its cost per point, centroid
and iteration (sound with k fixed at the target's; at small k fixed overheads inflate that cost); the
PCA as the largest size's time plus its N-proportional part (the covariance product, N x D^2, timed
alone, and the projection, N x D x 256) scaled up, its D^3 eigendecomposition being independent of N;
memory by a least-squares line in N (it is the N x D float32 features plus the N x 256 copies).
Wall times on a shared machine depend on its load (printed); the CPU seconds of all threads give the
time on otherwise idle cores, except on an oversubscribed machine, where OpenMP threads spin waiting
for each other (2 threads then measured 2-10x slower than 1): --threads 1 gives the steady numbers.
The feature extraction (one eval-mode forward pass over the training set) is not included.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGENET = 1_281_167


def one(n, k, dim, pca_dim, iters, threads, seed=0):
    """Times one size in this process; returns a dict of timings and the peak RSS."""
    import resource

    import numpy as np
    import faiss
    sys.path.insert(0, str(REPO))
    from common import cluster
    faiss.omp_set_num_threads(threads)
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    w = cluster.pca_whiten(x, pca_dim)
    t1, c1 = time.perf_counter(), time.process_time()
    w = cluster.l2_normalize(w)
    t2, c2 = time.perf_counter(), time.process_time()
    cp = faiss.ClusteringParameters()  # common.cluster.kmeans's settings, with no early stop
    cp.niter, cp.seed, cp.max_points_per_centroid, cp.min_points_per_centroid = iters, seed, 10_000_000, 1
    cp.early_stop_threshold = -1.0
    km = faiss.Clustering(pca_dim, k, cp)
    km.train(w, faiss.IndexFlatL2(pca_dim))
    t3, c3 = time.perf_counter(), time.process_time()
    x.T @ x  # the covariance product alone: the part of the PCA that grows with N
    t4 = time.perf_counter()
    return dict(n=n, k=k, iters=km.iteration_stats.size(), pca_s=t1 - t0, l2_s=t2 - t1, kmeans_s=t3 - t2,
                cov_s=t4 - t3, pca_cpu_s=c1 - c0, kmeans_cpu_s=c3 - c2, load_avg=os.getloadavg()[0],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, features_mb=x.nbytes / 2 ** 20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', type=int, nargs='+', default=[20000, 40000, 80000], help='numbers of points N')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--k', type=int, default=10000, help='clusters (fixed over the sizes)')
    g.add_argument('--k-ratio', type=int, default=0, help='k = N / this instead (ImageNet with k=10000: 128)')
    p.add_argument('--dim', type=int, default=2048, help='feature dimension (ResNet-50: 2048)')
    p.add_argument('--pca-dim', type=int, default=256)
    p.add_argument('--iters', type=int, default=20, help='k-means iterations of a round')
    p.add_argument('--timed-iters', type=int, default=4, help='k-means iterations actually run (and scaled)')
    p.add_argument('--threads', type=int, default=2, help='OpenMP/BLAS threads')
    p.add_argument('--one', type=int, nargs=2, metavar=('N', 'K'), help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.dim, args.pca_dim, args.timed_iters, args.threads)))
        return None
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t)
    rows = []
    for n in args.sizes:
        k = max(1, n // args.k_ratio) if args.k_ratio else args.k
        if n <= k:  # faiss copies the points when N == k: nothing to time
            print(f'N={n:>8} k={k:>6}: skipped, k-means needs N > k to do any work', flush=True)
            continue
        cmd = [sys.executable, __file__, '--one', str(n), str(k), '--dim', str(args.dim), '--pca-dim',
               str(args.pca_dim), '--timed-iters', str(args.timed_iters), '--threads', t]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f'N={n}: {out.stderr[-2000:]}')
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r['kmeans_full_s'] = r['kmeans_s'] / r['iters'] * args.iters
        rows.append(r)
        print(f'N={n:>7} k={k:>5} d={args.dim}->{args.pca_dim}: PCA {r["pca_s"]:5.1f} s, L2 {r["l2_s"]:4.2f} s, '
              f'k-means {r["kmeans_s"] / r["iters"]:5.2f} s/iteration ({args.iters} iterations: '
              f'{r["kmeans_full_s"]:6.1f} s), peak RSS {r["peak_rss_mb"]:5.0f} MiB (features {r["features_mb"]:.0f} '
              f'MiB); CPU s: PCA {r["pca_cpu_s"]:.1f}, k-means/iteration {r["kmeans_cpu_s"] / r["iters"]:.2f}; '
              f'load avg {r["load_avg"]:.1f}', flush=True)
    if len(rows) < 2:
        return rows
    import numpy as np
    big, k_big = rows[-1], (IMAGENET // args.k_ratio if args.k_ratio else args.k)
    grow = (big['cov_s'] * (1 + args.pca_dim / args.dim) + big['l2_s']) / big['n']
    pca = big['pca_s'] + big['l2_s'] + grow * (IMAGENET - big['n'])
    scale = IMAGENET * k_big * args.iters / (big['n'] * big['k'] * big['iters'])  # largest size: least overhead
    km, km_cpu = big['kmeans_s'] * scale, big['kmeans_cpu_s'] * scale
    cpu = big['pca_cpu_s'] * pca / big['pca_s'] + km_cpu
    rss = np.polyval(np.polyfit([r['n'] for r in rows], [r['peak_rss_mb'] for r in rows], 1), IMAGENET)
    per = ', '.join(f'{r["kmeans_s"] / (r["n"] * r["k"] * r["iters"]) * 1e9:.2f}' for r in rows)
    print(f'k-means wall time per point, centroid and iteration: {per} ns')
    print(f'extrapolation to N={IMAGENET}, k={k_big}, d={args.dim}->{args.pca_dim}, {args.iters} iterations, '
          f'{args.threads} threads: PCA+L2 {pca:.0f} s + k-means {km:.0f} s = {(pca + km) / 60:.1f} min at this '
          f'load, peak RSS {rss / 2 ** 10:.1f} GiB; {cpu / 3600:.2f} CPU-hours = {cpu / 60 / args.threads:.0f} min '
          f'on {args.threads} idle cores')
    return rows


if __name__ == '__main__':
    main()
