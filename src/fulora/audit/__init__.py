"""Audit of synthetic images: fidelity and diversity, memorisation, class consistency, filtering."""
