"""Evaluation with the ADM protocol (FID, sFID, IS, precision/recall) in PyTorch.

- `frechet_distance(mu1, sigma1, mu2, sigma2) -> float`: float64, symmetric-product square root, no scipy.
- `inception_score`, `precision_recall`, `feature_statistics`: the ADM evaluator's conventions.
- The whole step: `repro.evaluation.evaluate.evaluate(samples, ref, metrics, weights_path=...)`
  (not imported here, so `from repro.evaluation import frechet_distance` needs no torch-fidelity).
"""

from repro.evaluation.metrics import feature_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["frechet_distance", "inception_score", "precision_recall", "feature_statistics"]
