"""The "pyfastattn" attention implementation in Hugging Face transformers.

Small randomly initialised models, nothing downloaded. Hidden states are held
to the tolerance rule against the same model run in float64 (with "sdpa":
float64 "eager" turns rows that see no key into NaN, which then reach every
row through 0 * NaN), with the fp32 "eager" and "sdpa" runs as the
plain-PyTorch baselines; greedy
generation must give the same tokens with and without the KV cache (and as
"sdpa").
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pyfastattn
from pyfastattn import functional as pfa_functional

from ._helpers import assert_tolerance

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("pyfastattn.integrations.transformers")
pytest.importorskip("transformers.masking_utils")

B, T, VOCAB = 3, 11, 97


@pytest.fixture(autouse=True, scope="module")
def _registered():
    hf.register()


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=0,
        eos_token_id=VOCAB - 1,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA 3:1
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=VOCAB - 1,
    )
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def _make(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[name]().eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
    return model


def _batch(padding: str):
    """input_ids (B, T) and a 0/1 attention mask with the given padding side."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB - 1, (B, T), generator=g)
    lengths = torch.tensor([T, T - 4, 5])
    pos = torch.arange(T)
    mask = pos < lengths[:, None] if padding == "right" else pos >= (T - lengths)[:, None]
    if padding == "ragged":  # holes: neither left nor right padding
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 3] = mask[2, 0] = mask[2, 6:8] = False
    return ids, mask.long()


def _use(model, impl: str) -> None:
    """set_attn_implementation, skipping where this transformers' model class
    doesn't dispatch through AttentionInterface (BERT before transformers 5)."""
    model.set_attn_implementation(impl)
    if model.config._attn_implementation != impl:
        pytest.skip(
            f"{type(model).__name__} in transformers {transformers.__version__} can't switch attention "
            "implementation (it does not use AttentionInterface)"
        )


def _hidden(model, impl: str, ids, mask):
    _use(model, impl)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1]


CASES = [
    ("bert", "right"),
    ("bert", "ragged"),
    ("gpt2", "left"),
    ("gpt2", "right"),
    ("llama", "left"),
    ("llama", "none"),
]


@pytest.mark.parametrize("name,padding", CASES, ids=[f"{a}-{b}-padding" for a, b in CASES])
def test_hidden_states_match_eager_and_sdpa(name, padding):
    model = _make(name)
    ids, mask = _batch("right" if padding == "none" else padding)
    if padding == "none":
        mask = torch.ones_like(mask)
    with torch.no_grad():
        ref = _hidden(copy.deepcopy(model).double(), "sdpa", ids, mask)
        eager = _hidden(model, "eager", ids, mask)
        sdpa = _hidden(model, "sdpa", ids, mask)
        with pyfastattn.backend("kernel"):
            ours = _hidden(model, "pyfastattn", ids, mask)
    # Causal models with left padding have query rows that see no key at all;
    # eager gives them a uniform average of padding, SDPA and pyfastattn 0.
    # Only real tokens are compared with eager.
    valid = mask.bool()
    causal_padded = name != "bert" and padding == "left"
    keep = valid if causal_padded else torch.ones_like(valid)
    assert_tolerance(f"{name} vs eager", ours[keep], ref[keep], eager[keep], torch.float32)
    assert_tolerance(f"{name} vs sdpa", ours[keep], ref[keep], sdpa[keep], torch.float32)
    if causal_padded:
        torch.testing.assert_close(ours, sdpa, rtol=1e-4, atol=1e-4)


def test_padding_mask_is_never_dropped():
    """Real tokens must not see padding: changing the padded tokens leaves
    them untouched, and the mask changes the result."""
    for name, padding in (("bert", "right"), ("bert", "ragged"), ("llama", "left")):
        model = _make(name)
        model.set_attn_implementation("pyfastattn")
        if model.config._attn_implementation != "pyfastattn":
            continue  # BERT before transformers 5 (see _use)
        ids, mask = _batch(padding)
        other = ids.masked_fill(mask == 0, 7)
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            b = model(input_ids=other, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            c = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        valid = mask.bool()
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a[valid], c[valid], atol=1e-3), name


def test_right_padding_uses_key_lengths_not_a_dense_mask(monkeypatch):
    calls = []
    real = pfa_functional._run
    monkeypatch.setattr(pfa_functional, "_run", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = _make("bert")
    _use(model, "pyfastattn")
    ids, mask = _batch("right")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2
    for c in calls:
        assert c["attn_mask"] is None
        assert c["seqused_k"].tolist() == mask.sum(-1).tolist()
    calls.clear()
    ids, mask = _batch("ragged")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(c["seqused_k"] is None and tuple(c["attn_mask"].shape) == (B, 1, 1, T) for c in calls)


def test_right_padding_under_inference_mode():
    """torch.inference_mode: the padding mask transformers builds there is an
    inference tensor (no version counter); it must still become key lengths."""
    model = _make("bert")
    ids, mask = _batch("right")
    with torch.inference_mode():
        _use(model, "sdpa")
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        _use(model, "pyfastattn")
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,padding", [("gpt2", "left"), ("llama", "left"), ("llama", "none")])
def test_greedy_generate_same_tokens_with_and_without_cache(name, padding):
    model = _make(name)
    ids, mask = _batch("left")
    if padding == "none":
        ids, mask = ids[:1], torch.ones_like(mask[:1])
    kw = {"max_new_tokens": 6, "do_sample": False, "attention_mask": mask}
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model.generate(ids, use_cache=True, **kw)
        model.set_attn_implementation("pyfastattn")
        with pyfastattn.backend("kernel"):
            cached = model.generate(ids, use_cache=True, **kw)
            uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, want)


def test_from_pretrained_with_attn_implementation(tmp_path):
    model = _make("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="pyfastattn")
    assert loaded.config._attn_implementation == "pyfastattn"
    ids, mask = _batch("left")
    with torch.no_grad():
        a = loaded(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        b = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_gradients_match_sdpa():
    model = _make("llama").train()
    ids, mask = _batch("right")

    def grads(impl):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads("sdpa")
    with pyfastattn.backend("kernel"):
        got = grads("pyfastattn")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_jit_trace_keeps_the_mask_an_input():
    """A traced call whose example mask is a static-cache prefix (the
    attention_with_kvcache route) or right padding (key lengths) must honour a
    different mask later, not the lengths read from the example."""
    attn = _make("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    prefix = (torch.arange(9) < torch.tensor([[5], [7]])).view(2, 1, 1, 9)
    holes = prefix.clone()
    holes[0, 0, 0, 1] = holes[1, 0, 0, 0] = False

    def f(q, k, v, mask):
        return hf.attention_forward(attn, q, k, v, mask)[0]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(f, (q, k, v, prefix))
        for mask in (prefix, holes):
            torch.testing.assert_close(traced(q, k, v, mask), f(q, k, v, mask), rtol=1e-5, atol=1e-5)
        attn.is_causal = False  # a bidirectional (B, 1, 1, S) padding mask: key lengths
        try:
            traced = torch.jit.trace(f, (q, k, v, prefix))
            torch.testing.assert_close(traced(q, k, v, holes), f(q, k, v, holes), rtol=1e-5, atol=1e-5)
        finally:
            attn.is_causal = True


def test_unsupported_inputs_raise():
    model = _make("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 6, 4, 8)
    k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="sinks"):
        hf.attention_forward(attn, q, k, v, None, s_aux=torch.zeros(6))
    with pytest.raises(TypeError, match="tensor or None"):
        hf.attention_forward(attn, q, k, v, object())
    with pytest.raises(ValueError, match="4-D"):
        hf.attention_forward(attn, q, k, v, torch.ones(1, 4, dtype=torch.bool))
    out, weights = hf.attention_forward(attn, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (1, 4, 6, 8)
