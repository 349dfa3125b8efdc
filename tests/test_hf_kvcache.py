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


def _prefix_mask(lengths, lq, s):
    """(B, 1, lq, s) bool: row i of sequence b sees keys [0, n_b - lq + i]."""
    n = torch.tensor(lengths)[:, None, None, None]
    i = torch.arange(lq)[None, None, :, None]
    j = torch.arange(s)[None, None, None, :]
    return j <= n - lq + i


@pytest.mark.parametrize("inference", [False, True])
def test_prefix_lengths_read_once_per_mask(inference):
    """transformers hands every layer the same mask: its prefix lengths are
    read once per mask tensor, and read again when the mask changes in place
    (an inference tensor, which has no version counter, every call)."""
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        mask = _prefix_mask([5, 9], 2, 16)
        first = hf.prefix_causal_lengths(mask, 2, 2)
        assert first.tolist() == [5, 9]
        again = hf.prefix_causal_lengths(mask, 2, 2)
        assert again.tolist() == [5, 9]
        assert (again is first) != inference  # cached, but never for inference tensors
        assert hf.prefix_causal_lengths(mask, 2, 3) is None  # another lq: another answer
        mask[1].copy_(_prefix_mask([11], 2, 16)[0])  # in place: sequence 1 grows by two keys
        assert hf.prefix_causal_lengths(mask, 2, 2).tolist() == [5, 11]
        mask[0, 0, 0, 15] = True  # a hole: no longer a prefix
        assert hf.prefix_causal_lengths(mask, 2, 2) is None
        other = _prefix_mask([5, 9], 2, 16)  # an equal mask, another tensor
        assert hf.prefix_causal_lengths(other, 2, 2).tolist() == [5, 9]


def test_static_cache_step_reads_the_mask_once(monkeypatch):
    """A StaticCache decode step of a 2-layer model analyses its mask once,
    not once per layer (one device sync per step on CUDA)."""
    model = _llama()
    model.set_attn_implementation(hf.NAME)
    computed, looked_up = [], []
    real = hf.memo_per_mask

    def counting(mask, key, compute):
        looked_up.append(key)

        def counted():
            computed.append(key)
            return compute()

        return real(mask, key, counted)

    monkeypatch.setattr(hf, "memo_per_mask", counting)
    ids = torch.randint(1, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(2))
    steps = 6
    model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
                   cache_implementation="static")  # fmt: skip
    assert len(looked_up) >= 2 * (steps - 1), looked_up  # both layers asked in every decode step
    assert len(computed) <= steps, computed  # one reading per forward


def _record_calls(monkeypatch, name):
    """The keyword arguments of every call of ``hf.<name>`` (which still runs)."""
    seen = []
    real = getattr(hf, name)

    def recording(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(hf, name, recording)
    return seen


def _attend_buffer(mask, visible, hq, hk, d):
    """``attention_forward`` without grad over a random (B, hk, S, d) buffer
    whose slots outside each sequence's visible [lo, hi) hold NaN, under the
    bool ``mask`` (B, 1, lq, S); and the float64 dense-mask SDPA result over
    the clean buffer. Both (B, lq, hq, d) float64."""
    torch.manual_seed(0)
    b, _, lq, s = mask.shape
    q = torch.randn(b, hq, lq, d)
    k = torch.randn(b, hk, s, d)
    v = torch.randn(b, hk, s, d)
    k_nan, v_nan = k.clone(), v.clone()
    for i, (lo, hi) in enumerate(visible):
        for t in (k_nan, v_nan):
            t[i, :, :lo] = float("nan")
            t[i, :, hi:] = float("nan")
    module = torch.nn.Module()
    module.is_causal = True
    with torch.no_grad():
        out, _ = hf.attention_forward(module, q, k_nan, v_nan, mask, scaling=d**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(hq // hk, 1), v.double().repeat_interleave(hq // hk, 1),
        attn_mask=mask, scale=d**-0.5,
    )  # fmt: skip
    return out.double(), want.transpose(1, 2)


def test_prefill_into_a_static_buffer_reads_only_the_filled_keys(monkeypatch):
    """A prefill (more than 16 queries) over a static buffer with a prefix mask
    runs the tiled kernel with the prefix as key lengths and bottom-right
    causal: the slots past each prefix (NaN here) are never read, and the
    result is the dense-mask attention's."""
    n = [24, 40]  # sequence 0: a prompt from slot 0; sequence 1: 16 cached keys, then 24 new
    seen = _record_calls(monkeypatch, "attend")
    out, want = _attend_buffer(_prefix_mask(n, 24, 64), [(0, m) for m in n], hq=4, hk=2, d=16)
    assert len(seen) == 1 and seen[0]["causal"] and seen[0]["bottom_right"], seen
    assert seen[0]["seqused_k"].tolist() == n and seen[0].get("mask") is None
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_greedy_generation_with_a_long_prompt_matches_sdpa():
    """A static-cache generation whose prompt (20 tokens) takes the prefill
    route, then decode steps through the cache API: sdpa's tokens."""
    model = _llama()
    ids = torch.randint(1, VOCAB - 1, (2, 20), generator=torch.Generator().manual_seed(3))
    kw = dict(
        max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static"
    )
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("sdpa")
    want = ref_model.generate(ids, **kw)
    model.set_attn_implementation(hf.NAME)
    assert torch.equal(model.generate(ids, **kw), want)


def _padded_prefix_mask(pads, lengths, lq, s):
    """(B, 1, lq, s) bool: row i of sequence b sees keys [p_b, n_b - lq + i]."""
    p = torch.tensor(pads)[:, None, None, None]
    j = torch.arange(s)[None, None, None, :]
    return _prefix_mask(lengths, lq, s) & (j >= p)


def test_prefix_spans_of_left_padded_masks():
    mask = _padded_prefix_mask([0, 3], [9, 12], 2, 16)
    lengths, leftpad = hf.prefix_causal_spans(mask, 2, 2)
    assert lengths.tolist() == [9, 12] and leftpad.tolist() == [0, 3]
    assert hf.prefix_causal_lengths(mask, 2, 2) is None  # padded: not a plain prefix
    lengths, leftpad = hf.prefix_causal_spans(_prefix_mask([9, 12], 2, 16), 2, 2)
    assert lengths.tolist() == [9, 12] and leftpad is None
    hole = mask.clone()
    hole[1, 0, :, 5] = False
    assert hf.prefix_causal_spans(hole, 2, 2) is None
    empty_row = _padded_prefix_mask([0, 11], [9, 12], 2, 16)  # sequence 1's first row sees no key
    assert hf.prefix_causal_spans(empty_row, 2, 2) is None
    assert hf.prefix_causal_spans(_padded_prefix_mask([2], [7], 1, 16), 3, 1)[1].tolist() == [2, 2, 2]


def test_left_padded_decode_reads_only_its_keys(monkeypatch):
    """A decode step over a static buffer whose sequences start after some left
    padding: the KV-cache API with cache_leftpad, the padding and the empty
    slots (NaN here) never read, the dense-mask attention's result."""
    pads, n = [0, 5, 17], [20, 31, 40]
    seen = _record_calls(monkeypatch, "attention_with_kvcache")
    out, want = _attend_buffer(_padded_prefix_mask(pads, n, 2, 48), list(zip(pads, n)), hq=4, hk=2, d=16)
    assert len(seen) == 1, seen
    assert seen[0]["cache_leftpad"].tolist() == pads and seen[0]["cache_seqlens"].tolist() == n
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batch_generation_matches_sdpa(cache, monkeypatch):
    """Batched greedy generation with left-padded prompts: sdpa's tokens, the
    decode steps through the cache API with cache_leftpad (a DynamicCache's
    concatenated keys are a filled buffer too)."""
    model = _llama()
    ids = torch.randint(1, VOCAB - 1, (3, 10), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        ids[row, :pad] = 0
        am[row, :pad] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache == "static":
        kw["cache_implementation"] = "static"
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("sdpa")
    want = ref_model.generate(ids, attention_mask=am, **kw)
    seen = _record_calls(monkeypatch, "attention_with_kvcache")
    model.set_attn_implementation(hf.NAME)
    got = model.generate(ids, attention_mask=am, **kw)
    assert torch.equal(got, want), f"tokens differ:\n{got}\n{want}"
    padded = [c.get("cache_leftpad") is not None for c in seen]
    assert len(padded) >= 2 * (kw["max_new_tokens"] - 1) and all(padded), padded
