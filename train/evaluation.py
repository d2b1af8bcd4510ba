"""Test accuracy of a classifier on a long-tailed run's balanced test set.

Mean per-class accuracy (every class weighs the same, as the long-tail papers report it) and the
same over the many / medium / few splits and the head / tail groups, optionally with the seed
code's horizontal-flip test-time augmentation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from train.data import LongTailData, accuracy_splits, normalize
from train.stream import StreamData, StreamLoader, stream_batches

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, data: LongTailData | StreamData, groups: dict[str, list[int]],
             tta: bool = False, batch_size: int = 1000, loader: Optional[StreamLoader] = None
             ) -> dict[str, float]:
    """Test accuracy in %: overall (mean per class), many / medium / few, head / tail.

    With ``tta`` the logits of each image and of its mirror image are averaged (the seed code's
    test-time augmentation). The model is put in eval mode and returned to its previous mode.
    Streamed ``data`` is read through ``loader``, its test loader (``Trainer.test_loader``).
    """
    was_training = model.training
    model.eval()
    if loader is None:
        device, n = data.test_y.device, data.test_y.shape[0]
        batches = ((normalize(data.test_x[s:s + batch_size], data.spec),
                    data.test_y[s:s + batch_size]) for s in range(0, n, batch_size))
    else:
        device, batches = loader.device, stream_batches(loader, data.spec, epoch=0)
    num_classes = data.spec.num_classes
    correct = torch.zeros(num_classes, device=device)
    total = torch.zeros(num_classes, device=device)
    for x, y in batches:
        logits = model(x)
        if tta:
            logits = (logits + model(x.flip(3))) / 2
        hit = (logits.argmax(1) == y).float()
        correct.index_add_(0, y, hit)
        total.index_add_(0, y, torch.ones_like(hit))
    model.train(was_training)
    per_class = (100.0 * correct / total.clamp_min(1)).cpu()
    result = {"acc": float(per_class.mean())}
    named = {**accuracy_splits(data.counts, data.spec), **groups}
    for name, classes in named.items():
        result[f"acc_{name}"] = float(per_class[classes].mean()) if classes else float("nan")
    return result
