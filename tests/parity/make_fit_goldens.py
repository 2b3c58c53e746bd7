#!/usr/bin/env python3
"""Goldens for atmoe's router fitting (tests/unit/test_router_fit.cpp), float64 NumPy/SciPy.

softmax regression (fit-router's per-layer gate, coordinator/router_fit.h):
  minimise (1/sum w) sum_i w_i sum_c -Y_ic log softmax(V z_i + c)_c + (l2/2) |V|^2,
  z = (x - mu) / sigma standardised on the weighted rows (sigma = 1 for constant columns);
  returned for raw x: W = V / sigma, b = c - W mu.
  Cases: a planted linear separation (labels from a known W*, one-hot, some soft mixture
  rows, unequal row weights, columns of very different scales and one constant column),
  solved by scipy.optimize.minimize (L-BFGS-B, gradient tolerance 1e-12).

k-means (fit-intuition, coordinator/router_fit.h):
  - Lloyd's iterations from given centres (NumPy): the final centres and assignments;
  - four well-separated planted blobs: the best of 200 k-means++ restarts (NumPy), whose
    partition and inertia atmoe's seeded k-means++ must reach.

Usage: make_fit_goldens.py   (needs numpy, scipy) -> goldens/fit_synth.json
"""
import json
import os

import numpy as np
from scipy.optimize import minimize


def standardise(X, w):
    p = w / w.sum()
    mu = p @ X
    sd = np.sqrt(p @ (X - mu) ** 2)
    smax = sd.max()
    sd = np.where(sd > 1e-12 * max(smax, 1e-300), sd, 1.0)
    return (X - mu) / sd, mu, sd


def objective(theta, Z, Y, w, l2, C):
    n, d = Z.shape
    V = theta[:C * d].reshape(C, d)
    c = theta[C * d:]
    L = Z @ V.T + c
    m = L.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(L - m).sum(axis=1))
    p = w / w.sum()
    ys = Y.sum(axis=1)
    loss = p @ (ys * lse - (Y * L).sum(axis=1)) + 0.5 * l2 * (V ** 2).sum()
    P = np.exp(L - lse[:, None])
    R = p[:, None] * (ys[:, None] * P - Y)
    gV = R.T @ Z + l2 * V
    gc = R.sum(axis=0)
    return loss, np.concatenate([gV.ravel(), gc])


def fit(X, Y, w, l2):
    Z, mu, sd = standardise(X, w)
    C, d = Y.shape[1], X.shape[1]
    res = minimize(objective, np.zeros(C * d + C), args=(Z, Y, w, l2, C), jac=True, method="L-BFGS-B",
                   options={"maxiter": 100000, "gtol": 1e-12, "ftol": 1e-16, "maxcor": 30})
    V = res.x[:C * d].reshape(C, d)
    c = res.x[C * d:]
    W = V / sd
    b = c - W @ mu
    _, g = objective(res.x, Z, Y, w, l2, C)
    return W, b, float(res.fun), float(np.abs(g).max())


def regression_case(rng, n, d, C, l2, soft_frac):
    scales = 10.0 ** rng.uniform(-2, 2, size=d)
    X = rng.normal(size=(n, d)) * scales + rng.normal(size=d) * scales
    X[:, -1] = 3.25  # a constant column
    Wt = rng.normal(size=(C, d)) / scales
    Wt[:, -1] = 0
    logits = X @ Wt.T + 0.3 * rng.normal(size=(n, C))
    Y = np.eye(C)[logits.argmax(axis=1)]
    soft = rng.random(n) < soft_frac
    mix = rng.dirichlet(np.ones(C), size=n)
    Y[soft] = mix[soft]
    w = rng.uniform(0.5, 2.0, size=n)
    W, b, loss, gmax = fit(X, Y, w, l2)
    acc = float(((X @ W.T + b).argmax(axis=1) == logits.argmax(axis=1))[~soft].mean())
    print(f"regression n={n} d={d} C={C} l2={l2}: loss {loss:.6g}, |grad| {gmax:.2g}, train accuracy {acc:.3f}")
    return {"X": X.ravel().tolist(), "Y": Y.ravel().tolist(), "w": w.tolist(), "n": n, "d": d, "C": C, "l2": l2,
            "W": W.ravel().tolist(), "b": b.tolist(), "loss": loss, "accuracy": acc}


def lloyd(X, cen, max_iter=300):
    assign = None
    for it in range(max_iter + 1):
        D = ((X[:, None, :] - cen[None, :, :]) ** 2).sum(axis=2)
        a = D.argmin(axis=1)
        if assign is not None and (a == assign).all():
            break
        assign = a
        cen = np.stack([X[assign == k].mean(axis=0) for k in range(cen.shape[0])])
    inertia = float(((X - cen[assign]) ** 2).sum())
    return cen, assign, inertia


def kmeanspp(X, K, rng):
    n = X.shape[0]
    idx = [rng.integers(n)]
    d2 = ((X - X[idx[0]]) ** 2).sum(axis=1)
    for _ in range(1, K):
        i = rng.choice(n, p=d2 / d2.sum())
        idx.append(i)
        d2 = np.minimum(d2, ((X - X[i]) ** 2).sum(axis=1))
    return X[idx].copy()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    rng = np.random.default_rng(20261130)
    out = {"generator": "tests/parity/make_fit_goldens.py",
           "reference": f"numpy {np.__version__}, scipy L-BFGS-B (gtol 1e-12), float64"}
    out["regression"] = [regression_case(rng, 300, 7, 3, 0.05, 0.15),
                         regression_case(rng, 120, 5, 4, 0.5, 0.0),
                         regression_case(rng, 200, 9, 2, 0.01, 0.3)]
    # k-means: Lloyd from given centres, on overlapping data (several iterations).
    X = rng.normal(size=(150, 4))
    X[:50] += 1.5
    X[50:100, 0] -= 1.5
    start = X[[0, 60, 120]].copy()
    cen, assign, inertia = lloyd(X, start)
    out["lloyd"] = {"X": X.ravel().tolist(), "n": 150, "d": 4, "K": 3, "start": start.ravel().tolist(),
                    "centroids": cen.ravel().tolist(), "assign": assign.tolist(), "inertia": inertia}
    # Planted blobs: the best of many k-means++ restarts.
    centres = rng.normal(size=(4, 5)) * 8
    Xb = np.concatenate([c + rng.normal(size=(60, 5)) for c in centres])
    best = None
    for r in range(200):
        c, a, i = lloyd(Xb, kmeanspp(Xb, 4, rng))
        if best is None or i < best[2] - 1e-9:
            best = (c, a, i)
    print(f"blobs: best inertia {best[2]:.6f}")
    out["blobs"] = {"X": Xb.ravel().tolist(), "n": Xb.shape[0], "d": 5, "K": 4, "centroids": best[0].ravel().tolist(),
                    "assign": best[1].tolist(), "inertia": best[2]}
    with open(os.path.join(here, "goldens", "fit_synth.json"), "w") as f:
        json.dump(out, f)
    print("wrote goldens/fit_synth.json")


if __name__ == "__main__":
    main()
