"""Reading checkpoint tensors: safetensors (single or sharded with an index) and PyTorch ``.bin``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A missing, corrupt or mis-shaped checkpoint; the message is one line."""


def checkpoint_files(folder: Path) -> list[Path]:
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise CheckpointError(f"{index}: not a valid weight index (no 'weight_map')") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shard {missing[0]} named in {index_name} is missing")
            return files
        if (folder / single_name).is_file():
            return [folder / single_name]
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not shards:
        raise CheckpointError(f"{folder}: no weights found (model.safetensors, an index, or pytorch_model.bin)")
    return shards


def count_tensors(files: list[Path]) -> int:
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as reader:
                    total += len(list(reader.keys()))
            except Exception as error:  # safetensors raises its own types for a truncated header
                raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    return total


def iterate_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as reader:
                    for name in reader.keys():
                        yield name, reader.get_tensor(name)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                yield from state.items()
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"{file}: corrupt or truncated checkpoint ({type(error).__name__}: {error})"
            ) from None
