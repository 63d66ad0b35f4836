"""clex-serve: a serving engine for CLEX long-context language models."""

from clex_serve.engine.outputs import CompletionOutput, RequestOutput
from clex_serve.llm import LLM
from clex_serve.sampling_params import SamplingParams
from clex_serve.structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"  # read by pyproject.toml (tool.setuptools.dynamic)
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "__version__"]
