"""Time 1-D k-means quantization against ``torch.sort`` on the same values.

Usage: ``python benchmarks/quant_speed.py [--n 11000000] [--bits 4]``. Goal: ratio <= 2.
Also times scikit-learn's KMeans on a 1M subsample for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from avalanche_tsn._cli import show_defaults
from avalanche_tsn.quantization import kmeans_1d


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=11_000_000)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sklearn", action="store_true", help="also time sklearn on 1M values")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    show_defaults(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    values = torch.randn(args.n, device=args.device) * 0.05
    sync = torch.cuda.synchronize if values.is_cuda else (lambda: None)

    def run_sort():
        torch.sort(values)
        sync()

    def run_kmeans():
        kmeans_1d(values, args.bits)
        sync()

    run_kmeans()  # warm-up
    t_sort, t_kmeans = timed(run_sort, args.repeats), timed(run_kmeans, args.repeats)
    result = {
        "n": args.n,
        "bits": args.bits,
        "device": args.device,
        "sort_s": round(t_sort, 3),
        "kmeans_1d_s": round(t_kmeans, 3),
        "ratio": round(t_kmeans / t_sort, 3),
    }
    if args.sklearn:
        from sklearn.cluster import KMeans

        sub = values[:1_000_000].cpu().numpy().reshape(-1, 1)
        result["sklearn_1M_s"] = round(
            timed(lambda: KMeans(2**args.bits, n_init=1, random_state=0).fit(sub), 1), 3
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
