"""Tokenizer loading, and the token ids that end a generation."""

from __future__ import annotations

import json
from pathlib import Path

from clex_serve.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _declared_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_tokenizer(path: str | Path):
    from transformers.utils import logging as transformers_logging

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); pass --tokenizer")
    # transformers reads config.json on the way and warns about the 'clex' rope type it does not know.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        if folder.is_dir() and _declared_class(folder) == "PreTrainedTokenizerFast":
            # The class AutoTokenizer would pick, without the seconds AutoTokenizer spends importing and
            # resolving configs: this keeps the embedded model's start-up short.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {path}: {str(error).splitlines()[0]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def eos_token_ids(model_path: Path, config: ModelConfig, tokenizer) -> list[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, in that order, without repeats."""
    ids = list(config.eos_token_ids)
    generation_config = Path(model_path) / "generation_config.json"
    if generation_config.is_file():
        try:
            value = json.loads(generation_config.read_text()).get("eos_token_id")
        except ValueError:
            value = None
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))
