"""The benchmark model: a random Llama big enough that arithmetic, not Python, dominates a step.

8 layers, hidden 512, 8 heads, intermediate 1408, vocab 32000 (about 58M parameters), float32, with a
word-level tokenizer covering the vocabulary. Written once per run into a temporary folder, in two
variants over the same weights: plain RoPE, and CLEX (base window 256, max_factor 16, a random ODE
projection) for the cost of CLEX at scales above 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 32000
BASE_WINDOW = 256
MAX_FACTOR = 16


def build(
    folder: Path,
    seed: int = 0,
    base_window: int = BASE_WINDOW,
    num_layers: int = 8,
    hidden: int = 512,
    vocab: int = VOCAB,
) -> tuple[Path, Path]:
    """Write the plain and the CLEX variants; returns their folders. The defaults are the 58M shape."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=base_window,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    plain = folder / "plain"
    model.save_pretrained(plain)
    write_tokenizer(plain, vocab)

    clex = folder / "clex"
    clex.mkdir()
    for file in plain.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            (clex / file.name).write_bytes(file.read_bytes())
    raw = json.loads((plain / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.update(
        rope_theta=10000.0,
        log_scale=False,
        rope_scaling={"type": "clex", "max_factor": MAX_FACTOR, "param_factor": 1, "act": "silu"},
    )
    (clex / "config.json").write_text(json.dumps(raw, indent=2))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(plain / "model.safetensors"))
    head_dim = 64
    # A random ODE of the size trained ones stay near: its frequencies at scale 16 are 0.02-1.15 of the
    # base ones (pure NTK scaling gives 0.03-1). At 0.1 they overflowed to inf from scale 8 on, so every
    # sequence past seven base windows (3,584 tokens in cpu_benchmark) computed NaNs, whose arithmetic is
    # slower than numbers' (silu_and_mul 5x).
    generator = torch.Generator().manual_seed(seed + 1)
    weights["model.clex_layer.proj_func.ode_up_proj"] = torch.randn(head_dim // 2, head_dim, generator=generator) * 0.01
    weights["model.clex_layer.proj_func.ode_down_proj"] = (
        torch.randn(head_dim, head_dim // 2, generator=generator) * 0.01
    )
    save_file(weights, str(clex / "model.safetensors"), metadata={"format": "pt"})
    return plain, clex


def write_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over ``w3 .. w{vocab_size - 1}`` (benchmarks feed token ids; the engine still
    loads a tokenizer)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as reader:
        return sum(
            reader.get_slice(name).get_shape().numel()
            if hasattr(reader.get_slice(name).get_shape(), "numel")
            else int(torch.tensor(reader.get_slice(name).get_shape()).prod())
            for name in reader.keys()
        )
