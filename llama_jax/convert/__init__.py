"""Checkpoint conversion between Meta, Hugging Face and our Orbax format (`llama-jax-convert`)."""

from llama_jax.convert.checkpoint import (
    FORMATS,
    Checkpoint,
    detect_format,
    load_checkpoint,
    open_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from llama_jax.convert.hub import resolve_checkpoint
from llama_jax.convert.source import ConvertError

__all__ = [
    "FORMATS",
    "Checkpoint",
    "ConvertError",
    "detect_format",
    "load_checkpoint",
    "open_checkpoint",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]
