"""Plane classifiers: architectures, hybrid data mixing, training."""
