"""Metrics for generated images, measured with the shipped Fashion-MNIST classifier.

- Class accuracy: the fraction of samples for a prompt that the classifier assigns to its class.
- FID (Heusel et al., 2017) in the classifier's feature space:
      FID = |mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g^1/2 S_r S_g^1/2)^1/2)
  between generated features (mu_g, S_g) and the test set's (mu_r, S_r).
- The reals baseline: the same FID for n real training images, the floor a perfect generator
  reaches with n samples (FID is biased upwards for small n, so always compare at equal n).
- Attribute accuracy: the fraction of samples whose attribute (brightness, size, texture) has the
  value the prompt asked for, measured by `data.attributes.label_attributes`, the function that
  labelled the training captions. The shipped VAE's round trip alone keeps 98.7% / 97.7% / 94.4%
  of real images' labels (91.0% all three): the ceiling for a latent model.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.attributes import ATTRIBUTES, is_held_out, label_attributes
from ..data.captions import ATTRIBUTE_PROMPT_SETS, attribute_prompt_set, prompt_set
from ..data.fashion_mnist import CLASSES, IMAGE_SIZE, load_fashion_mnist, to_model_images
from ..models.classifier import FashionClassifier, load_classifier
from ..paths import data_root
from ..weights import atomic_write, weights_hash


@torch.no_grad()
def features(classifier: FashionClassifier, images: torch.Tensor, batch_size: int = 500):
    """Penultimate features [N, D] (float64) and logits [N, classes] of images in [-1, 1].

    The classifier reads 32 x 32 images; larger ones (decoded from the 64-px latents of
    `latent_cache(image_size=64)`) are first averaged down to 32 ("area"). On 2,000 real test images
    upsampled to 64 px and back this way, the classifier gets 1,861 right against 1,903 of the
    originals (the bilinear upsampling blurs): FID at 64 px is comparable between models at that size,
    not with FID at 32 px."""
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device, torch.float32)
        if chunk.shape[-1] > IMAGE_SIZE:
            chunk = torch.nn.functional.interpolate(chunk, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        f = classifier.features(chunk)
        feats.append(f.double().cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def class_accuracy(classifier: FashionClassifier, images: torch.Tensor, labels) -> float:
    """Fraction of images the classifier puts in the class they were generated for."""
    return accuracy_from_logits(features(classifier, images)[1], labels)


def per_class_accuracy(classifier: FashionClassifier, images: torch.Tensor, labels,
                       num_classes: int = 10) -> torch.Tensor:
    """[num_classes]: for each class, the fraction of its images the classifier puts in it (NaN if none)."""
    return per_class_from_logits(features(classifier, images)[1], labels, num_classes)


def per_class_from_logits(logits: torch.Tensor, labels, num_classes: int = 10) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    right = (logits.argmax(1) == labels).double()
    return torch.stack([right[labels == k].mean() if (labels == k).any() else torch.tensor(float("nan"))
                        for k in range(num_classes)])


def accuracy_from_logits(logits: torch.Tensor, labels) -> float:
    return (logits.argmax(1) == torch.as_tensor(labels)).double().mean().item()


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    Tr((S1^1/2 S2 S1^1/2)^1/2) is computed from the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2, which equal those of S1 S2 (so the trace is the usual Tr((S1 S2)^1/2)).
    """
    def sqrtm_psd(m):
        vals, vecs = torch.linalg.eigh(m)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T

    s1 = sqrtm_psd(cov1.double())
    inner = torch.linalg.eigvalsh(s1 @ cov2.double() @ s1).clamp(min=0).sqrt().sum()
    diff = (mu1 - mu2).double()
    return float(diff @ diff + cov1.trace() + cov2.trace() - 2 * inner)


@lru_cache(maxsize=2)
def test_features(classifier: FashionClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of the 10,000 test images: the FID reference and the originals'
    accuracy. Computed once per classifier (about a minute on a CPU) and cached in memory and under
    `data/features/classifier-<hash>.safetensors`, keyed like the latent cache by the weights."""
    path = data_root() / "features" / f"classifier-{weights_hash(classifier)}.safetensors"
    if path.is_file():
        cached = load_file(path)
        return cached["features"], cached["logits"]
    images, _ = load_fashion_mnist("test")
    feats, logits = features(classifier, to_model_images(images))
    for stale in path.parent.glob("classifier-*.safetensors"):
        stale.unlink()
    atomic_write(path, lambda tmp: save_file({"features": feats, "logits": logits.contiguous()}, tmp))
    return feats, logits


@lru_cache(maxsize=2)
def _test_stats(classifier: FashionClassifier):
    return gaussian_stats(test_features(classifier)[0])


def fid_from_features(classifier: FashionClassifier, feats: torch.Tensor) -> float:
    """FID between images with these features [N, D] and the test set."""
    if len(feats) < 2:
        raise ValueError("FID needs at least 2 images.")
    return frechet_distance(*gaussian_stats(feats), *_test_stats(classifier))


def fid(classifier: FashionClassifier, images: torch.Tensor) -> float:
    """FID in the classifier's feature space between `images` ([-1, 1]) and the test set."""
    return fid_from_features(classifier, features(classifier, images)[0])


@lru_cache(maxsize=8)
def _train_features(classifier: FashionClassifier, n: int, seed: int) -> torch.Tensor:
    images, _ = load_fashion_mnist("train")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return features(classifier, to_model_images(images[idx.numpy()]))[0]


def reals_baseline(classifier: FashionClassifier, n: int, seed: int = 0) -> float:
    """FID of n random real training images against the test set (the best an n-sample run gets)."""
    return fid_from_features(classifier, _train_features(classifier, n, seed))


def evaluate_images(images: torch.Tensor, labels, classifier: FashionClassifier | None = None,
                    seed: int = 0) -> dict:
    """Class accuracy (overall, and per class: class name -> accuracy for the classes present), FID vs
    the test set and the reals baseline at the same n, in one dict."""
    classifier = classifier or load_classifier()
    feats, logits = features(classifier, images)
    per_class = per_class_from_logits(logits, labels, len(CLASSES)).tolist()
    return {
        "n": len(images),
        "class_accuracy": accuracy_from_logits(logits, labels),
        "per_class_accuracy": {name: a for name, a in zip(CLASSES, per_class) if not math.isnan(a)},
        "fid": fid_from_features(classifier, feats),
        "fid_reals_baseline": reals_baseline(classifier, len(images), seed),
    }


def attribute_accuracy(images, labels, targets: dict) -> dict[str, float]:
    """name -> fraction of images whose attribute has its target value (targets[name]: [N] of 0/1),
    and "all": the fraction with every targeted attribute right. `labels` are the classes the images
    were made for (size is judged against its class); `images` as `label_attributes` takes them."""
    unknown = set(targets) - set(ATTRIBUTES)
    if unknown or not targets:
        raise ValueError(f"targets name attributes among {', '.join(ATTRIBUTES)}; got {sorted(targets)}.")
    measured = label_attributes(images, labels)
    right = {}
    for name, target in targets.items():
        target = np.asarray(target)
        if target.shape != measured[name].shape:
            raise ValueError(f"targets[{name!r}] has shape {target.shape}; expected one per image, "
                             f"{measured[name].shape}.")
        right[name] = measured[name] == target
    return {name: float(r.mean()) for name, r in right.items()} | {
        "all": float(np.logical_and.reduce(list(right.values())).mean())}


def held_out_rate(images, labels) -> float:
    """Fraction of images that show a held-out combination of their class (`is_held_out`): for
    prompts that ask for one, the accuracy on the attribute that training never showed."""
    measured = label_attributes(images, labels)
    return float(np.mean([is_held_out(int(y), {n: int(v[i]) for n, v in measured.items()})
                          for i, y in enumerate(labels)]))


@torch.no_grad()
def evaluate_pipeline(pipe, prompts: str = "class", per_prompt: int = 100, num_inference_steps: int = 25,
                      guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 250,
                      classifier: FashionClassifier | None = None, **sampling) -> tuple[dict, torch.Tensor]:
    """Sample `per_prompt` images for every prompt of a prompt set (`captions.PROMPT_SETS`) and
    measure them; returns the metrics and the images (seeded: the same call gives the same dict).
    The attribute sets add `attribute_accuracy` (name -> accuracy) and `all_attributes_accuracy`,
    and 'attributes_held_out' `held_out_rate`, the accuracy on the held-out attribute itself.
    `sampling` (e.g. sampler="edm_heun", S_churn=10, eta, guide=another pipeline) goes to `pipe.generate`
    and into the dict (a guide as its denoiser's class and size)."""
    texts, labels, targets = (attribute_prompt_set(prompts) if prompts in ATTRIBUTE_PROMPT_SETS
                              else (*prompt_set(prompts), {}))
    all_prompts = [p for p in texts for _ in range(per_prompt)]
    all_labels = [y for y in labels for _ in range(per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([pipe.generate(all_prompts[i:i + batch_size], generator=gen,
                                      num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, **sampling)
                        for i in range(0, len(all_prompts), batch_size)])
    result = evaluate_images(images, all_labels, classifier, seed)
    if targets:
        per_image = {n: np.repeat(t, per_prompt) for n, t in targets.items()}  # in the order of all_prompts
        accuracy = attribute_accuracy(images, all_labels, per_image)
        result.update(attribute_accuracy={n: accuracy[n] for n in targets}, all_attributes_accuracy=accuracy["all"])
    if prompts == "attributes_held_out":
        result["held_out_rate"] = held_out_rate(images, all_labels)
    result.update(prompts=prompts, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                  **sampling)
    if sampling.get("guide") is not None:  # autoguidance's guide pipeline, recorded as what it is
        guide = sampling["guide"].transformer
        result["guide"] = f"{type(guide).__name__}, {sum(p.numel() for p in guide.parameters()):,} parameters"
    return result, images
