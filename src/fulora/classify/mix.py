"""Hybrid training sets: real and synthetic manifests combined with caps, ratios and balance.

The paper's regimes, in these terms:

* ES (real only): the real manifest, everything.
* HB (hybrid): ``balance=True, max_per_class=230`` on the real part (the "1150 balanced") plus
  every synthetic image (1000 per plane).
* A synthetic-ratio sweep: ``synthetic_ratio=r`` makes synthetic images a share ``r`` of the
  training set, drawn class-balanced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fulora.data.manifest import Manifest
from fulora.errors import DataError

logger = logging.getLogger("fulora")


def is_synthetic(manifest: Manifest):
    """Boolean mask of synthetic rows (``source == "synthetic"``)."""
    return (manifest.frame["source"] == "synthetic").to_numpy()


def _cap(manifest: Manifest, per_class: int | None, seed: int, balance: bool) -> Manifest:
    if len(manifest) == 0:
        return manifest
    counts = manifest.counts("label")
    target = per_class
    if balance:
        smallest = min(counts.values())
        target = min(smallest, per_class) if per_class is not None else smallest
    if target is None:
        return manifest
    return manifest.balanced(target, seed=seed, allow_fewer=True)


def mix_manifests(
    manifests: Sequence[Manifest],
    *,
    classes: Sequence[str],
    max_per_class: int | None = None,
    max_synthetic_per_class: int | None = None,
    synthetic_ratio: float | None = None,
    balance: bool = False,
    seed: int = 0,
) -> Manifest:
    """Combine training manifests into one training set.

    Args:
        manifests: Real and/or synthetic manifests (synthetic rows have ``source`` synthetic).
        classes: The model's classes; rows of other planes are dropped (and counted in the log).
        max_per_class: Cap on real images per plane (random, seeded).
        max_synthetic_per_class: Cap on synthetic images per plane.
        synthetic_ratio: Share of synthetic images in the result (0 <= r < 1), drawn
            class-balanced; None keeps every synthetic image (after its cap).
        balance: Down-sample the real images to the same count per plane.
        seed: Random seed of every draw.

    Returns:
        The training manifest.

    Raises:
        DataError: If nothing is left, or the synthetic images cannot meet the ratio.
    """
    combined = Manifest.concat(list(manifests)).drop_duplicate_paths("training")
    keep = combined.frame["label"].isin(list(classes)).to_numpy()
    if (~keep).any():
        dropped = combined.subset(~keep).counts("label")
        logger.info("training set: dropped planes not among the classes: %s", dropped)
    combined = combined.subset(keep)
    synthetic = is_synthetic(combined)
    real = _cap(combined.subset(~synthetic), max_per_class, seed, balance)
    synth = _cap(combined.subset(synthetic), max_synthetic_per_class, seed, False)
    if synthetic_ratio is not None:
        if not 0 <= synthetic_ratio < 1:
            raise DataError(f"synthetic_ratio must be in [0, 1), got {synthetic_ratio}")
        wanted = round(synthetic_ratio / (1 - synthetic_ratio) * len(real))
        per_class = -(-wanted // max(1, len(classes)))
        available = synth.counts("label")
        short = {c: available.get(c, 0) for c in classes if available.get(c, 0) < per_class}
        if wanted and short:
            raise DataError(
                f"synthetic_ratio {synthetic_ratio} needs {per_class} synthetic images per plane "
                f"but there are only {short}; generate more or lower the ratio"
            )
        synth = (
            synth.balanced(per_class, seed=seed, labels=classes)
            if wanted
            else synth.subset([False] * len(synth))
        )
    result = Manifest.concat([real, synth])
    if len(result) == 0:
        raise DataError(
            f"the training set is empty: no images of the planes {list(classes)} in "
            f"{', '.join(m.origin for m in manifests) or 'the training manifests'}"
        )
    logger.info(
        "training set: %d real + %d synthetic images (%s)",
        len(real),
        len(synth),
        ", ".join(f"{k} {v}" for k, v in result.counts("label").items()),
    )
    return result
