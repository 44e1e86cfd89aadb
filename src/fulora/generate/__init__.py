"""Synthetic dataset generation: seeded, batched, resumable, sharded, traceable."""
