"""MIP: CLIP-based image reconstruction from PEFT gradients (Zhou et al. 2024, "MIP: CLIP-based
Image Reconstruction from PEFT Gradients", arXiv 2403.07901; the method is called
Multm-In-Parvo).

No code of the paper is public; what it describes, and how each part is realised here:
1. Label prediction from the PEFT gradient, which simplifies the rest of the objective
   (`attacks.embeddings`): for text-side PEFT the label comes with the best-fitting embedding;
   for an image head it is read off the head's gradient.
2. Inverse gradient estimation, which avoids back-propagating through the text encoder
   (`attacks.embeddings`): the gradient w.r.t. the class text features is linked to the PEFT
   gradient by the text side's Jacobian, computed once per round (the same for every client),
   so the image embeddings are fitted with no text encoder in the loop; for CLIP-Adapter (and a
   linear probe) the first layer's weight gradient gives the tower's output in closed form.
3. Image-encoder inversion from the recovered embedding with a strategy chosen by the tower's
   size (`attacks.encoder_inversion`).
4. Image priors: TV, and learned decoders the attacker trains on its public split
   (`attacks.decoders`), whose output is the starting point of step 3 (or the answer, with
   zero refinement iterations).

Departures, all ours where the paper is silent: the embedding fit and the label-set search
(public embeddings as starting points, Levenberg-Marquardt on the exact model for every
candidate label set, successive halving at batch B: `attacks.label_search`), the decoders'
architecture, the tower-size rule. Visual-side PEFT (VPT, LoRA on the image tower, full fine-tuning) changes the
tower itself, so steps 1-2 do not apply: those updates are attacked by gradient matching
through the image tower, under a learned prior over blends of public images whose labels and
weights fit the update (`attacks.tower_side`; the prior column says "public-blend"), under
`--mip-prior tv` over pixels (the Inverting Gradients objective, `attacks.ig`) with joint soft
labels, which on the tiny CLIP does not recover the images. Batches larger than one run on
every route: on the text side every label multiset is fitted while there are at most 64, beyond
that the label-count step's shortlist (`attacks.label_counts`), and the best fit wins; on the
image head the batch is separated example by example (`attacks.separation`), repeated labels
included (README, MIP). A FedAvg delta of several local steps on one batch keeps the image head's
structure (the frozen tower's output is the same at every step, so the pseudo-gradient's first
layer still has the batch's rank); on the text side the steps move the prompts, so the
embeddings are refitted by replaying the steps (`attacks.local_steps`).

Besides the images and labels, a Reconstruction's extras hold the recovered image embeddings
(`embeddings`, for scoring), the tower-output directions of step 2 (`features`, unit norm) and
the information budget: `update_numbers` (numbers in the update) against `unknowns` (batch
size x embedding width).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from attacks.decoders import LEARNED_PRIORS, fingerprint, learned_prior
from attacks.embeddings import TextJacobian, head_side, text_side
from attacks.encoder_inversion import invert_tower
from attacks.local_steps import replay_fit, replays
from attacks.tower_side import tower_side
from fedsim.api import Attack, AttackerKnowledge, ConfigError, Observation, Option, Reconstruction, Task, observed

PRIORS = (*LEARNED_PRIORS, "tv")


def route_of(task: Task, names: list[str]) -> str:
    """Which of MIP's routes an update takes (see the module docstring)."""
    model = task.model
    if model.feature_weight in names:
        return "head"
    visual = {n for n, p in model.named_parameters() if n.startswith("clip.visual") or "visual_prompt" in n}
    if model.text_is_trainable and not visual.intersection(names):
        return "text"
    return "tower"


class MIP(Attack):
    name = "mip"
    options = (*Attack.options,
               Option("prior", "ridge", "image prior: ridge (kernel ridge) or conv (decoders learned on the public "
                      "split, cached) or tv (total variation from the public mean image)", choices=PRIORS))

    def __init__(self, iterations: int = 100, restarts: int = 1, seed: int = 0, progress=None,
                 prior: str = "ridge", public_images: torch.Tensor | None = None, tv: float = 1e-2,
                 lr: float = 0.05, anchor: float = 1.0, public_labels: torch.Tensor | None = None):
        super().__init__(iterations, restarts, seed, progress)
        if prior not in PRIORS:
            raise ConfigError(f"--mip-prior {prior!r} is not valid; valid: {', '.join(PRIORS)}")
        self.prior, self.public_images, self.tv, self.lr, self.anchor = prior, public_images, tv, lr, anchor
        self.public_labels = public_labels
        self._decoder = None
        self._round: dict | None = None
        self._features: torch.Tensor | None = None  # the public images' tower outputs (head route)

    @classmethod
    def from_knowledge(cls, knowledge: AttackerKnowledge, options=None, progress=None) -> "MIP":
        """MIP's priors learn from the server's public split, and its label search starts from it."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        return cls(seed=knowledge.attack_seed, progress=progress, public_images=knowledge.public.images,
                   public_labels=knowledge.public.labels, **options)

    # -- parts -----------------------------------------------------------------------------
    def encode(self, task: Task):
        """Images -> unit-norm image-tower outputs (the space decoders and targets live in)."""
        return lambda images: F.normalize(task.model.encode_image(images.to(task.device)), dim=-1)

    def decoder(self, task: Task):
        if self._decoder is None:
            model = task.model
            with torch.no_grad():
                dim = model.encode_image(self.public_images[:1].to(task.device)).shape[-1]
            self._decoder = learned_prior(self.prior, model.clip.visual, self.encode(task),
                                          self.public_images.to(task.device), dim).to(task.device)
        return self._decoder

    def round_state(self, task: Task, params, names) -> dict:
        """The text side's Jacobian and the public images' embeddings at these global
        parameters: the same for every client of a round, so computed once per round."""
        key = fingerprint(*[params[n] for n in names])
        if self._round is None or self._round["key"] != key:
            with torch.no_grad():
                public = torch.cat([task.embeddings(params, x.to(task.device))
                                    for x in self.public_images.split(256)]).cpu()
            self._round = {"key": key, "public": public, "jacobian": TextJacobian(task, params, names)}
        return self._round

    def public_features(self, task: Task) -> torch.Tensor:
        """The public images' image-tower outputs [N, D] (the tower is frozen on the head route:
        computed once), the starts of the batch separation."""
        if self._features is None:
            with torch.no_grad():
                self._features = torch.cat([task.model.encode_image(x.to(task.device))
                                            for x in self.public_images.split(256)]).cpu()
        return self._features

    def recover_embeddings(self, observation: Observation, task: Task):
        """(labels [B], tower-output directions [B, D], diagnostics), or None on the tower route
        (where there is no embedding to recover: see `reconstruct`)."""
        update, params = observed(observation, task)
        route = route_of(task, list(update))
        B = observation.batch_size
        if route == "head":
            gen = torch.Generator().manual_seed(self.seed)
            labels, features, info = head_side(task, params, update, B, task.model.feature_weight, generator=gen,
                                               public_features=self.public_features(task) if B > 1 else None)
        elif route == "text":
            state = self.round_state(task, params, list(update))
            labels, features, info = text_side(task, params, update, B, state["public"], jacobian=state["jacobian"],
                                               public_labels=self.public_labels, progress=self.progress,
                                               memo=state)
            if replays(observation.kind, observation.local_steps, B):
                features, more = replay_fit(task, params, {n: d.to(task.device) for n, d in observation.update.items()},
                                            labels, features, observation.lr, observation.local_steps,
                                            state["public"], self.public_labels, progress=self.progress)
                info.update(more)
        else:
            return None
        # the information budget: numbers the update carries against the embeddings' unknowns
        budget = {"update_numbers": sum(u.numel() for u in update.values()), "unknowns": B * features.shape[1]}
        return labels, features.to(task.device), {"route": route, **budget, **info}

    def images_from(self, task: Task, features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Step 3 under the prior: decoder output (or the public mean image), then refinement."""
        targets = F.normalize(features.float(), dim=-1)
        if self.prior == "tv":
            start = self.public_images.mean(0, keepdim=True).expand(len(targets), -1, -1, -1).to(task.device)
        else:
            decoder = self.decoder(task)  # trained on first use, outside no_grad
            with torch.no_grad():
                start = decoder(targets)
        if self.iterations == 0:
            return start, {}
        gen = torch.Generator().manual_seed(self.seed)
        images, cos = invert_tower(task.model, targets, start, self.iterations, lr=self.lr, tv=self.tv,
                                   anchor=self.anchor, restarts=self.restarts, generator=gen, progress=self.progress)
        return images, {"tower_cos": cos.tolist()}

    # -- the attack ------------------------------------------------------------------------
    def reconstruct(self, observation: Observation, task: Task) -> Reconstruction:
        start = time.perf_counter()
        if not hasattr(task.model, "encode_image"):  # fedsim.models.peft.CLIPClassifier
            raise ConfigError("--attack mip needs a CLIP model with a PEFT method; for --model lenet, "
                              "convnet or resnet18 use dlg, idlg, ig or gradinversion")
        if self.public_images is None:
            raise ValueError("MIP needs the public split's images (public_images=...)")
        recovered = self.recover_embeddings(observation, task)
        if recovered is None:
            return self.tower_route(observation, task, start)
        labels, features, info = recovered
        _, params = observed(observation, task)
        images, more = self.images_from(task, features)
        with torch.no_grad():
            embeddings = task.embeddings(params, features=features)
        return Reconstruction(images.detach().cpu(), labels.cpu(),
                              {**info, **more, "prior": self.prior, "embeddings": embeddings.cpu(),
                               "features": F.normalize(features.float(), dim=-1).cpu(),
                               "seconds": time.perf_counter() - start})

    def tower_route(self, observation: Observation, task: Task, start: float) -> Reconstruction:
        """Visual-side PEFT: under the TV prior, Inverting Gradients' pixel search with joint soft
        labels; under a learned prior, gradient matching over blends of public images
        (`attacks.tower_side`, which explains why not the decoders)."""
        update, params = observed(observation, task)
        if self.prior == "tv":
            from attacks.ig import InvertingGradients

            ig = InvertingGradients(iterations=self.iterations, restarts=self.restarts, seed=self.seed,
                                    progress=self.progress, label_strategy=None)
            recon = ig.reconstruct(observation, task)
            recon.extras.update(route="tower", prior="tv", seconds=time.perf_counter() - start)
            return recon
        labels, images, info = tower_side(task, params, update, observation.batch_size, self.public_images,
                                          progress=self.progress)
        with torch.no_grad():
            embeddings = task.embeddings(params, images)
        return Reconstruction(images.detach().cpu(), labels.cpu(),
                              {"route": "tower", **info, "prior": "public-blend", "embeddings": embeddings.cpu(),
                               "seconds": time.perf_counter() - start})
