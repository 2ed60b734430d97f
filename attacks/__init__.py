"""Attack plugins for fedsim, and the parts they are composed from."""

from attacks.base import Attack, Reconstruction

__all__ = ["Attack", "Reconstruction"]
