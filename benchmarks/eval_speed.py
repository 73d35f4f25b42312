"""Evaluation speed at 50k × 512 (the size of CIFAR-10 features from a ResNet-18), side by side in one process:

- linear probe on cached features (ours: one fit, and the full 9-point lr/wd sweep that trains all nine models at
  once) vs scikit-learn LogisticRegression (lbfgs) on the same standardised features: accuracy and time;
- kNN (k = 20, cosine, exp(sim/T) voting): faiss flat index vs chunked torch brute force vs scikit-learn
  NearestNeighbors (brute, cosine), all voting the same way, plus KNeighborsClassifier's own prediction.

Features are synthetic but not trivial: 10 Gaussian classes in a 32-dim subspace with heavy noise in all 512 dims,
so accuracies sit well below 100%.   python benchmarks/eval_speed.py [--train 50000 --test 10000 --dim 512]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ssl_kit.eval.knn import knn_scores, knn_search, torch_knn_search
from ssl_kit.eval.linear_probe import linear_probe


def synthetic_features(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # same class centres for train and test
    centres = torch.randn(classes, 32, generator=g) * 0.45
    basis = torch.linalg.qr(torch.randn(dim, 32, generator=g))[0]  # (dim, 32)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = (centres[labels] + torch.randn(n, 32, generator=g)) @ basis.T + 0.5 * torch.randn(n, dim, generator=g)
    return x, labels


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    torch.set_num_threads(torch.get_num_threads())
    x, y = synthetic_features(args.train, args.dim, 10, 1)
    xt, yt = synthetic_features(args.test, args.dim, 10, 2)
    print(f"features: train {tuple(x.shape)}, test {tuple(xt.shape)}, torch threads {torch.get_num_threads()}")

    ours, t_ours = timed(lambda: linear_probe(x, y, xt, yt, 10, args.epochs, sweep=False))
    swept, t_sweep = timed(lambda: linear_probe(x, y, xt, yt, 10, args.epochs, sweep=True))
    mean, std = x.mean(0), x.std(0, unbiased=False)
    xs, xts = ((x - mean) / std).numpy(), ((xt - mean) / std).numpy()
    sk, t_sk = timed(lambda: LogisticRegression(max_iter=1000).fit(xs, y.numpy()))
    sk_acc = float((sk.predict(xts) == yt.numpy()).mean())
    print("\nlinear probe                         top-1    seconds   sklearn time / ours")
    print(f"ours, one fit ({args.epochs} epochs)            {ours['top1']:.4f}  {t_ours:8.2f}   {t_sk / t_ours:6.1f}x")
    print(f"ours, 9-point lr/wd sweep + refit    {swept['top1']:.4f}  {t_sweep:8.2f}   {t_sk / t_sweep:6.1f}x")
    print(f"sklearn LogisticRegression (lbfgs)   {sk_acc:.4f}  {t_sk:8.2f}   1.0x")

    k, temperature = 20, 0.07

    def vote(sims, ids) -> float:
        scores = knn_scores(torch.as_tensor(sims).float(), y[torch.as_tensor(ids)], 10, temperature)
        return float((scores.argmax(1) == yt).float().mean())

    (fs, fi), t_faiss = timed(lambda: knn_search(x, xt, k))
    (ts, ti), t_torch = timed(lambda: torch_knn_search(x, xt, k))
    normalised = torch.nn.functional.normalize(x, dim=1).numpy()
    queries = torch.nn.functional.normalize(xt, dim=1).numpy()

    def sklearn_search():
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(normalised)
        distance, index = nn.kneighbors(queries)
        return 1 - distance, index

    (ss, si), t_sklearn = timed(sklearn_search)
    clf, t_clf = timed(lambda: KNeighborsClassifier(k, algorithm="brute", metric="cosine")
                       .fit(normalised, y.numpy()).predict(queries))
    same = float((np.sort(fi.numpy(), 1) == np.sort(ti.numpy(), 1)).mean())
    print(f"\nkNN k={k} T={temperature}                  top-1    seconds   time / faiss   (faiss and torch "
          f"neighbour sets agree on {same:.4%})")
    for name, acc, seconds in (("faiss flat (ours)", vote(fs, fi), t_faiss), ("torch chunked brute force",
                               vote(ts, ti), t_torch), ("sklearn NearestNeighbors brute", vote(ss, si), t_sklearn),
                               ("sklearn KNeighborsClassifier (uniform)", float((clf == yt.numpy()).mean()), t_clf)):
        print(f"{name:38s} {acc:.4f}  {seconds:8.2f}   {seconds / t_faiss:6.1f}x")


if __name__ == "__main__":
    main()
