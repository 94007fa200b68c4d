"""The one error type of the training stage."""
from __future__ import annotations

__all__ = ["TrainError"]


class TrainError(RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""
