"""Embedding similarity of answers to their references: cosine, Euclidean distance and Pearson correlation of the
two mean-pooled vectors, per example and averaged. Pure numpy; the encoder is rlhf_ablate/models/embedding.py."""

from __future__ import annotations

import numpy as np


def similarities(answers: np.ndarray, references: np.ndarray) -> dict[str, np.ndarray]:
    """Row-wise similarities of two (n, d) arrays: ``cosine`` (higher = closer), ``euclidean`` (lower = closer) and
    ``pearson`` (the correlation of the two vectors' components; higher = closer). A zero or constant vector gets
    NaN where the measure is undefined."""
    a = np.asarray(answers, dtype=np.float64)
    b = np.asarray(references, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (n, d) arrays of one shape, got {a.shape} and {b.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        pearson = (ac * bc).sum(1) / (np.linalg.norm(ac, axis=1) * np.linalg.norm(bc, axis=1))
    return {"cosine": cos, "euclidean": np.linalg.norm(a - b, axis=1), "pearson": pearson}
