"""Site data layer: native database readers, synthetic databases, and the model-ready clip cache.

Data flows one way through fedmer: partitions -> models -> client -> server.
This package imports none of the others.
"""
