"""The norm/attention analysis on synthetic tensors with known answers, then on a tiny model end to end."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from kvpolicies.experiments.analysis import (
    norm_attention,
    pearson,
    ranks,
    spearman,
    topk_overlap,
)
from tests.helpers import tiny_llama


def test_ranks_average_ties():
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 30.0])).tolist() == [0.0, 2.5, 1.0, 2.5]


def test_correlations_have_the_known_extremes():
    x = torch.arange(10.0)
    assert spearman(x, x**3).item() == pytest.approx(1.0)
    assert spearman(x, -torch.exp(x)).item() == pytest.approx(-1.0)
    assert pearson(x, 2 * x + 1).item() == pytest.approx(1.0)
    assert pearson(x, torch.ones(10)).item() == 0.0  # constant side: no correlation, not NaN


def test_correlations_match_scipy_on_random_data_with_ties():
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (3, 40), generator=generator).double()
    y = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    for row in range(3):
        assert spearman(x[row], y[row]).item() == pytest.approx(stats.spearmanr(x[row], y[row]).statistic, abs=1e-10)
        assert pearson(x[row], y[row]).item() == pytest.approx(stats.pearsonr(x[row], y[row]).statistic, abs=1e-10)


def test_topk_overlap_counts_shared_keys():
    norms = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert topk_overlap(norms, torch.tensor([[9.0, 8.0, 0.0, 0.0]]), k=2).item() == 1.0  # low norms attended
    assert topk_overlap(norms, torch.tensor([[0.0, 0.0, 8.0, 9.0]]), k=2).item() == 0.0
    assert topk_overlap(norms, torch.tensor([[9.0, 0.0, 8.0, 0.0]]), k=2).item() == 0.5


def test_norm_attention_on_a_tiny_model_matches_eager_attention_weights():
    model = tiny_llama(attn_implementation="eager")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    result = norm_attention(model, ids, window=8, keep_fraction=0.25)
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=True)
    for layer in (0, 5):
        weights = out.attentions[layer][0, :, -8:, :32]  # [heads, window queries, visible keys]
        expected = weights.view(2, 3, 8, 32).mean(dim=(1, 2))
        torch.testing.assert_close(result.attention[layer], expected, atol=1e-5, rtol=1e-4)
        keys = out.cache.layers[layer].keys[0, :, :32]
        torch.testing.assert_close(result.norms[layer], keys.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert result.spearman.shape == result.pearson.shape == result.overlap.shape == (8, 2)
    assert (result.spearman.abs() <= 1).all() and ((result.overlap >= 0) & (result.overlap <= 1)).all()
    # Each query distributes one unit of attention; the visible keys receive part of it, on average over queries.
    assert all(float(a.sum(-1).max()) <= 1.0 + 1e-5 for a in result.attention)
    assert len(result.norms) == 8 and result.norms[0].shape == (2, 32)
    with pytest.raises(ValueError, match="more than the query window"):
        norm_attention(model, ids[:, :8], window=8)
