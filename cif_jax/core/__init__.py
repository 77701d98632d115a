"""The model snapshot and its data (``Task``), per-example gradients, GGN products, curvature samples, input checks."""
