"""Architecture name -> model class."""

from __future__ import annotations

from clex_serve.config import ModelConfig
from clex_serve.models.base import CausalLM
from clex_serve.models.llama import LlamaForCausalLM
from clex_serve.models.mixtral import MixtralForCausalLM
from clex_serve.models.phi import PhiForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "phi": PhiForCausalLM,
    "mixtral": MixtralForCausalLM,
}


def build_model(config: ModelConfig) -> CausalLM:
    return MODEL_CLASSES[config.family](config)
