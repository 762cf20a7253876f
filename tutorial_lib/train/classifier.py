"""Train the Fashion-MNIST yardstick classifier: `python -m tutorial_lib train-classifier`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.fashion_mnist import load_fashion_mnist, to_model_images
from ..models.classifier import ClassifierConfig, FashionClassifier
from .common import epoch_batches, seed_everything, warmup_cosine


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips, on [B, 1, 32, 32] in [-1, 1]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()  # one shift per batch: cheap
    x = padded[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(chunk).argmax(1) for chunk in images.split(1000)])
    return (preds == labels).float().mean().item()


def train_classifier(epochs: int = 12, batch_size: int = 256, lr: float = 3e-3, seed: int = 0,
                     device: str = "cpu", config: ClassifierConfig | None = None):
    """Returns (model, test accuracy). AdamW, warm-up + cosine, label smoothing 0.1."""
    gen = seed_everything(seed)
    train_x, train_y = (torch.as_tensor(a) for a in load_fashion_mnist("train"))
    test_x, test_y = (torch.as_tensor(a) for a in load_fashion_mnist("test"))
    train_x, test_x = to_model_images(train_x).to(device), to_model_images(test_x).to(device)
    train_y, test_y = train_y.to(device), test_y.to(device)

    model = FashionClassifier(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    total = epochs * (len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, total // 20))
    bar = tqdm(total=total, desc="classifier")
    for epoch in range(epochs):
        model.train()
        for idx in epoch_batches(len(train_x), batch_size, gen):
            x = augment(train_x[idx.to(device)], gen)
            loss = F.cross_entropy(model(x), train_y[idx.to(device)], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.write(f"epoch {epoch + 1}: test accuracy {accuracy(model, test_x, test_y):.4f}")
    bar.close()
    acc = accuracy(model, test_x, test_y)
    return model.cpu().eval(), acc
