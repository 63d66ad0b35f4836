"""Stage 2: causal-LM pretraining of the demo model, with CLEX or with plain RoPE (the baseline).

    python -m clex_serve.train.pretrain RUN_DIR --rope clex    # or --rope plain

Resumes from ``RUN_DIR/<rope>/checkpoint.pt`` when it exists, and exports ``RUN_DIR/<rope>/base`` at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clex_serve.train.data import WindowSampler
from clex_serve.train.model import build_model
from clex_serve.train.prepare import prepare, tokenizer_dir
from clex_serve.train.recipe import MAX_FACTOR, Recipe
from clex_serve.train.trainer import Batch, Trainer

ROPE_CHOICES = ("clex", "plain")


def pretrain(run_dir: Path, rope: str, recipe: Recipe = Recipe()) -> Path:
    """Train (or finish training) one model and return its exported folder."""
    if rope not in ROPE_CHOICES:
        raise ValueError(f"rope must be one of {ROPE_CHOICES}, got {rope!r}")
    use_clex = rope == "clex"
    shape = recipe.shape
    _, train_stream, _ = prepare(run_dir, shape.vocab_size, shape.base_len * MAX_FACTOR)
    sampler = WindowSampler(train_stream, shape.base_len, recipe.batch_size, recipe.pretrain.seed)

    def batches(step: int) -> list[Batch]:
        ids = sampler.batch(step)
        return [Batch(ids, ids, clex_sampling=True)]

    model = build_model(shape, use_clex, recipe.pretrain.seed)
    out = Path(run_dir) / rope
    trainer = Trainer(model, recipe.pretrain, batches, out / "checkpoint.pt", use_clex, shape.base_len)
    trainer.run(desc=f"pretrain-{rope}")

    from clex_serve.train.export import export_model

    return export_model(model, shape, out / "base", tokenizer_dir(run_dir), use_clex, MAX_FACTOR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rope", choices=ROPE_CHOICES, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the demo is sized for one thread; more would fight other processes for cores
    print(pretrain(args.run_dir, args.rope))


if __name__ == "__main__":
    main()
