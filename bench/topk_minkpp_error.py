"""How far is Min-K%++ from vLLM's top-k estimates from the exact one? (issue 15, item 4)

Zipf-like next-token distributions over V = 49,152 (SmolLM2's vocabulary): logit of the token of
frequency rank r is -s·ln r plus Gaussian noise (sd 0.5), for exponents s in {0.9, 1.0, 1.1, 1.2};
targets are drawn from each distribution. From the top k = 20 logprobs ``operators.lm.metrics.
topk_metrics`` estimates H and E[ln²p]; we report the mean and median relative error of σ =
sqrt(E[ln²p] - H²) and of the per-token Min-K%++ z = (lp + H)/σ, against the exact values.

    python -m bench.topk_minkpp_error [--rows 400]
"""

from __future__ import annotations

import argparse

import numpy as np

from operators.lm.metrics import topk_metrics

V, K = 49_152, 20


def measure(s: float, rows: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    base = -s * np.log(np.arange(1, V + 1, dtype=np.float64))
    logits = base[None, :] + rng.normal(0.0, 0.5, (rows, V))
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)           # [rows, V]
    p = np.exp(lp)
    targets = np.array([rng.choice(V, p=row / row.sum()) for row in p])
    observed = lp[np.arange(rows), targets]
    h = -(p * lp).sum(1)
    sigma = np.sqrt((p * lp**2).sum(1) - h**2)
    top = -np.sort(-lp, axis=1)[:, :K]
    rank = (lp >= observed[:, None]).sum(1)
    est = topk_metrics(observed, rank, top, V)
    h_e, m2_e = est["entropy_topk"].astype(np.float64), est["logp2_topk"].astype(np.float64)
    sigma_e = np.sqrt(np.maximum(m2_e - h_e**2, 1e-12))
    z, z_e = (observed + h) / sigma, (observed + h_e) / sigma_e
    rel_s, rel_z = np.abs(sigma_e - sigma) / sigma, np.abs(z_e - z) / np.maximum(np.abs(z), 1e-12)
    return {"s": s, "sigma_mean": rel_s.mean(), "sigma_median": np.median(rel_s),
            "z_mean_abs": np.abs(z_e - z).mean(), "z_median_rel": np.median(rel_z)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    args = ap.parse_args()
    print(f"V = {V}, k = {K}, {args.rows} positions per exponent")
    print(f"{'s':>4} {'σ rel err mean':>15} {'σ rel err median':>17} {'|Δz| mean':>10} {'z rel err median':>17}")
    for s in (0.9, 1.0, 1.1, 1.2):
        r = measure(s, args.rows)
        print(f"{r['s']:>4.1f} {100 * r['sigma_mean']:>14.1f}% {100 * r['sigma_median']:>16.1f}% "
              f"{r['z_mean_abs']:>10.3f} {100 * r['z_median_rel']:>16.1f}%")


if __name__ == "__main__":
    main()
