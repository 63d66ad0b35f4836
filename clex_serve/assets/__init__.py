"""Files shipped inside the package: the small CLEX chat model that makes ``clex-serve`` work offline.

``default_model/`` is built by ``python -m clex_serve.train.build_default_model`` (see docs/evaluation.md).
"""

from pathlib import Path

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "default_model"
