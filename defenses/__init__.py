"""Defense plugins for fedsim, applied in the client loop."""

from defenses.base import Defense

__all__ = ["Defense"]
