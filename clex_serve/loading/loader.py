"""Build a model from a Hugging Face folder or hub id: config, empty modules, weights, CLEX ODE.

Modules are created on the meta device and given storage on the target device, so a 7B model never
pays for a random initialisation; every parameter is then filled from the checkpoint, with its name,
shape and presence checked, and a progress bar while it happens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from clex_serve.config import ModelConfig, read_lenient_json
from clex_serve.layers.linear import PackedLinear
from clex_serve.layers.rotary import get_rope
from clex_serve.loading.model_source import resolve_model_path
from clex_serve.loading.weights import CheckpointError, checkpoint_files, count_tensors, iterate_tensors
from clex_serve.models import build_model
from clex_serve.models.base import CausalLM

_PROGRESS_DELAY = 1.0  # seconds of loading before the progress bar shows
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers that older checkpoints store but that are always recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPUs run float32 matmuls best, and it is the reference precision
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this torch sees no CUDA device; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda")
    return resolved


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    path: Path
    dtype: torch.dtype
    device: torch.device


LOAD_FORMATS = ("auto", "dummy")


def load_model(
    model: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    revision: str | None = None,
    show_progress: bool = True,
    config_overrides: dict | None = None,
    load_format: str = "auto",
    seed: int = 0,
) -> LoadedModel:
    """``config_overrides`` replace keys of config.json before validation (e.g. another ``rope_scaling``
    or ``log_scale``, as the official chat lets a flag override it). ``load_format="dummy"`` (vLLM's name)
    reads only config.json and fills the weights with seeded random values: for benchmarks and profiling."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    path = resolve_model_path(str(model), revision)
    raw = read_lenient_json(path / "config.json")
    raw.update(config_overrides or {})
    config = ModelConfig.from_dict(raw)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    files = checkpoint_files(path) if load_format == "auto" else []

    with torch.device("meta"):
        module = build_model(config)
    module = module.to(dtype).to_empty(device=device)
    # The rotary tables are float32 and derived, not loaded: rebuild them for real on the device.
    module.model.rotary_emb = get_rope(config).to(device)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight

    if load_format == "dummy":
        _fill_random(module, seed)
    else:
        _fill_weights(module, files, show_progress)
    module.rotary_emb.finalize()
    module.eval().requires_grad_(False)
    return LoadedModel(module, config, path, dtype, device)


def checkpoint_tensors(module: CausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names (views into packed projections): what a
    transformers model of the same architecture holds, for copying weights between the two."""
    return _expected_tensors(module)[0]


def _expected_tensors(module: CausalLM) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor the checkpoint must or may provide, by name, and the names that are optional."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    for name, layer in module.named_modules():
        if isinstance(layer, PackedLinear):  # the checkpoint names the packed projections apart
            for suffix in ("weight", "bias"):
                tensors.pop(f"{name}.{suffix}", None)
            parent = name.rsplit(".", 1)[0]
            tensors.update({f"{parent}.{shard}": view for shard, view in layer.checkpoint_tensors().items()})
    optional = set()
    if module.config.is_clex:  # CLEX checkpoints store inv_freq, and the official code rotates with it
        tensors["model.rotary_emb.inv_freq"] = module.rotary_emb.inv_freq
        optional.add("model.rotary_emb.inv_freq")
    if module.config.tie_word_embeddings:
        optional.add("lm_head.weight")
    return tensors, optional


def _rename(module: CausalLM, name: str) -> str:
    for old, new in module.weight_renames:
        name = name.replace(old, new)
    return name


@torch.no_grad()
def _fill_random(module: CausalLM, seed: int) -> None:
    """Matrices ~ N(0, 0.02) as transformers initialises them, norm weights 1, biases 0; the optional
    tensors (a CLEX checkpoint's ``inv_freq``) keep the values computed from the config."""
    expected, optional = _expected_tensors(module)
    generator = torch.Generator(device=module.lm_head.weight.device).manual_seed(seed)
    for name in sorted(set(expected) - optional):
        tensor = expected[name]
        if tensor.dim() >= 2:
            tensor.normal_(0.0, 0.02, generator=generator)
        else:
            tensor.fill_(1.0 if "norm" in name else 0.0)


def _fill_weights(module: CausalLM, files: list[Path], show_progress: bool) -> None:
    expected, optional = _expected_tensors(module)
    loaded: set[str] = set()
    # The bar appears only when loading lasts (a multi-GB checkpoint), not for the embedded 8 MB model.
    progress = tqdm(
        total=count_tensors(files) or None,
        desc="Loading weights",
        unit="tensor",
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
        delay=_PROGRESS_DELAY,
    )
    with progress, torch.no_grad():
        for name, tensor in iterate_tensors(files):
            progress.update(1)
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            target_name = _rename(module, name)
            target = expected.get(target_name)
            if target is None:
                continue  # extra tensors (optimizer leftovers, unused heads) are harmless
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"weight {name} has shape {list(tensor.shape)}, but config.json implies {list(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(target_name)
    missing = sorted(set(expected) - loaded - optional)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is incomplete: weight {missing[0]}{more} is missing")
