"""Model components: patch-view sampling, pooling and training losses."""
