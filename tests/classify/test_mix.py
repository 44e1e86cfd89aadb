import pytest

from fulora.classify.mix import mix_manifests
from fulora.data.manifest import Manifest
from fulora.errors import DataError

FIVE = ["other", "abdomen", "brain", "femur", "thorax"]


def _real(per_class):
    return Manifest.from_records(
        {"path": f"/r/{p}{i}.png", "label": p, "patient": f"P{i}", "source": "fetal_planes_db"}
        for p, n in per_class.items()
        for i in range(n)
    )


def _synthetic(n):
    return Manifest.from_records(
        {"path": f"/s/{p}{i}.png", "label": p, "source": "synthetic", "domain": "synthetic"}
        for p in FIVE
        for i in range(n)
    )


def test_paper_hb_regime():
    real = _real(
        {"other": 400, "abdomen": 300, "brain": 500, "femur": 250, "thorax": 260, "cervix": 100}
    )
    mixed = mix_manifests([real, _synthetic(1000)], classes=FIVE, balance=True, max_per_class=230)
    frame = mixed.frame
    assert (frame["source"] != "synthetic").sum() == 1150
    assert (frame["source"] == "synthetic").sum() == 5000
    assert mixed.select(source="fetal_planes_db").counts("label") == {p: 230 for p in FIVE}
    assert "cervix" not in mixed.counts("label")


def test_synthetic_ratio_and_caps():
    real = _real({p: 40 for p in FIVE})
    mixed = mix_manifests([real, _synthetic(100)], classes=FIVE, synthetic_ratio=0.5, seed=3)
    assert len(mixed.select(source="synthetic")) == 200
    assert mixed.select(source="synthetic").counts("label") == {p: 40 for p in FIVE}
    capped = mix_manifests(
        [real, _synthetic(100)], classes=FIVE, max_per_class=10, max_synthetic_per_class=20
    )
    assert len(capped) == 50 + 100
    none = mix_manifests([real, _synthetic(10)], classes=FIVE, synthetic_ratio=0.0)
    assert len(none) == 200
    with pytest.raises(DataError, match="needs 100 synthetic images per plane"):
        mix_manifests([real, _synthetic(10)], classes=FIVE, synthetic_ratio=5 / 7)
    with pytest.raises(DataError, match=r"must be in \[0, 1\)"):
        mix_manifests([real], classes=FIVE, synthetic_ratio=1.0)


def test_balance_down_samples_to_the_smallest_plane():
    mixed = mix_manifests(
        [_real({"brain": 30, "femur": 12})], classes=["brain", "femur"], balance=True, seed=1
    )
    assert mixed.counts("label") == {"brain": 12, "femur": 12}
    again = mix_manifests(
        [_real({"brain": 30, "femur": 12})], classes=["brain", "femur"], balance=True, seed=1
    )
    assert again.fingerprint() == mixed.fingerprint()


def test_empty_training_set():
    with pytest.raises(DataError, match="training set is empty"):
        mix_manifests([_real({"cervix": 3})], classes=["brain"])
