"""Write a trained model as a Hugging Face folder that ``clex_serve.loading.loader.load_model`` reads.

The layout is the one of the released CLEX-Llama checkpoints: HF Llama weight names, the CLEX projection and
``inv_freq`` under ``model.clex_layer.``, and ``rope_scaling`` of type ``clex`` in config.json. The CLEX
tensors stay float32 whatever ``dtype`` the rest is saved in, because the ODE amplifies their rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from clex_serve.train.model import ModelShape

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_config(shape: ModelShape, use_clex: bool, max_factor: int, dtype: str) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.base_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "log_scale": False,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": shape.bos_token_id,
        "eos_token_id": shape.eos_token_id,
        "torch_dtype": dtype,
    }
    if use_clex:
        config["rope_scaling"] = {
            "type": "clex",
            "max_factor": max_factor,
            "param_factor": 1,
            "time_dt": 0.01,
            "act": "silu",
            "factor": max_factor,
        }
    return config


def checkpoint_tensors(model, use_clex: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.rotary_emb."):
            if not use_clex:
                continue  # plain RoPE recomputes inv_freq from rope_theta
            tensors[name.replace("model.rotary_emb.", "model.clex_layer.")] = tensor.detach().float().contiguous()
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the same tensor as the embeddings; safetensors refuses shared storage
        tensors[name] = tensor.detach().to(dtype).contiguous()
    return tensors


def export_model(
    model,
    shape: ModelShape,
    folder: Path,
    tokenizer_folder: Path,
    use_clex: bool,
    max_factor: int,
    dtype: str = "float32",
) -> Path:
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        checkpoint_tensors(model, use_clex, SAVE_DTYPES[dtype]),
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the shipped copy must be readable
    (folder / "config.json").write_text(json.dumps(hf_config(shape, use_clex, max_factor, dtype), indent=2) + "\n")
    context_limit = shape.base_len * (max_factor if use_clex else 1)
    generation = {
        "bos_token_id": shape.bos_token_id,
        "eos_token_id": shape.eos_token_id,
        "max_length": context_limit,
        "do_sample": False,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_folder) / name).exists():
            shutil.copyfile(Path(tokenizer_folder) / name, folder / name)
    _finish_tokenizer_config(folder / "tokenizer_config.json", context_limit)
    return folder


def _finish_tokenizer_config(path: Path, max_length: int) -> None:
    if path.exists():
        config = json.loads(path.read_text())
        config["model_max_length"] = max_length
        # transformers 5 writes its own class name, which transformers 4 does not know; both load this one.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
