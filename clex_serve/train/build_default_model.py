"""Retrain the embedded demo model from scratch: every stage, one command.

    python -m clex_serve.train.build_default_model [--run-dir runs/demo] [--out clex_serve/assets/default_model]

1. tokenizer and token streams from the standard library (``prepare``);
2. pretraining with plain RoPE (the baseline), then CLEX continued pretraining of that model (``pretrain``);
3. the chat fine-tune of the CLEX model, exported to ``--out`` in bfloat16 (float32 copy in the run folder);
4. the length-extrapolation evaluation, written to ``RUN_DIR/evaluation.{md,json,png}``.

Every stage resumes from what ``--run-dir`` already holds, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clex_serve.train.export import export_model
from clex_serve.train.model import build_model
from clex_serve.train.prepare import prepare, tokenizer_dir
from clex_serve.train.pretrain import finished_weights, pretrain
from clex_serve.train.recipe import MAX_FACTOR, Recipe
from clex_serve.train.sft import finetune

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def run_finetune(run_dir: Path, out: Path, recipe: Recipe) -> Path:
    shape = recipe.shape
    tokenizer, train_stream, _ = prepare(run_dir, shape.vocab_size, shape.base_len * MAX_FACTOR)
    model = build_model(shape, use_clex=True, seed=recipe.pretrain.seed)
    model.load_state_dict(finished_weights(run_dir / "clex" / "checkpoint.pt", recipe.clex.steps))
    finetune(
        model,
        shape,
        tokenizer,
        train_stream,
        recipe.sft,
        recipe.sft_batch_size,
        recipe.sft_lm_batch_size,
        run_dir / "clex" / "sft_checkpoint.pt",
    )
    export_model(model, shape, run_dir / "clex" / "chat", tokenizer_dir(run_dir), True, MAX_FACTOR)
    return export_model(model, shape, out, tokenizer_dir(run_dir), True, MAX_FACTOR, dtype="bfloat16")


def run_evaluation(run_dir: Path, shipped: Path) -> None:
    from clex_serve.train import evaluate

    evaluate.main(
        [
            "--clex",
            f"CLEX base={run_dir / 'clex' / 'base'}",
            "--clex",
            f"CLEX chat (shipped)={shipped}",
            "--rope",
            f"RoPE={run_dir / 'plain' / 'base'}",
            "--plot",
            str(run_dir / "evaluation.png"),
            "--json",
            str(run_dir / "evaluation.json"),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="checkpoints and logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the shipped chat model goes")
    parser.add_argument("--skip-eval", action="store_true", help="stop after exporting the chat model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # sized for one thread per process; see recipe.py
    recipe = Recipe()
    prepare(args.run_dir, recipe.shape.vocab_size, recipe.shape.base_len * MAX_FACTOR)
    for rope in ("plain", "clex"):
        pretrain(args.run_dir, rope, recipe)
    shipped = run_finetune(args.run_dir, args.out, recipe)
    print(f"chat model: {shipped}")
    if not args.skip_eval:
        run_evaluation(args.run_dir, shipped)


if __name__ == "__main__":
    main()
