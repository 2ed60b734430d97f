"""How much leaked: a reconstruction against the client's true batch.

The attacker does not know the order of the batch, so reconstructions are first matched to
true images by a Hungarian assignment on pixel MSE; every image metric is computed after it.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # the file torchvision's pretrained AlexNet loads


def match(recon: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """order[i] = index of the reconstruction assigned to true image i (min total MSE)."""
    cost = ((recon.unsqueeze(0) - true.unsqueeze(1)) ** 2).flatten(2).mean(-1)
    rows, cols = linear_sum_assignment(cost.double().numpy())
    return cols[np.argsort(rows)]


def label_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset overlap: the share of true labels that the prediction covers, counts included."""
    p, t = Counter(pred.tolist()), Counter(true.tolist())
    return sum(min(p[c], n) for c, n in t.items()) / max(len(true), 1)


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """scikit-image's SSIM of two [C, H, W] images in [0, 1]."""
    a_np, b_np = (x.permute(1, 2, 0).double().numpy() for x in (a, b))
    win = min(7, *a_np.shape[:2]) | 1  # odd, no larger than the image
    return float(structural_similarity(a_np, b_np, channel_axis=2, data_range=1.0, win_size=win))


class LPIPS:
    """LPIPS (Zhang et al. 2018) with its AlexNet backbone, when the weights are on disk.

    The backbone's ImageNet weights cannot be downloaded here; when torchvision's cache has no
    copy, `available` is False, `reason` says where the file was looked for, and scores are NaN.
    """

    def __init__(self):
        self.path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
        self.available = self.path.is_file()
        self.reason = "" if self.available else (
            f"LPIPS reported as NaN: AlexNet weights not found at {self.path} "
            f"(copy {ALEXNET_WEIGHTS} there to enable it)")
        self._net = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean LPIPS between two batches [B, C, H, W] in [0, 1]."""
        if not self.available:
            return math.nan
        if self._net is None:
            import lpips

            self._net = lpips.LPIPS(net="alex", verbose=False).eval()
        with torch.no_grad():
            return float(self._net(a * 2 - 1, b * 2 - 1).mean())


@lru_cache(maxsize=1)
def lpips_metric() -> LPIPS:
    return LPIPS()


@lru_cache(maxsize=1)
def _feature_encoder():
    """fedsim's pre-trained tiny CLIP image encoder: a fixed feature space for every dataset."""
    from fedsim.models.clip import TINY_CLIP, create_clip, normalisation
    from fedsim.models.pretrain import ensure_pretrained

    clip, _ = create_clip(TINY_CLIP, str(ensure_pretrained()))
    return clip, *normalisation(clip)


@torch.no_grad()
def image_features(images: torch.Tensor) -> torch.Tensor:
    """Unit-norm tiny-CLIP features of images in [0, 1] (any size; resized to 32 px)."""
    clip, mean, std = _feature_encoder()
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return torch.nn.functional.normalize(clip.encode_image((x - mean) / std), dim=-1)


def identifiability(matched: torch.Tensor, true: torch.Tensor, gallery: torch.Tensor) -> dict[str, float]:
    """Share of reconstructions whose nearest image, among the true one and a gallery of
    public images, is the true one: by pixel MSE and by tiny-CLIP feature cosine."""
    candidates = torch.cat([true.unsqueeze(1), gallery.unsqueeze(0).expand(len(true), -1, -1, -1, -1)], 1)
    pixel = ((candidates - matched.unsqueeze(1)) ** 2).flatten(2).mean(-1)  # [B, 1 + G]
    f_recon = image_features(matched)
    f_true, f_gallery = image_features(true), image_features(gallery)
    cos = torch.cat([(f_recon * f_true).sum(-1, keepdim=True), f_recon @ f_gallery.T], 1)
    return {"ident_pixel": float((pixel.argmin(1) == 0).float().mean()),
            "ident_feature": float((cos.argmax(1) == 0).float().mean())}


def evaluate(recon_images: torch.Tensor, recon_labels: torch.Tensor,
             true_images: torch.Tensor, true_labels: torch.Tensor,
             gallery: torch.Tensor | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one reconstruction, and the matching (true image i <-> recon order[i]).
    With a gallery of public images, also how often the reconstruction identifies its image."""
    recon_images = recon_images.detach().float().cpu().clamp(0, 1)
    true_images = true_images.detach().float().cpu()
    if recon_images.shape != true_images.shape:
        raise ValueError(f"reconstruction shape {tuple(recon_images.shape)} differs from the batch's "
                         f"{tuple(true_images.shape)}")
    order = match(recon_images, true_images)
    matched = recon_images[order]
    mses = ((matched - true_images) ** 2).flatten(1).mean(1)
    metrics = {
        "label_acc": label_accuracy(recon_labels.cpu(), true_labels.cpu()),
        "mse": float(mses.mean()),
        "psnr": float(np.mean([psnr(float(m)) for m in mses])),
        "ssim": float(np.mean([ssim(m, t) for m, t in zip(matched, true_images)])),
        "lpips": lpips_metric()(matched, true_images),
    }
    if gallery is not None:
        metrics.update(identifiability(matched, true_images, gallery.float().cpu()))
    return metrics, order


@torch.no_grad()
def mean_embedding(task, params, images: torch.Tensor) -> torch.Tensor:
    """The mean image embedding [D] of `images` (e.g. the public gallery) under `params`."""
    return task.embeddings(params, images.to(task.device)).float().cpu().mean(0)


@torch.no_grad()
def embedding_similarity(task, params, recovered: torch.Tensor, true_images: torch.Tensor,
                         centre: torch.Tensor) -> dict[str, float]:
    """Mean cosine between recovered image embeddings [B, D] (already in the true images'
    order) and the true images' embeddings under the same model and parameters; also centred
    on `centre`, the public images' mean embedding (`mean_embedding`), which removes what all
    images share (raw CLIP embeddings of unrelated images are far from orthogonal)."""
    true = task.embeddings(params, true_images.to(task.device)).float().cpu()
    recovered = recovered.float().cpu()
    def cos(a, b, dim):  # clamped: float rounding can put the cosine of equal vectors just above 1
        return torch.nn.functional.cosine_similarity(a, b, dim=dim).clamp(-1, 1)

    return {"emb_cos": float(cos(recovered, true, dim=-1).mean()),
            "emb_cos_centred": float(cos(recovered - centre, true - centre, dim=-1).mean())}
