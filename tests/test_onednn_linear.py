"""Linear layers packed for oneDNN on the CPU compute what ``F.linear`` does, for any number of rows."""

import pytest
import torch
from torch import nn

from clex_serve.kernels.onednn_linear import onednn_available, pack_linear_layers

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_layers_equal_plain_ones_for_any_row_count(dtype, tolerance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=True), nn.Linear(96, 32, bias=False)).to(dtype)
    inputs = {rows: torch.randn(rows, 64, dtype=dtype) for rows in (1, 3, 16, 70)}
    expected = {rows: model(x).float() for rows, x in inputs.items()}
    assert pack_linear_layers(model) == 2
    assert pack_linear_layers(model) == 0  # already packed: a second runner over the model changes nothing
    for rows, x in inputs.items():
        torch.testing.assert_close(model(x).float(), expected[rows], atol=tolerance, rtol=tolerance)
    # Three-dimensional inputs keep their leading shape.
    assert model(torch.randn(2, 5, 64, dtype=dtype)).shape == (2, 5, 32)
    # bfloat16 drops the plain weight; float32 keeps it for single rows.
    assert (model[0].weight.numel() == 0) == (dtype == torch.bfloat16)


def test_a_weight_shared_with_an_embedding_stays_in_place():
    embedding = nn.Embedding(50, 16).to(torch.bfloat16)
    head = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    head.weight = embedding.weight
    pack_linear_layers(head, shared={id(embedding.weight)})
    assert head.weight is embedding.weight and embedding.weight.numel() == 800
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(head(x).float(), (x @ embedding.weight.t()).float(), atol=2e-2, rtol=2e-2)
