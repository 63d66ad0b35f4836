"""Stage 2: causal-LM pretraining with plain RoPE, then CLEX continued pretraining of that model.

    python -m clex_serve.train.pretrain RUN_DIR --rope plain   # from scratch: the baseline and starting point
    python -m clex_serve.train.pretrain RUN_DIR --rope clex    # CLEX fine-tune of RUN_DIR/plain

Each resumes from ``RUN_DIR/<rope>/checkpoint.pt`` when it exists and exports ``RUN_DIR/<rope>/base``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clex_serve.train.data import WindowSampler
from clex_serve.train.export import export_model
from clex_serve.train.model import build_model
from clex_serve.train.prepare import prepare, tokenizer_dir
from clex_serve.train.recipe import MAX_FACTOR, Recipe
from clex_serve.train.trainer import Batch, TrainConfig, Trainer

ROPE_CHOICES = ("plain", "clex")


def finished_weights(checkpoint: Path, steps: int) -> dict[str, torch.Tensor]:
    if not checkpoint.exists():
        raise SystemExit(f"{checkpoint} is missing: run the stage before this one first")
    state = torch.load(checkpoint, weights_only=False)
    if state["step"] != steps:
        raise SystemExit(f"{checkpoint} stopped at step {state['step']} of {steps}: rerun its stage to finish it")
    return state["model"]


def pretrain(run_dir: Path, rope: str, recipe: Recipe | None = None) -> Path:
    """Train (or finish training) one stage and return its exported folder."""
    recipe = recipe or Recipe()
    if rope not in ROPE_CHOICES:
        raise ValueError(f"rope must be one of {ROPE_CHOICES}, got {rope!r}")
    run_dir, shape = Path(run_dir), recipe.shape
    use_clex = rope == "clex"
    config: TrainConfig = recipe.clex if use_clex else recipe.pretrain
    _, train_stream, _ = prepare(run_dir, shape.vocab_size, shape.base_len * MAX_FACTOR)
    sampler = WindowSampler(train_stream, shape.base_len, recipe.batch_size, config.seed)

    def batches(step: int) -> list[Batch]:
        ids = sampler.batch(step)
        return [Batch(ids, ids, clex_sampling=True)]

    model = build_model(shape, use_clex, recipe.pretrain.seed)
    if use_clex:  # start from the plain model; only the ODE projection is new (at its official init)
        plain = finished_weights(run_dir / "plain" / "checkpoint.pt", recipe.pretrain.steps)
        missing, unexpected = model.load_state_dict(plain, strict=False)
        if unexpected or any("proj_func" not in name for name in missing):
            raise SystemExit(f"the plain checkpoint does not fit the model: {missing} {unexpected}")
    out = run_dir / rope
    Trainer(model, config, batches, out / "checkpoint.pt", use_clex, shape.base_len).run(desc=f"pretrain-{rope}")
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
