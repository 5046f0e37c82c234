"""Results kept on disk by model fingerprint: the key sees every weight, a hit skips the work."""

from __future__ import annotations

import pytest
import torch

from instructune.testing import make_tiny_model
from instructune.use.answer_cache import cache_path, cached_result, result_key, weights_fingerprint


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))


def test_the_fingerprint_is_the_weights():
    model = make_tiny_model(100, seed=1)
    same = make_tiny_model(100, seed=1)
    assert weights_fingerprint(model) == weights_fingerprint(same)
    with torch.no_grad():
        same.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6  # one weight, by the smallest step
    assert weights_fingerprint(model) != weights_fingerprint(same)
    assert weights_fingerprint(model) != weights_fingerprint(make_tiny_model(100, seed=2))
    assert weights_fingerprint(model) != weights_fingerprint(model.to(torch.bfloat16))  # the dtype counts too


def test_a_tied_weight_is_read_once_and_still_counts():
    tied = make_tiny_model(100, seed=1, tie_word_embeddings=True)
    before = weights_fingerprint(tied)
    with torch.no_grad():
        tied.lm_head.weight[0, 0] += 1.0  # the embedding is the same tensor
    assert tied.model.embed_tokens.weight[0, 0] == tied.lm_head.weight[0, 0]
    assert weights_fingerprint(tied) != before


def test_a_result_is_computed_once_per_key():
    calls = []

    def compute():
        calls.append(1)
        return {"answers": ["Paris", "Tokyo"], "eval": {"loss": 1.0901423102597, "accuracy": 0.7}}

    key = result_key("f" * 64, prompts=[[1, 2, 3]], max_new_tokens=40)
    first, hit = cached_result(key, compute)
    assert not hit and calls == [1]
    again, hit = cached_result(key, compute)
    assert hit and calls == [1] and again == first  # floats come back exactly
    other = result_key("f" * 64, prompts=[[1, 2, 3]], max_new_tokens=41)  # any setting changes the key
    assert other != key and not cached_result(other, compute)[1] and calls == [1, 1]


def test_an_unreadable_entry_is_computed_again():
    key = result_key("0" * 64, prompts=[])
    cache_path(key).parent.mkdir(parents=True)
    cache_path(key).write_text('{"result": [1, 2')  # a half-written file
    assert cached_result(key, lambda: [1, 2, 3]) == ([1, 2, 3], False)
    assert cached_result(key, lambda: None) == ([1, 2, 3], True)
    assert not list(cache_path(key).parent.glob(".*.tmp"))  # no temporary file left behind
