"""The yardstick classifier and the metrics built on it (class accuracy, feature-space FID).

The classifier is the slowest model on a CPU, so the features of 2000 real test images are
computed once (conftest `real_test_features`); FID against "the test set" uses their statistics
here instead of all 10000 test images (`_test_stats` is patched), which keeps the suite fast.
"""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.data.fashion_mnist import CLASSES, to_model_images
from tutorial_lib.eval import metrics
from tutorial_lib.models.classifier import ClassifierConfig, FashionClassifier
from tutorial_lib.eval.metrics import (
    class_accuracy,
    evaluate_images,
    fid,
    frechet_distance,
    gaussian_stats,
    per_class_accuracy,
    reals_baseline,
)


def test_shipped_classifier_accuracy(real_test_features):
    _, logits, labels = real_test_features
    assert logits.shape == (2000, 10)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    assert accuracy > 0.9


def test_class_accuracy_agrees_with_logits(shipped_classifier, real_test, real_test_features):
    images, labels = real_test
    _, logits, _ = real_test_features
    acc = class_accuracy(shipped_classifier, to_model_images(images[:100]), labels[:100].tolist())
    expected = (logits[:100].argmax(1) == torch.as_tensor(labels[:100])).double().mean().item()
    assert acc == pytest.approx(expected)


def test_per_class_accuracy_averages_to_the_accuracy_over_balanced_classes(shipped_classifier, real_test):
    """Per class, the classifier's hit rate; weighted by each class's count it is the overall accuracy,
    and a class with no images is NaN."""
    images, labels = real_test
    x, y = to_model_images(images[:200]), torch.as_tensor(labels[:200])
    per_class = per_class_accuracy(shipped_classifier, x, y)
    counts = torch.bincount(y, minlength=10).double()
    assert per_class.shape == (10,) and ((per_class >= 0) & (per_class <= 1)).all()
    assert (per_class * counts).sum() / counts.sum() == pytest.approx(class_accuracy(shipped_classifier, x, y.tolist()))
    assert per_class_accuracy(shipped_classifier, x[y != 3], y[y != 3])[3].isnan()


def test_evaluate_images_reports_per_class_accuracy_of_the_classes_present(shipped_classifier, real_test,
                                                                          monkeypatch):
    """An evaluation's "per_class_accuracy" equals `per_class_accuracy`, by class name, without the
    classes it has no images of."""
    monkeypatch.setattr(metrics, "fid_from_features", lambda *a: 0.0)
    monkeypatch.setattr(metrics, "reals_baseline", lambda *a: 0.0)
    images, labels = real_test
    x, y = to_model_images(images[:200]), torch.as_tensor(labels[:200])
    keep = y != 3
    result = evaluate_images(x[keep], y[keep].tolist(), shipped_classifier)
    expected = per_class_accuracy(shipped_classifier, x[keep], y[keep])
    assert list(result["per_class_accuracy"]) == [c for k, c in enumerate(CLASSES) if k != 3]
    assert [result["per_class_accuracy"][c] for c in CLASSES if c != CLASSES[3]] == \
        pytest.approx([v for k, v in enumerate(expected.tolist()) if k != 3])


def test_features_shapes_and_dtype(real_test_features, shipped_classifier):
    feats, _, _ = real_test_features
    assert feats.shape == (2000, shipped_classifier.feature_dim) and feats.dtype == torch.float64


def test_classifier_rejects_wrong_channels():
    with pytest.raises(ValueError, match="Expected images"):
        FashionClassifier(ClassifierConfig(channels=(8, 16), blocks_per_level=1))(torch.zeros(2, 3, 32, 32))


def test_fid_of_a_set_against_itself_is_zero(real_test_features):
    feats, _, _ = real_test_features
    mu, cov = gaussian_stats(feats)
    assert mu.shape == (feats.shape[1],) and cov.shape == (feats.shape[1], feats.shape[1])
    d = frechet_distance(mu, cov, mu, cov)
    assert abs(d) < 1e-6 * float(cov.trace())


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    v1 = torch.rand(16, generator=g, dtype=torch.float64) * 3 + 0.1
    v2 = torch.rand(16, generator=g, dtype=torch.float64) * 3 + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum()
    d = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert d == pytest.approx(float(expected), rel=1e-9)
    # Symmetric, and only the mean term when the covariances agree.
    assert frechet_distance(mu2, torch.diag(v2), mu1, torch.diag(v1)) == pytest.approx(d, rel=1e-9)
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v1)) == pytest.approx(
        float(((mu1 - mu2) ** 2).sum()), rel=1e-9)


def test_frechet_distance_with_full_covariances_matches_scalar_case():
    # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v1, v2 = torch.linspace(0.5, 2, 8, dtype=torch.float64), torch.linspace(3, 0.2, 8, dtype=torch.float64)
    mu = torch.zeros(8, dtype=torch.float64)
    rotated = frechet_distance(mu, q @ torch.diag(v1) @ q.T, mu, q @ torch.diag(v2) @ q.T)
    assert rotated == pytest.approx(float(((v1.sqrt() - v2.sqrt()) ** 2).sum()), rel=1e-7)


@pytest.fixture
def test_stats_from_2000(monkeypatch, real_test_features):
    """Make `fid` compare against the statistics of the 2000 precomputed test images."""
    stats = gaussian_stats(real_test_features[0])
    monkeypatch.setattr(metrics, "_test_stats", lambda classifier: stats)
    return stats


def test_reals_baseline_is_much_smaller_than_fid_of_noise(shipped_classifier, test_stats_from_2000):
    n = 200
    baseline = reals_baseline(shipped_classifier, n, seed=0)
    noise = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_fid = fid(shipped_classifier, noise)
    assert 0 < baseline and 10 * baseline < noise_fid


def test_evaluate_images_is_deterministic(shipped_classifier, real_test, test_stats_from_2000):
    images, labels = real_test
    x, y = to_model_images(images[2000:2064]), labels[2000:2064].tolist()
    first = evaluate_images(x, y, shipped_classifier, seed=1)
    second = evaluate_images(x, y, shipped_classifier, seed=1)
    assert first == second
    assert set(first) == {"n", "class_accuracy", "per_class_accuracy", "fid", "fid_reals_baseline"} and first["n"] == 64
    assert first["class_accuracy"] > 0.8


def test_fid_needs_two_images(shipped_classifier):
    with pytest.raises(ValueError, match="at least 2"):
        fid(shipped_classifier, torch.zeros(1, 1, 32, 32))


def test_evaluate_pipeline_is_seeded(shipped_classifier, shipped_vae, tiny_denoiser, tiny_text_encoder,
                                     test_stats_from_2000):
    from tutorial_lib.eval.metrics import evaluate_pipeline
    from tutorial_lib.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline(tiny_denoiser, tiny_text_encoder, shipped_vae)
    kwargs = dict(per_prompt=2, num_inference_steps=2, batch_size=8, classifier=shipped_classifier, seed=5)
    first, images = evaluate_pipeline(pipe, "class", **kwargs)
    second, images2 = evaluate_pipeline(pipe, "class", **kwargs)
    assert first == second and torch.equal(images, images2)
    assert images.shape == (20, 1, 32, 32)
    assert first["n"] == 20 and first["prompts"] == "class" and first["num_inference_steps"] == 2
    assert 0.0 <= first["class_accuracy"] <= 1.0 and first["fid"] > 0
    assert not {"attribute_accuracy", "all_attributes_accuracy", "held_out_rate"} & set(first)


@pytest.mark.parametrize("kind", ["attributes", "attributes_held_out"])
def test_evaluate_pipeline_on_attribute_prompts(kind, shipped_classifier, shipped_vae, tiny_denoiser,
                                                tiny_text_encoder, test_stats_from_2000):
    from tutorial_lib.data.attributes import ATTRIBUTES
    from tutorial_lib.data.captions import attribute_prompt_set
    from tutorial_lib.eval.metrics import attribute_accuracy, evaluate_pipeline, held_out_rate
    from tutorial_lib.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline(tiny_denoiser, tiny_text_encoder, shipped_vae)
    result, images = evaluate_pipeline(pipe, kind, per_prompt=2, num_inference_steps=2, batch_size=16,
                                       classifier=shipped_classifier, seed=5)
    prompts, labels, targets = attribute_prompt_set(kind)
    labels = [y for y in labels for _ in range(2)]
    per_image = {n: [v for v in t for _ in range(2)] for n, t in targets.items()}
    expected = attribute_accuracy(images, labels, per_image)
    assert result["n"] == len(images) == 2 * len(prompts) and result["prompts"] == kind
    assert result["attribute_accuracy"] == {n: expected[n] for n in ATTRIBUTES}
    assert result["all_attributes_accuracy"] == expected["all"] and 0 <= expected["all"] <= 1
    assert {"class_accuracy", "fid", "fid_reals_baseline"} <= set(result)
    assert ("held_out_rate" in result) == (kind == "attributes_held_out")
    if kind == "attributes_held_out":
        assert result["held_out_rate"] == held_out_rate(images, labels)


def test_test_set_features_are_cached_on_disk_by_classifier_weights(tmp_path, monkeypatch, real_test):
    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path))
    monkeypatch.setattr(metrics, "load_fashion_mnist", lambda split: (real_test[0][:40], real_test[1][:40]))
    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(channels=(8, 16), blocks_per_level=1)).eval()
    metrics.test_features.cache_clear()
    feats, logits = metrics.test_features(clf)
    assert feats.shape == (40, 16) and logits.shape == (40, 10)
    [cached] = (tmp_path / "features").glob("classifier-*.safetensors")

    def no_data(split):
        raise AssertionError("recomputed although the cache was on disk")

    metrics.test_features.cache_clear()
    monkeypatch.setattr(metrics, "load_fashion_mnist", no_data)
    again = metrics.test_features(clf)
    assert torch.equal(again[0], feats) and torch.equal(again[1], logits)

    with torch.no_grad():
        clf.head[1].bias.add_(1.0)  # new weights: a new key, and the stale file is removed
    monkeypatch.setattr(metrics, "load_fashion_mnist", lambda split: (real_test[0][:40], real_test[1][:40]))
    metrics.test_features.cache_clear()  # the in-memory cache is per classifier object
    metrics.test_features(clf)
    assert [p.name for p in (tmp_path / "features").glob("*.safetensors")] != [cached.name]
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 1
    metrics.test_features.cache_clear()


def test_larger_images_are_resized_to_the_classifiers_32_px(shipped_classifier, real_test, real_test_features):
    x = to_model_images(real_test[0][:2000])
    x64 = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    feats, logits = metrics.features(shipped_classifier, x64)
    expected = metrics.features(shipped_classifier, torch.nn.functional.avg_pool2d(x64, 2))  # "area" at factor 2
    torch.testing.assert_close(feats, expected[0])
    torch.testing.assert_close(logits, expected[1])
    # docs/data.md's figures: the 32 -> 64 -> 32 round trip blurs; right answers 1,903 -> 1,861 of 2,000 (one
    # image of slack for a logit near a tie on another machine's arithmetic)
    _, original_logits, labels = real_test_features
    right = [int((lg.argmax(1) == labels).sum()) for lg in (original_logits, logits)]
    assert abs(right[0] - 1903) <= 1 and abs(right[1] - 1861) <= 1
