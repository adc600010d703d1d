"""Server side of the federation: strategy, aggregation, run records, and the fedmer command."""
