"""The CiF pipeline: JL sketches, k-means, the cache, queries, the self-influence correction, bounds, saved caches."""
