"""The error every checkpoint reader raises (``.pth``, ``.safetensors``, zip members)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, truncated, hostile or not a state dict.

    The message names the file and the problem (key, value, member) on its first line.
    """
