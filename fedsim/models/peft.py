"""Parameter-efficient fine-tuning of CLIP as a classifier over class-name prompts.

Every method is a `CLIPClassifier`: logits = exp(logit_scale) * cos(image feature, class text
feature), with images in [0, 1] (CLIP's normalisation happens inside). A method changes how the
image features and/or the class text features are computed, and owns the only parameters that
require gradients. Text features that no trainable parameter can reach are computed once.

The image side is split in two: `encode_image` (CLIP's image tower) and `image_head` (whatever
a method puts on top of its output, e.g. an adapter). `forward(features=...)` starts after the
tower, and `forward(text=True)` returns the class text features; both exist so that attacks can
differentiate through exactly the client's computation (via the Task) without the tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.clip import encode_text_embeddings, normalisation, text_tower
from fedsim.options import ConfigError

PROMPT_TEMPLATE = "a photo of a {}."


class CLIPClassifier(nn.Module):
    """Zero-shot CLIP over fixed prompts; subclasses add the trainable part."""

    text_is_trainable = False  # True when a trainable parameter changes the class text features

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str]):
        super().__init__()
        self.clip = clip
        self.class_names = list(class_names)
        mean, std = normalisation(clip)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        prompts = [PROMPT_TEMPLATE.format(name.replace("_", " ")) for name in self.class_names]
        self.register_buffer("prompt_tokens", tokenizer(prompts), persistent=False)
        self._frozen_text = None

    # -- the two halves -------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output (unnormalised) for images in [0, 1]."""
        size = self.clip.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if tuple(images.shape[-2:]) != size:  # e.g. 32 px data into a 224 px ViT-B-32
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.clip.encode_image((images - self.mean) / self.std)

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        """What the method applies to the tower's output before normalisation (identity here)."""
        return features

    def base_text_features(self) -> torch.Tensor:
        return self.clip.encode_text(self.prompt_tokens)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The unit-norm image embedding the logits use."""
        return F.normalize(self.image_head(self.encode_image(images)), dim=-1)

    def text_features(self) -> torch.Tensor:
        if self.text_is_trainable:
            return F.normalize(self.base_text_features(), dim=-1)
        if self._frozen_text is None or self._frozen_text.device != self.prompt_tokens.device:
            with torch.no_grad():
                self._frozen_text = F.normalize(self.base_text_features(), dim=-1)
        return self._frozen_text

    def forward(self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None,
                output: str = "logits") -> torch.Tensor:
        """Class logits of images, or of the image tower's outputs `features`. `output` =
        "embedding" stops at the unit-norm image embedding; "text" returns the unit-norm class
        text features (no images needed)."""
        if output == "text":
            return self.text_features()
        if features is None:
            features = self.encode_image(images)
        embeddings = F.normalize(self.image_head(features), dim=-1)
        if output == "embedding":
            return embeddings
        return self.logits_of(embeddings)

    def logits_of(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits_with(embeddings, self.text_features())

    def logits_with(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIP's logits for given unit-norm image embeddings and class text features."""
        return self.clip.logit_scale.exp() * embeddings @ text.T

    @property
    def feature_weight(self) -> str | None:
        """Name of the trainable weight that multiplies the image tower's output directly, if
        any (its gradient is a sum of outer products with the batch's features)."""
        return None

    @property
    def rank_one_weights(self) -> tuple[str, ...]:
        """Trainable weights that act on one example at a time, so that each example's gradient
        of them is an outer product (`feature_weight` first): the batch gradient has rank B."""
        return ()


def check_prompts_fit(tokenizer, prompts: list[str], n_ctx: int) -> None:
    """Refuse prompts longer than the text encoder's context: the tokenizer would silently cut
    the class name off (every class then gets the same prompt) or the model would fail."""
    limit = getattr(tokenizer, "context_length", None)
    if limit is None or not hasattr(tokenizer, "encode"):
        return
    lengths = [len(tokenizer.encode(p)) + 2 for p in prompts]  # + start and end of text
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    if lengths[longest] > limit:
        room = limit - (lengths[longest] - n_ctx)
        name = prompts[longest].split(" ", n_ctx)[-1].rstrip(".")
        raise ConfigError(f"--n-ctx {n_ctx} does not fit: the prompt of class {name!r} "
                          f"takes {lengths[longest]} tokens, the text encoder holds {limit}; valid: --n-ctx 1..{room}")


class CoOp(CLIPClassifier):
    """CoOp (Zhou, Yang, Loy, Liu, IJCV 2022, arXiv 2109.01134): the prompt of each class is
    "X ... X <class name>." with `n_ctx` learnable context vectors in place of the X tokens,
    shared by all classes or, with `class_specific`, one set per class."""

    text_is_trainable = True

    def __init__(self, clip, tokenizer, class_names, n_ctx: int = 4, class_specific: bool = False):
        super().__init__(clip, tokenizer, class_names)
        tower = text_tower(clip)
        width = tower.token_embedding.weight.shape[1]
        prompts = [" ".join(["X"] * n_ctx) + f" {name.replace('_', ' ')}." for name in self.class_names]
        check_prompts_fit(tokenizer, prompts, n_ctx)
        tokens = tokenizer(prompts)
        with torch.no_grad():
            embeds = tower.token_embedding(tokens)
        self.register_buffer("ctx_tokens", tokens, persistent=False)
        # Position 0 is the start-of-text token; the n_ctx placeholders follow it.
        self.register_buffer("prefix", embeds[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeds[:, 1 + n_ctx:].clone(), persistent=False)
        shape = (len(self.class_names), n_ctx, width) if class_specific else (n_ctx, width)
        self.prompt = nn.Module()
        self.prompt.ctx = nn.Parameter(torch.randn(shape) * 0.02)

    def base_text_features(self) -> torch.Tensor:
        ctx = self.prompt.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        embeds = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        return encode_text_embeddings(self.clip, embeds, self.ctx_tokens)


class Adapter(nn.Module):
    """CLIP-Adapter's bottleneck: x -> ReLU(ReLU(x W1) W2), blended residually with ratio alpha."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        self.fc1 = nn.Linear(dim, max(dim // reduction, 1), bias=False)
        self.fc2 = nn.Linear(max(dim // reduction, 1), dim, bias=False)
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ratio * F.relu(self.fc2(F.relu(self.fc1(x)))) + (1 - self.ratio) * x


class CLIPAdapter(CLIPClassifier):
    """CLIP-Adapter (Gao et al., IJCV 2024, arXiv 2110.04544): a residual bottleneck MLP on the
    image features (`image`), the class text features (`text`), or both (`double`).
    Departure: the text adapter's place follows the paper's variants; the blend ratio and the
    reduction are options rather than tuned per dataset."""

    def __init__(self, clip, tokenizer, class_names, where: str = "image", reduction: int = 4,
                 ratio: float = 0.2):
        super().__init__(clip, tokenizer, class_names)
        dim = clip.text_projection.shape[-1] if isinstance(clip.text_projection, torch.Tensor) else \
            clip.visual.output_dim
        self.image_adapter = Adapter(dim, reduction, ratio) if where in ("image", "double") else None
        self.text_adapter = Adapter(dim, reduction, ratio) if where in ("text", "double") else None
        self.text_is_trainable = self.text_adapter is not None
        self._clip_text = None

    def image_head(self, features):
        return self.image_adapter(features) if self.image_adapter is not None else features

    def base_text_features(self):
        if self.text_adapter is None:
            return super().base_text_features()
        # No trainable parameter reaches CLIP's own text features: encode the prompts once.
        if self._clip_text is None or self._clip_text.device != self.prompt_tokens.device:
            with torch.no_grad():
                self._clip_text = super().base_text_features()
        return self.text_adapter(self._clip_text.to(self.text_adapter.fc1.weight.dtype))

    @property
    def feature_weight(self):
        return "image_adapter.fc1.weight" if self.image_adapter is not None else None

    @property
    def rank_one_weights(self):
        return ("image_adapter.fc1.weight", "image_adapter.fc2.weight") if self.image_adapter is not None else ()


class VisualPrompt(CLIPClassifier):
    """VPT-shallow (Jia et al., ECCV 2022, arXiv 2203.12119): `n_tokens` learnable tokens are
    inserted after the class token at the input of the image transformer. Implemented as a
    forward hook on the vision tower's pre-transformer norm, so open_clip's code is untouched."""

    def __init__(self, clip, tokenizer, class_names, n_tokens: int = 4):
        super().__init__(clip, tokenizer, class_names)
        visual = clip.visual
        if not hasattr(visual, "ln_pre"):
            raise ValueError("vpt needs a ViT image tower (open_clip VisionTransformer)")
        width = visual.class_embedding.shape[-1]
        self.visual_prompt = nn.Module()
        self.visual_prompt.tokens = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        visual.ln_pre.register_forward_hook(self._insert_prompts)

    def _insert_prompts(self, module, inputs, x):
        # Read the parameter through the module at call time so functional_call's tensors are used.
        prompts = self.visual_prompt.tokens.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)


class LinearProbe(CLIPClassifier):
    """A linear classifier on frozen, normalised CLIP image features (Radford et al. 2021,
    arXiv 2103.00020), initialised from the zero-shot class text features."""

    def __init__(self, clip, tokenizer, class_names):
        super().__init__(clip, tokenizer, class_names)
        with torch.no_grad():
            zero_shot = self.text_features() * clip.logit_scale.exp()
        self.head = nn.Linear(zero_shot.shape[1], zero_shot.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(zero_shot)
            self.head.bias.zero_()

    def logits_of(self, embeddings):
        return self.head(embeddings)

    @property
    def feature_weight(self):
        return "head.weight"

    @property
    def rank_one_weights(self):
        return ("head.weight",)


class FullFineTune(CLIPClassifier):
    """Every CLIP parameter trains; the class prompts are fixed."""

    text_is_trainable = True

    def __init__(self, clip, tokenizer, class_names):
        super().__init__(clip, tokenizer, class_names)
        self.clip.requires_grad_(True)


LORA_TOWERS = ("image", "text", "both")
LORA_TARGETS = ("attn", "c_fc", "c_proj")  # open_clip block parts; out_proj alone does nothing


class LoRA(CLIPClassifier):
    """LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) through the peft library on open_clip's
    transformer blocks: `attn` (the whole nn.MultiheadAttention, which peft supports as one
    module), `c_fc` and `c_proj` (the MLP). A bare `out_proj` target is refused: MHA reads its
    weight directly, so LoRA there would silently do nothing."""

    def __init__(self, clip, tokenizer, class_names, rank: int = 4, alpha: float = 8.0,
                 tower: str = "image", targets: tuple[str, ...] = ("attn",)):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(clip, tokenizer, class_names)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or tower not in LORA_TOWERS:
            raise ValueError(f"LoRA targets {list(targets)} / tower {tower!r} not valid; valid targets: "
                             f"{', '.join(LORA_TARGETS)}; towers: {', '.join(LORA_TOWERS)}")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
        parts = {"image": [clip.visual], "text": [text_tower(clip).transformer],
                 "both": [clip.visual, text_tower(clip).transformer]}[tower]
        for part in parts:
            inject_adapter_in_model(config, part)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)
        self.text_is_trainable = tower in ("text", "both")
        # peft merges LoRA into nn.MultiheadAttention's weights in place during forward, which
        # torch.func.vmap refuses; per-example gradients then loop over the batch instead.
        self.supports_vmap = "attn" not in targets
