"""How often does a truly exchangeable calibration pass each false-alarm criterion? (#18)

Draws a calibration set of ``n`` and a test set of ``m`` continuous scores from one distribution,
flags test scores with conformal ``p < alpha``, and counts how often (a) the exact binomial 95%
interval of the flagged share holds alpha and (b) the flagged count lies in the central 95% range
of ``BetaBinom(m, k + 1, n - k)``, the count's law when the calibration set is drawn at random.

    python experiments/calibration/simulate.py [--n 10000] [--m 10000] [--draws 2000]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.stats import betabinom, binomtest

ALPHAS = (0.01, 0.05, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="calibration images")
    ap.add_argument("--m", type=int, default=10_000, help="test images")
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    binom_ok = np.zeros((args.draws, len(ALPHAS)), bool)
    bb_ok = np.zeros_like(binom_ok)
    ranges = []
    for a in ALPHAS:
        k = math.ceil(a * (args.n + 1)) - 2  # k + 1 of the n + 1 ranks are flagged
        ranges.append(betabinom.ppf([0.025, 0.975], args.m, k + 1, args.n - k))
    for i in range(args.draws):
        cal = np.sort(rng.random(args.n))
        p = (1 + np.searchsorted(cal, rng.random(args.m), side="right")) / (args.n + 1)
        for j, a in enumerate(ALPHAS):
            flagged = int(np.count_nonzero(p < a))
            ci = binomtest(flagged, args.m).proportion_ci(method="exact")
            binom_ok[i, j] = ci.low <= a <= ci.high
            bb_ok[i, j] = ranges[j][0] <= flagged <= ranges[j][1]
    print(f"n={args.n} calibration, m={args.m} test, {args.draws} draws, alphas {ALPHAS}")
    print(
        "binomial interval holds alpha:", binom_ok.mean(0).round(3), "all:", binom_ok.all(1).mean()
    )
    print("beta-binomial range holds it:", bb_ok.mean(0).round(3), "all:", bb_ok.all(1).mean())


if __name__ == "__main__":
    main()
