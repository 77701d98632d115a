"""cif_jax: Clustered Influence Functions in JAX."""
