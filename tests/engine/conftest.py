"""Engines on the reference checkpoints, shared by the engine tests of a module: each folder copied once with
a tokenizer beside it, each engine built once per set of keyword arguments."""

import pytest

from clex_serve import LLM
from helpers.models import model_with_tokenizer
from helpers.reference import REFERENCE_MODELS


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: model_with_tokenizer(name, root) for name in REFERENCE_MODELS}


@pytest.fixture(scope="module")
def engines(model_dirs):
    """engines(name, **kwargs): a float32 CPU engine of reference model ``name``, built on first use."""
    cache = {}

    def get(name, **kwargs):
        key = (name, repr(sorted(kwargs.items())))  # repr: speculative configs are dicts
        if key not in cache:
            cache[key] = LLM(str(model_dirs[name]), dtype="float32", device="cpu", show_progress=False, **kwargs)
        return cache[key]

    return get
