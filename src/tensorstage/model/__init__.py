"""Model architectures: `ModelSpec`, presets, Hugging Face config import, YAML models."""

from tensorstage.model.spec import MLASpec, ModelSpec, MoESpec

__all__ = ["MLASpec", "ModelSpec", "MoESpec"]
