"""How good is an autoencoder? Reconstruction metrics on the Fashion-MNIST test set.

- PSNR = -10 log10(MSE) in dB, on pixels in [0, 1].
- Classifier accuracy on reconstructions next to its accuracy on the originals: does the latent
  keep what makes a shirt a shirt?
- FID of reconstructions vs the test set in the classifier's feature space, next to the reals
  baseline at the same n (`metrics.py`).
"""

from __future__ import annotations

import torch

from ..data.fashion_mnist import load_fashion_mnist, to_model_images
from ..models.classifier import load_classifier
from .metrics import accuracy_from_logits, features, fid_from_features, reals_baseline, test_features


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1], measured on pixels in [0, 1]."""
    mse = ((x - x_hat.clamp(-1, 1)) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse))


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Decode the posterior mean: the reconstruction a latent diffusion model can reach."""
    vae.eval()
    device = next(vae.parameters()).device
    return torch.cat([vae.decode(vae.encode(c.to(device)).mode()).clamp(-1, 1).cpu()
                      for c in images.split(batch_size)])


def evaluate_vae(vae, n: int | None = None, classifier=None) -> dict:
    """PSNR, classifier accuracy on originals and reconstructions, and FID, on the first n test
    images (all 10,000 by default)."""
    classifier = classifier or load_classifier()
    images, labels = load_fashion_mnist("test")
    x = to_model_images(images[:n])
    x_hat = reconstruct(vae, x)
    feats, logits = features(classifier, x_hat)
    return {
        "n": len(x),
        "psnr_db": psnr(x, x_hat),
        "accuracy_originals": accuracy_from_logits(test_features(classifier)[1][:n], labels[:n]),
        "accuracy_reconstructions": accuracy_from_logits(logits, labels[:n]),
        "fid_reconstructions": fid_from_features(classifier, feats),
        "fid_reals_baseline": reals_baseline(classifier, len(x)),
    }
