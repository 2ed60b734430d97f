"""CLIP through open_clip, and CoOp soft prompts on top of it.

The tiny config shipped in `configs/` is registered with open_clip under the name
``fedsim-tiny-clip`` so that it is built exactly like any other open_clip model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

TINY_CLIP = "fedsim-tiny-clip"
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)


def create_clip(name: str) -> tuple[nn.Module, object]:
    """A random-init open_clip model and its tokenizer, frozen and in eval mode."""
    # open_clip logs a warning for every model built without pretrained weights: here that is the intent.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        clip = open_clip.create_model(name, pretrained=None)
    finally:
        root.setLevel(level)
    clip.eval().requires_grad_(False)
    return clip, open_clip.get_tokenizer(name)


def _text_tower(clip: nn.Module) -> nn.Module:
    # open_clip's CLIP keeps the text transformer's parts on the model itself; CustomTextCLIP
    # keeps them in a TextTransformer under `.text`. Both expose the same attribute names.
    return getattr(clip, "text", clip)


def encode_text_embeddings(clip: nn.Module, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text, starting from token embeddings instead of token ids.

    CoOp replaces some token embeddings by learnable vectors, so the text encoder has to be
    entered after its embedding lookup. `tokens` still decides where the sequence is pooled.
    """
    tower = _text_tower(clip)
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


class CoOpCLIP(nn.Module):
    """CoOp (Zhou, Yang, Loy, Liu 2022, arXiv 2109.01134): a frozen CLIP whose class prompts
    "X X X X <class name>." start with `n_ctx` learnable context vectors shared by all classes.

    The context vectors (`prompt.ctx`) are the only trainable parameters. Input images are in
    [0, 1]; CLIP's normalisation happens inside, so attacks work in pixel space.
    """

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], n_ctx: int = 4):
        super().__init__()
        self.clip = clip
        tower = _text_tower(clip)
        width = tower.token_embedding.weight.shape[1]
        prompts = [" ".join(["X"] * n_ctx) + f" {name.replace('_', ' ')}." for name in class_names]
        tokens = tokenizer(prompts)
        with torch.no_grad():
            embeds = tower.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        # Position 0 is the start-of-text token; the n_ctx placeholders follow it.
        self.register_buffer("prefix", embeds[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeds[:, 1 + n_ctx:].clone(), persistent=False)
        self.prompt = nn.Module()
        self.prompt.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def text_features(self) -> torch.Tensor:
        n_cls = self.tokens.shape[0]
        ctx = self.prompt.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        embeds = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        return F.normalize(encode_text_embeddings(self.clip, embeds, self.tokens), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image((images - self.mean) / self.std, normalize=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.image_features(images) @ self.text_features().T
        return self.clip.logit_scale.exp() * logits
