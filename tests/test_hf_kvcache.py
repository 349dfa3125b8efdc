"""Hugging Face generation through pyfastattn's KV-cache API: greedy tokens
identical to "sdpa" with a DynamicCache and a StaticCache (a tiny randomly
initialised Llama, nothing downloaded), and the StaticCache steps run as
attention_with_kvcache over the cache buffer (no dense mask, no copy)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("pyfastattn.integrations.transformers")
pytest.importorskip("transformers.masking_utils")

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _registered():
    hf.register()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, eos_token_id=VOCAB - 1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_matches_sdpa(cache, monkeypatch):
    model = _llama()
    ids = torch.randint(1, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache == "static":
        kw["cache_implementation"] = "static"
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("sdpa")
    want = ref_model.generate(ids, **kw)

    calls = []
    real = hf.attention_with_kvcache

    def counting(*a, **k):
        calls.append(a[1].shape)
        return real(*a, **k)

    monkeypatch.setattr(hf, "attention_with_kvcache", counting)
    model.set_attn_implementation(hf.NAME)
    got = model.generate(ids, **kw)
    assert torch.equal(got, want), f"tokens differ:\n{got}\n{want}"
    if cache == "static":
        # every decode step of every layer went through the cache API
        assert len(calls) >= 2 * (kw["max_new_tokens"] - 1), len(calls)
