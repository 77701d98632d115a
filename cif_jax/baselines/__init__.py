"""Per-query IF and the related methods: attribution, retraining, LDS, PBRF, STRIDE, Lasso, interaction, LiSSA."""
