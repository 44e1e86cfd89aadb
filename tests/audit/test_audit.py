"""The synthetic-data audit: near-copies, FID/KID against torchmetrics, filtering, extractors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fulora.audit.fidelity import fidelity_metrics
from fulora.audit.memorisation import aligned_pixels, ssim_nearest
from fulora.audit.run import AuditConfig, audit
from fulora.cli import main
from fulora.data.manifest import Manifest
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.data.readers import read_any
from fulora.errors import ConfigError

PLANES = ["abdomen", "brain", "femur"]


@pytest.fixture(scope="module")
def world(sample_data, tmp_path_factory):
    """Half of the real Spanish LoRA images as the training set, a classifier trained on them,
    and a synthetic manifest of exact copies, light copies (noise, brighter) and genuinely
    different images (the other half)."""
    from fulora.classify.train import ClassifyConfig, train_classifier

    root = tmp_path_factory.mktemp("audit")
    spain = read_any(sample_data / "spain_lora_train")
    even = np.arange(len(spain)) % 2 == 0
    train, other = spain.subset(even), spain.subset(~even)
    train_classifier(
        [train],
        root / "clf",
        ClassifyConfig(
            arch="tiny_cnn", pretrained=False, image_size=64, epochs=6, lr=0.05, device="cpu"
        ),
        progress=False,
    )
    rng = np.random.default_rng(0)
    rows = []
    for i in (0, 17, 33):  # exact copies
        rows.append({"path": train.paths[i], "label": train.labels[i], "kind": "exact"})
    for i in (5, 21, 40):  # light copies: sensor noise and the gain turned up
        pixels = np.asarray(Image.open(train.paths[i]).convert("L"), dtype=float)
        noisy = np.clip(pixels + 8 + rng.normal(0, 5, pixels.shape), 0, 255).astype(np.uint8)
        path = root / "synthetic" / f"light-{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(noisy).save(path)
        rows.append({"path": str(path), "label": train.labels[i], "kind": "light"})
    for i in range(len(other)):  # genuinely different images of the same planes
        rows.append({"path": other.paths[i], "label": other.labels[i], "kind": "different"})
    frame = pd.DataFrame(rows).assign(
        split="train", source="synthetic", domain="synthetic", patient="", seed=range(len(rows))
    )
    synthetic = Manifest(frame, origin="synthetic")
    return {"root": root, "train": train, "synthetic": synthetic, "clf": root / "clf"}


def test_phantom_copies_flagged_and_another_machine_not(tmp_path):
    """Without the real data: exact copies flagged, another machine's images not."""
    planes = ["brain", "femur"]
    train = generate_phantom(
        tmp_path / "train", PhantomConfig(per_class=4, planes=planes, grid=False)
    )
    target = generate_phantom(
        tmp_path / "target", PhantomConfig(per_class=4, planes=planes, domain="target", grid=False)
    )
    synthetic = Manifest.concat([train.subset(np.arange(8) < 2), target]).with_values(
        source="synthetic", patient=""
    )
    index, ssim = ssim_nearest(aligned_pixels(synthetic), aligned_pixels(train))
    assert (ssim[:2] > 0.999).all() and list(index[:2]) == [0, 1]
    assert (ssim[2:] < 0.9).all()


def test_ssim_nearest_is_torchmetrics_ssim_with_onednn_as_it_was():
    """Reference: torchmetrics' SSIM, called as usual (oneDNN on), for each chosen pair.

    ssim_nearest turns oneDNN off for its convolutions (3x faster on a CPU); the values must
    stay torchmetrics' to float rounding, and oneDNN must be on again afterwards.
    """
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    g = torch.Generator().manual_seed(0)
    keys = torch.rand(6, 1, 48, 48, generator=g)
    queries = (keys[[2, 0, 5]] + 0.3 * torch.rand(3, 1, 48, 48, generator=g)).clamp(0, 1)
    assert torch.backends.mkldnn.enabled
    index, values = ssim_nearest(queries, keys, shortlist=3)
    assert torch.backends.mkldnn.enabled
    assert list(index) == [2, 0, 5]
    reference = ssim(queries, keys[index], data_range=1.0, reduction="none").double().numpy()
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def audited(world):
    out = world["root"] / "audit"
    cfg = AuditConfig(classifier=str(world["clf"]), device="cpu", min_confidence=0.0)
    result = audit(
        world["synthetic"],
        world["train"],
        out,
        cfg,
        train_set=world["train"],
        write_filtered=out / "filtered.csv",
    )
    return result, out


def test_copies_are_flagged_and_different_images_are_not(world, audited):
    result, out = audited
    rows = pd.read_csv(out / "synthetic_audit.csv")
    kind = world["synthetic"].frame["kind"].to_numpy()
    flagged = rows["near_copy"].to_numpy()
    assert flagged[kind == "exact"].all() and flagged[kind == "light"].all()
    assert not flagged[kind == "different"].any()
    exact = rows[kind == "exact"]
    assert (exact["nn_ssim"] > 0.999).all() and (exact["nn_cosine"] > 0.999).all()
    assert list(exact["nn_ssim_path"]) == list(exact["path"])  # its own original
    memo = result["memorisation"]
    assert memo["near_copies"] == 6
    assert memo["real_to_real"]["ssim"]["n"] == len(world["train"])
    assert memo["synthetic_to_train"]["ssim"]["n"] == len(rows)
    for name in ("similarity.png", "near_copies.png", "consistency.png", "per_plane.csv"):
        assert (out / name).is_file(), name


def test_filter_keeps_and_drops_the_right_rows(world, audited):
    result, out = audited
    rows = pd.read_csv(out / "synthetic_audit.csv")
    expected = ~rows["near_copy"] & rows["agrees"]
    assert (rows["keep"] == expected).all()
    filtered = Manifest.read(out / "filtered.csv")
    assert len(filtered) == expected.sum() == result["filtering"]["kept"]
    kept_seeds = sorted(world["synthetic"].frame["seed"][expected.to_numpy()])
    assert sorted(filtered.frame["seed"].astype(int)) == kept_seeds  # provenance columns kept
    assert set(filtered.frame["kind"]) <= {"different"}


def test_confidence_rule(world, tmp_path):
    cfg = AuditConfig(classifier=str(world["clf"]), device="cpu", min_confidence=1.0)
    result = audit(world["synthetic"], world["train"], tmp_path, cfg)
    assert result["filtering"]["kept"] == 0 and "memorisation" not in result


@pytest.fixture(scope="module")
def second_classifier(world):
    """Another seed of the world's classifier: the two make an ensemble."""
    from fulora.classify.train import ClassifyConfig, train_classifier

    folder = world["root"] / "clf-seed1"
    cfg = ClassifyConfig(
        arch="tiny_cnn", pretrained=False, image_size=64, epochs=6, lr=0.05, device="cpu", seed=1
    )
    train_classifier([world["train"]], folder, cfg, progress=False)
    return folder


def test_an_ensemble_labels_with_its_classifiers_mean_probabilities(
    world, second_classifier, tmp_path
):
    """One classifier seed decided what the filter kept (the demo's kept 10 to 80 images by
    seed; the mean of three, 49 to 62): with ``ensemble`` the rules use the mean."""
    from fulora.audit.extractors import ClassifierExtractor

    synthetic = world["synthetic"]
    cfg = AuditConfig(
        classifier=str(world["clf"]),
        ensemble=[str(second_classifier)],
        device="cpu",
        min_confidence=0.6,
    )
    result = audit(synthetic, world["train"], tmp_path, cfg)
    rows = pd.read_csv(tmp_path / "synthetic_audit.csv")
    probas = [
        ClassifierExtractor(run, "cpu").run(synthetic)[1]
        for run in (world["clf"], second_classifier)
    ]
    mean = (probas[0] + probas[1]) / 2
    classes = ClassifierExtractor(world["clf"]).classes
    assert list(rows["predicted"]) == [classes[k] for k in mean.argmax(1)]
    prompted = [classes.index(label) for label in synthetic.labels]
    np.testing.assert_allclose(rows["p_label"], mean[np.arange(len(mean)), prompted], atol=1e-6)
    assert (rows["keep"] == (rows["agrees"] & (rows["p_label"] >= 0.6))).all()
    assert result["consistency"]["ensemble"] == [str(second_classifier)]
    assert (probas[0].argmax(1) != probas[1].argmax(1)).any()  # two opinions to average


def test_an_ensemble_of_other_planes_or_without_a_classifier_is_refused(world, tmp_path):
    import torch

    state = torch.load(world["clf"] / "best.pt", weights_only=False)
    state["classes"] = list(reversed(state["classes"]))
    other = tmp_path / "other-planes.pt"
    torch.save(state, other)
    cfg = AuditConfig(classifier=str(world["clf"]), ensemble=[str(other)], device="cpu")
    with pytest.raises(ConfigError, match="average runs trained on the same planes"):
        audit(world["synthetic"], world["train"], tmp_path / "audit", cfg)
    assert not (tmp_path / "audit").exists()  # refused before the run folder
    with pytest.raises(ConfigError, match="'ensemble' needs 'classifier'"):
        AuditConfig(ensemble=[str(world["clf"])])


def test_fid_kid_equal_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(1)
    gen = rng.normal(0.3, 1.0, (60, 16))
    ref = rng.normal(0.0, 1.2, (50, 16))

    class Features(torch.nn.Module):  # the "images" handed to torchmetrics are the features
        num_features = 16

        def forward(self, x):
            return x

    fid = FrechetInceptionDistance(feature=Features(), normalize=False)
    fid.update(torch.from_numpy(ref), real=True)
    fid.update(torch.from_numpy(gen), real=False)
    kid = KernelInceptionDistance(feature=Features(), subsets=1, subset_size=50)
    kid.update(torch.from_numpy(ref), real=True)
    kid.update(torch.from_numpy(gen[:50]), real=False)
    ours = fidelity_metrics(gen, ref, kid_subsets=1, kid_subset_size=50)
    ours_kid = fidelity_metrics(gen[:50], ref, kid_subsets=1, kid_subset_size=50)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)
    assert ours_kid["kid_mean"] == pytest.approx(float(kid.compute()[0]), rel=1e-5)
    assert ours["n_generated"] == 60 and ours["kid_subset_size"] == 50


def test_precision_recall_on_known_cases():
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, (80, 8))
    same = fidelity_metrics(ref.copy(), ref)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["fid"] < 1e-6
    far = fidelity_metrics(ref + 100, ref)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    tiny = fidelity_metrics(ref[:1], ref)
    assert np.isnan(tiny["fid"]) and np.isnan(tiny["precision"])


def _africa_vs_spain(sample_data, out, *extra: str) -> list[str]:
    """CLI arguments auditing the African cohort against the Spanish LoRA images."""
    return [
        "audit",
        *("--synthetic", str(sample_data / "african_dev")),
        *("--reference", str(sample_data / "spain_lora_train")),
        *("--out", str(out)),
        *extra,
    ]


def test_inception_without_weights_says_what_to_do(
    world, sample_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FULORA_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="--inception-weights") as err:
        audit(world["synthetic"], world["train"], tmp_path / "a", AuditConfig(device="cpu"))
    assert "--extractor classifier" in str(err.value)
    assert not (tmp_path / "a").exists()  # nothing started
    code = main(_africa_vs_spain(sample_data, tmp_path / "b", "--extractor", "inception"))
    assert code == 2 and "weights-inception" in capsys.readouterr().err


def test_real_spain_vs_africa_through_the_cli(sample_data, tmp_path, capsys):
    """Real vs real, different sites: the reference for 'a different but real distribution'."""
    from fulora.classify.train import ClassifyConfig, train_classifier

    spain = read_any(sample_data / "spain_lora_train")
    train_classifier(
        [spain],
        tmp_path / "clf",
        ClassifyConfig(arch="tiny_cnn", pretrained=False, image_size=64, epochs=3, device="cpu"),
        progress=False,
    )
    out = tmp_path / "audit"
    code = main(
        _africa_vs_spain(
            sample_data,
            out,
            *("--train-set", str(sample_data / "spain_lora_train")),
            *("--classifier", str(tmp_path / "clf")),
            *("--write-filtered", str(tmp_path / "kept.csv")),
        )
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "near-copies of LoRA training images: 0" in printed
    # the filter's rules, so that an agreement above the share kept does not puzzle
    assert "(no near-copy, the classifier agreeing with the prompted plane, its probability" in (
        printed
    )
    result = json.loads((out / "audit.json").read_text())
    assert result["images"] == {"synthetic": 217, "reference": 100, "train_set": 100}
    assert result["fidelity"]["overall"]["fid"] > 0
    per_plane = pd.read_csv(out / "per_plane.csv")
    assert list(per_plane["plane"]) == ["abdomen", "brain", "femur", "thorax", "overall"]
