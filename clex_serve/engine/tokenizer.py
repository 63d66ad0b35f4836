"""Tokenizer loading, and the token ids that end a generation."""

from __future__ import annotations

import json
from pathlib import Path

from clex_serve.config import ModelConfig


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # transformers reads config.json on the way and warns about the 'clex' rope type it does not know.
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); pass --tokenizer")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
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
