"""Training identity networks and the router, batch-norm adaptation, whitening heads and
fused models; model cards. Used by the CLI only, never by the running node."""
