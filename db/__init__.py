"""Storage: the SQLAlchemy identity store and its queries. Knows nothing of networks."""
