"""Model architectures: `ModelSpec`, presets, Hugging Face config import, YAML models."""

from tensorstage.model.params import LayerParams, ParamCounts, param_counts
from tensorstage.model.presets import get_preset, list_presets
from tensorstage.model.resolve import resolve_model
from tensorstage.model.spec import MLASpec, ModelSpec, MoESpec

__all__ = [
    "LayerParams",
    "MLASpec",
    "ModelSpec",
    "MoESpec",
    "ParamCounts",
    "get_preset",
    "list_presets",
    "param_counts",
    "resolve_model",
]
