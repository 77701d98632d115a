"""Ground truth and scores for influence estimates: retraining (cold start, warm start, PBRF), the linear datamodeling score, and the paper's SGD training protocol."""
