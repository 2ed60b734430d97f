"""CLIP through open_clip.

The tiny config shipped in `configs/` is registered with open_clip under the name
``fedsim-tiny-clip`` so that it is built exactly like any other open_clip model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from torch import nn

TINY_CLIP = "fedsim-tiny-clip"
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)


def normalisation(clip: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's per-channel image mean and std, shaped [1, 3, 1, 1]."""
    mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def clip_model_names() -> list[str]:
    return open_clip.list_models()


def create_clip(name: str, pretrained: str | None = None) -> tuple[nn.Module, object]:
    """An open_clip model and its tokenizer, frozen and in eval mode. `pretrained` is None
    (random init), an open_clip pretrained tag (downloaded when online) or a local checkpoint
    file (open_clip loads it with weights_only=True, or as safetensors)."""
    # open_clip logs a warning for every model built without pretrained weights: here that is the intent.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        clip = open_clip.create_model(name, pretrained=pretrained)
    finally:
        root.setLevel(level)
    clip.eval().requires_grad_(False)
    return clip, open_clip.get_tokenizer(name)


def text_tower(clip: nn.Module) -> nn.Module:
    # open_clip's CLIP keeps the text transformer's parts on the model itself; CustomTextCLIP
    # keeps them in a TextTransformer under `.text`. Both expose the same attribute names.
    return getattr(clip, "text", clip)


def encode_text_embeddings(clip: nn.Module, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text, starting from token embeddings instead of token ids.

    CoOp replaces some token embeddings by learnable vectors, so the text encoder has to be
    entered after its embedding lookup. `tokens` still decides where the sequence is pooled.
    """
    tower = text_tower(clip)
    if getattr(tower, "cls_emb", None) is not None:
        raise NotImplementedError("CoOp on text towers with a CLS embedding (CoCa) is not supported")
    x = embeds + tower.positional_embedding.to(embeds.dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    x = open_clip.transformer.text_global_pool(x, tokens, pool_type,
                                               eos_token_id=getattr(tower, "text_eos_id", None))
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x
