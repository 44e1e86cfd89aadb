"""FID, KID and precision/recall on precomputed features, computed by torch-fidelity.

fulora only wraps the library's feature-level functions (so any extractor works); the numbers
are torch-fidelity's. KID is unbiased and holds up with small samples, FID does not (it is
biased upwards when there are fewer images than feature dimensions), so both are reported with
their sample sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def fidelity_metrics(
    generated: np.ndarray,
    reference: np.ndarray,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    neighborhood: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID (mean, std), precision, recall and their F-score of two feature sets.

    Args:
        generated: Features (N, D) of the synthetic images.
        reference: Features (M, D) of the real images.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size, capped at the smaller sample.
        neighborhood: k of the k-NN manifolds of precision/recall (Kynkäänniemi et al.: 3).
        seed: Seed of the KID subsets.

    Returns:
        Metrics with ``n_generated``, ``n_reference`` and the KID subset size used; metrics that
        need more images than there are (FID: 2, KID: 2, precision/recall: k + 1) are NaN.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.from_numpy(np.asarray(generated, dtype=np.float64))
    r = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    n_g, n_r = len(g), len(r)
    subset = min(kid_subset_size, n_g, n_r)
    out: dict[str, Any] = {
        "n_generated": n_g,
        "n_reference": n_r,
        "fid": math.nan,
        "kid_mean": math.nan,
        "kid_std": math.nan,
        "kid_subset_size": subset,
        "precision": math.nan,
        "recall": math.nan,
        "prc_f_score": math.nan,
    }
    if min(n_g, n_r) >= 2:
        out["fid"] = fid_statistics_to_metric(
            fid_features_to_statistics(g), fid_features_to_statistics(r), verbose=False
        )["frechet_inception_distance"]
        kid = kid_features_to_metric(
            g,
            r,
            kid_subsets=kid_subsets,
            kid_subset_size=subset,
            rng_seed=seed,
            verbose=False,
        )
        out["kid_mean"] = kid["kernel_inception_distance_mean"]
        out["kid_std"] = kid["kernel_inception_distance_std"]
    if min(n_g, n_r) > neighborhood:
        prc = prc_features_to_metric(
            g.float(), r.float(), prc_neighborhood=neighborhood, verbose=False
        )
        out["precision"] = prc["precision"]
        out["recall"] = prc["recall"]
        out["prc_f_score"] = prc["f_score"]
    return out
