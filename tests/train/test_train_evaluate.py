"""The length-extrapolation evaluation end to end on tiny exported models."""

import json
import math

import torch
import torch.nn.functional as F

from clex_serve.train import evaluate
from clex_serve.train.corpus import list_source_files
from clex_serve.train.export import export_model
from clex_serve.train.model import ModelShape, build_model
from clex_serve.train.report import markdown_table
from clex_serve.train.tokenizer import save_hf_tokenizer, train_tokenizer

SHAPE = ModelShape(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, base_len=16)


def _export(tmp_path, use_clex):
    torch.set_num_threads(1)
    tokenizer_folder = tmp_path / "tok"
    if not tokenizer_folder.exists():
        save_hf_tokenizer(train_tokenizer([f.read() for f in list_source_files()[:5]], 300), tokenizer_folder, 64)
    model = build_model(SHAPE, use_clex, seed=0).eval()
    name = "clex" if use_clex else "rope"
    return model, export_model(model, SHAPE, tmp_path / name, tokenizer_folder, use_clex, max_factor=4)


def test_evaluate_end_to_end(tmp_path, capsys):
    _, clex = _export(tmp_path, True)
    _, rope = _export(tmp_path, False)
    out = tmp_path / "out.json"
    evaluate.main(
        [
            "--clex",
            f"CLEX={clex}",
            "--rope",
            f"RoPE={rope}",
            "--factors",
            "1,2,4",
            "--num-tokens",
            "128",
            "--json",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    for name in ("CLEX", "RoPE, no scaling", "RoPE, linear PI", "RoPE, dynamic NTK", "RoPE, YaRN"):
        assert f"| {name} |" in table
    assert "| 64 (4x) |" in table
    results = json.loads(out.read_text())["perplexity"]
    assert all(math.isfinite(ppl) and ppl > 1 for row in results.values() for ppl in row.values())
    # Within L0 every RoPE scaling of factor 1 is the plain model: the same perplexity.
    at_base = {name: row["16"] for name, row in results.items() if name.startswith("RoPE")}
    assert max(at_base.values()) - min(at_base.values()) < 1e-4
    # Past L0 they rotate differently, so the numbers must differ.
    assert results["RoPE, linear PI"]["64"] != results["RoPE, no scaling"]["64"]


def test_perplexity_is_the_exponentiated_mean_next_token_loss(tmp_path):
    model, folder = _export(tmp_path, False)
    tokens = evaluate.held_out_tokens(folder, 48)
    method = evaluate.Method("RoPE", folder)
    expected_nll = []
    with torch.no_grad():
        for window in tokens.view(3, 16):
            logits = model(window[None]).logits[0]
            expected_nll.append(F.cross_entropy(logits[:-1], window[1:], reduction="sum"))
    expected = math.exp(float(sum(expected_nll)) / (3 * 15))
    assert math.isclose(evaluate.perplexity(method, tokens, 16, 16), expected, rel_tol=1e-4)


def test_markdown_table():
    table = markdown_table({"a": {128: 3.14159, 256: 2.5}}, 128)
    assert table.splitlines() == ["| method | 128 (1x) | 256 (2x) |", "| --- | --- | --- |", "| a | 3.14 | 2.50 |"]
