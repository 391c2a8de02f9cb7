"""Float64 NumPy references for the signals."""

import numpy as np


def xlogx(p):
    """p log p with 0 log 0 = 0."""
    return p * np.log(np.where(p > 0, p, 1.0))


def log_softmax(logits):
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def signals(logits, confidence_k, entropy_k):
    logp = log_softmax(logits)
    p = np.exp(logp)
    entropy = -xlogx(p).sum(-1)
    varentropy = (p * np.where(p > 0, logp + entropy[:, None], 0.0) ** 2).sum(-1)
    top = -np.sort(-logp, axis=-1)
    out = {"entropy": entropy, "varentropy": varentropy, "margin": top[:, 0] - top[:, 1]}
    out["confidence"] = np.array([-top[i, :k].mean() for i, k in enumerate(confidence_k)])
    topk_entropy = []
    for i, k in enumerate(entropy_k):
        q = np.exp(top[i, :k])
        q = q / q.sum()
        topk_entropy.append(-xlogx(q).sum())
    out["topk_entropy"] = np.array(topk_entropy)
    return out


def window_means(confidences, window):
    """Mean over the last ``window`` values at every position (fewer at the start)."""
    c = np.asarray(confidences, dtype=np.float64)
    return np.array([c[max(0, i - window + 1) : i + 1].mean() for i in range(len(c))])
