"""What the honest-but-curious server knows before any client replies: the one thing, with its own
options, that an attack is built from.

The threat model it encodes: the server holds a labelled public split of the task's data
(never a client's images: the split is fixed, the same for every run seed), the class names,
the public description of the model it distributes (architecture, PEFT method, pre-trained
weights, the model's own initialisation seed), the training plan it sets (protocol, learning
rate, batch size, local steps, clients per round) and an attack seed of its own. It does not
hold the private pool, the partition, the batch schedule or the data seed that draws them: the
clients keep those, and nothing in the knowledge or in an Observation depends on them
(tests/test_contract.py brute-forces the data seed from both and fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsim.datasets import ImageDataset
from fedsim.protocol import Protocol


@dataclass(frozen=True)
class AttackerKnowledge:
    public: ImageDataset  # the server's own labelled public split (a copy, shared with nobody)
    model_spec: dict[str, Any]  # the public model description every client builds the model from
    protocol: Protocol  # the public training plan
    attack_seed: int = 0  # the attack's own randomness

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.model_spec["class_names"])

    @classmethod
    def of(cls, cfg) -> "AttackerKnowledge":
        """The knowledge a run's server has: the run config's public parts only (dataset loader
        settings, model, protocol, attack seed), never its data seed."""
        from fedsim.data import load_dataset, split_public
        from fedsim.models import model_spec

        public = split_public(load_dataset(cfg))[1]
        own = ImageDataset(public.name, public.images.clone(), public.labels.clone(), public.class_names)
        return cls(own, model_spec(cfg, public.class_names), Protocol.of(cfg), cfg.attack_seed)
