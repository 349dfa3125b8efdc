"""pyfastattn.nn drop-in modules against their torch.nn namesakes.

Every equivalence check loads the torch module's state dict into the
pyfastattn module (strict=True), runs both on the same inputs, and holds the
pyfastattn outputs *and* gradients (inputs and parameters) to the tolerance
rule: error against the torch module run in float64 at most twice the error
of the torch module run in the test dtype, plus a rounding floor. The module
runs under backend "kernel" (where this build has the FFN kernel for the
device, for modules with an FFN), so a case the fused kernels can't take
fails instead of quietly using the reference.

``PYFASTATTN_TEST_DEVICE=cuda`` runs the equivalence checks on CUDA in bf16
(for scripts/gpu_check.sh); everything else stays on the CPU.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastattn
from pyfastattn import functional as pfa_functional
from pyfastattn.nn.attention import MultiheadAttention
from pyfastattn.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

from ._helpers import assert_tolerance

DEVICE = os.environ.get("PYFASTATTN_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("PYFASTATTN_TEST_DEVICE=cuda but no GPU", allow_module_level=True)
# The CUDA kernel has no fp32 variant: on CUDA the equivalence tests run in bf16.
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []
# There is no CUDA backward kernel yet, and backend "kernel" refuses a CUDA
# call that needs one: on CUDA the kernel is checked on the forward (no_grad)
# and gradients run under "auto".
KERNEL_BACKWARD = DEVICE == "cpu"

N, L, S, E, H = 3, 6, 9, 20, 4  # head dim 5 on purpose


# ---------------------------------------------------------------------------
# the comparison harness
# ---------------------------------------------------------------------------


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    """Float tensors to `dtype`; data (not masks) get requires_grad. Aliases
    stay aliases (MHA picks its projection by `query is key`)."""
    out, seen = {}, {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            if id(v) in seen:
                out[k] = seen[id(v)]
                continue
            t = v.to(DEVICE)
            if t.is_floating_point():
                t = t.to(dtype).detach()
                if "mask" not in k:
                    t.requires_grad_(True)
            seen[id(v)] = t
            v = t
        out[k] = v
    return out


def _run(module: nn.Module, inputs: dict, call, dtype: torch.dtype, seeds: list[torch.Tensor] | None):
    t = _cast(inputs, dtype)
    res = call(module, t)
    outs = [o for o in (res if isinstance(res, tuple) else (res,)) if o is not None]
    if seeds is None:
        seeds = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    loss = sum((o.double() * g).sum() for o, g in zip(outs, seeds))
    loss.backward()
    grads = {k: v.grad for k, v in t.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    grads.update({f"param {n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    return outs, grads, seeds


def _ffn_kernel_on_device() -> bool:
    try:
        from pyfastattn import ffn
    except ImportError:
        return False
    return ("ffn_fwd", DEVICE) in getattr(ffn, "KERNELS", ())


def check_equivalent(name, torch_module, our_module, inputs, call, dtype, kernel=True):
    """torch_module / our_module: same architecture; the torch weights are
    loaded into ours strictly. Compares outputs and all gradients."""
    our_module.load_state_dict(torch_module.state_dict(), strict=True)
    our_module.train(torch_module.training)
    ref_mod = copy.deepcopy(torch_module).to(DEVICE, torch.float64)
    base_mod = copy.deepcopy(torch_module).to(DEVICE, dtype)
    ours = our_module.to(DEVICE, dtype)
    ref_outs, ref_grads, seeds = _run(ref_mod, inputs, call, torch.float64, None)
    base_outs, base_grads, _ = _run(base_mod, inputs, call, dtype, seeds)
    if any(hasattr(m, "linear1") for m in ours.modules()) and not _ffn_kernel_on_device():
        kernel = False  # backend "kernel" would refuse the FFN (see pyfastattn.ffn)
    with pyfastattn.backend("kernel" if kernel and KERNEL_BACKWARD else "auto"):
        outs, grads, _ = _run(ours, inputs, call, dtype, seeds)
    if kernel and not KERNEL_BACKWARD:
        with torch.no_grad(), pyfastattn.backend("kernel"):
            fwd = call(ours, _cast(inputs, dtype))
        fwd = [o for o in (fwd if isinstance(fwd, tuple) else (fwd,)) if o is not None]
        for i, (o, r, b) in enumerate(zip(fwd, ref_outs, base_outs)):
            assert_tolerance(f"{name} output {i} (kernel forward)", o, r.double(), b, dtype)
    assert len(outs) == len(ref_outs), f"{name}: {len(outs)} outputs, torch gives {len(ref_outs)}"
    for i, (o, r, b) in enumerate(zip(outs, ref_outs, base_outs)):
        assert o.dtype == b.dtype, f"{name}: output {i} dtype {o.dtype}, torch gives {b.dtype}"
        assert_tolerance(f"{name} output {i}", o, r.double(), b, dtype)
    assert grads.keys() == ref_grads.keys(), f"{name}: gradients for {sorted(grads)} vs {sorted(ref_grads)}"
    for k in ref_grads:
        assert_tolerance(f"{name} grad {k}", grads[k], ref_grads[k].double(), base_grads[k], dtype)


def _with_dtypes(cases, ids, low_precision_subset):
    """(case, dtype) params: on CPU fp32 for every case and bf16 for a
    representative subset; on CUDA bf16 for every case."""
    params = []
    for case, name in zip(cases, ids):
        for dt in DTYPES:
            if dt == torch.float32 or DEVICE == "cuda" or low_precision_subset(case):
                params.append(pytest.param(case, dt, id=f"{name}-{str(dt).removeprefix('torch.')}"))
    return params


def _right_pad(n: int, s: int, lengths: list[int]) -> torch.Tensor:
    """bool (n, s), True = padding, real lengths `lengths`."""
    return torch.arange(s) >= torch.tensor(lengths)[:, None]


def _causal_bool(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


# ---------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------


def _mha_cases():
    x_sf = torch.randn(L, N, E)
    x_bf = torch.randn(N, L, E)
    mem_sf = torch.randn(S, N, E)
    kpm_right = _right_pad(N, S, [S, 4, 7])
    kpm_holes = torch.zeros(N, S, dtype=torch.bool)
    kpm_holes[0, 2] = kpm_holes[1, :3] = kpm_holes[2, 5] = True
    kpm_left = torch.zeros(N, L, dtype=torch.bool)
    kpm_left[1, :2] = True
    float_mask = torch.randn(L, S)
    float_mask[0, 3] = float("-inf")
    nh_bool = torch.rand(N * H, L, S) < 0.3
    nh_bool[..., 0] = False  # no fully masked rows
    causal_f = nn.Transformer.generate_square_subsequent_mask(L)

    def self_call(**kw):
        return lambda m, t: m(t["x"], t["x"], t["x"], **{k: t.get(k, v) for k, v in kw.items()})

    def cross_call(**kw):
        return lambda m, t: m(t["x"], t["k"], t["v"], **{k: t.get(k, v) for k, v in kw.items()})

    yield "self seq-first weights", {}, {"x": x_sf}, self_call()
    yield "self batch_first", {"batch_first": True}, {"x": x_bf}, self_call(need_weights=False)
    yield (
        "unbatched, float (H, L, L) mask",
        {},
        {"x": torch.randn(L, E), "attn_mask": torch.randn(H, L, L)},
        self_call(need_weights=False, attn_mask=None),
    )
    yield (
        "unbatched kpm, per-head weights",
        {},
        {"x": torch.randn(L, E), "key_padding_mask": torch.arange(L) >= 4},
        self_call(key_padding_mask=None, average_attn_weights=False),
    )
    yield (
        "kdim/vdim, right-padding kpm",
        {"kdim": 12, "vdim": 7, "batch_first": True},
        {"x": x_bf, "k": torch.randn(N, S, 12), "v": torch.randn(N, S, 7), "key_padding_mask": kpm_right},
        cross_call(key_padding_mask=None, need_weights=False),
    )
    yield (
        "kdim/vdim, per-head weights",
        {"kdim": 12, "vdim": 7},
        {"x": x_sf, "k": torch.randn(S, N, 12), "v": torch.randn(S, N, 7)},
        cross_call(average_attn_weights=False),
    )
    yield (
        "key is value, bool (L, S) mask + kpm with holes",
        {},
        {
            "x": x_sf,
            "k": mem_sf,
            "v": mem_sf,
            "attn_mask": _causal_bool(S)[:L],
            "key_padding_mask": kpm_holes,
        },
        cross_call(attn_mask=None, key_padding_mask=None, need_weights=False),
    )
    yield (
        "distinct key and value, float (L, S) mask",
        {"batch_first": True},
        {"x": x_bf, "k": torch.randn(N, S, E), "v": torch.randn(N, S, E), "attn_mask": float_mask},
        cross_call(attn_mask=None, need_weights=False),
    )
    yield (
        "add_bias_kv + add_zero_attn, bool mask + right-padding kpm",
        {"add_bias_kv": True, "add_zero_attn": True},
        {"x": x_sf, "k": mem_sf, "v": mem_sf, "attn_mask": nh_bool[0], "key_padding_mask": kpm_right},
        cross_call(attn_mask=None, key_padding_mask=None, need_weights=False),
    )
    yield (
        "add_bias_kv, weights",
        {"add_bias_kv": True, "batch_first": True},
        {"x": x_bf},
        self_call(),
    )
    yield (
        "add_zero_attn + is_causal",
        {"add_zero_attn": True},
        {"x": x_sf, "attn_mask": causal_f},
        self_call(attn_mask=None, is_causal=True, need_weights=False),
    )
    yield (
        "bias=False, float (N*H, L, S) mask + float kpm",
        {"bias": False},
        {
            "x": x_sf,
            "k": mem_sf,
            "v": mem_sf,
            "attn_mask": torch.randn(N * H, L, S),
            "key_padding_mask": torch.randn(N, S),
        },
        cross_call(attn_mask=None, key_padding_mask=None, need_weights=False),
    )
    yield (
        "bool (N*H, L, S) mask, weights",
        {"batch_first": True},
        {"x": x_bf, "k": torch.randn(N, S, E), "v": torch.randn(N, S, E), "attn_mask": nh_bool},
        cross_call(attn_mask=None),
    )
    yield (
        "is_causal with its mask",
        {"batch_first": True},
        {"x": x_bf, "attn_mask": causal_f},
        self_call(attn_mask=None, is_causal=True, need_weights=False),
    )
    yield (
        "is_causal + left-padding kpm",
        {},
        {"x": x_sf, "attn_mask": _causal_bool(L), "key_padding_mask": kpm_left},
        self_call(attn_mask=None, key_padding_mask=None, is_causal=True, need_weights=False),
    )
    yield (
        "is_causal + right-padding kpm",
        {"batch_first": True},
        {"x": x_bf, "attn_mask": causal_f, "key_padding_mask": _right_pad(N, L, [L, 3, 5])},
        self_call(attn_mask=None, key_padding_mask=None, is_causal=True, need_weights=False),
    )
    yield (
        "is_causal ignored with need_weights",
        {},
        {"x": x_sf, "attn_mask": causal_f},
        self_call(attn_mask=None, is_causal=True),
    )
    yield (
        "a fully padded batch row",
        {"batch_first": True},
        {"x": x_bf, "key_padding_mask": _right_pad(N, L, [L, 0, 2])},
        self_call(key_padding_mask=None, need_weights=False),
    )


MHA_CASES = list(_mha_cases())


@pytest.mark.parametrize(
    "case,dtype",
    _with_dtypes(
        MHA_CASES,
        [c[0] for c in MHA_CASES],
        lambda c: any(w in c[0] for w in ("batch_first", "kdim/vdim, right", "is_causal +")),
    ),
)
def test_multihead_attention_matches_torch(case, dtype):
    name, kwargs, inputs, call = case
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(E, H, **kwargs).eval()
    with torch.no_grad():  # non-zero biases so they are tested too
        for n, p in ref.named_parameters():
            if "bias" in n:
                p.normal_()
    ours = MultiheadAttention(E, H, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's mismatched-mask-type deprecation
        check_equivalent(name, ref, ours, inputs, call, dtype)


def test_multihead_attention_same_init_and_state_dict_keys():
    for kwargs in ({}, {"kdim": 12, "vdim": 7, "add_bias_kv": True}, {"bias": False}):
        torch.manual_seed(3)
        ref = nn.MultiheadAttention(E, H, **kwargs)
        torch.manual_seed(3)
        ours = MultiheadAttention(E, H, **kwargs)
        assert isinstance(ours, nn.MultiheadAttention)
        a, b = ref.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


class _RunSpy:
    """Records the canonical-form arguments of every pyfastattn attention call."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = pfa_functional._run

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(pfa_functional, "_run", spy)


def test_key_padding_mask_maps_to_seqused_k_when_exact(monkeypatch):
    spy = _RunSpy(monkeypatch)
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(N, L, E)
    right = _right_pad(N, L, [L, 2, 4])
    float_right = torch.zeros(N, L).masked_fill(right, float("-inf"))
    holes = right.clone()
    holes[0, 1] = True
    left = right.flip(-1)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with pyfastattn.backend("kernel"):
        m(x, x, x, key_padding_mask=right, need_weights=False)
        m(x, x, x, key_padding_mask=float_right, need_weights=False)
        m(x, x, x, key_padding_mask=right, attn_mask=causal, is_causal=True, need_weights=False)
        m(x, x, x, key_padding_mask=right, attn_mask=causal, need_weights=False)
        m(x, x, x, key_padding_mask=holes, need_weights=False)
        m(x, x, x, key_padding_mask=left, need_weights=False)
        m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    lengths = torch.tensor([L, 2, 4], dtype=torch.int32)
    c = spy.calls
    assert len(c) == 7
    for i in (0, 1, 2, 3):
        assert torch.equal(c[i]["seqused_k"], lengths), i
    assert c[0]["attn_mask"] is None and c[1]["attn_mask"] is None
    assert c[2]["attn_mask"] is None and c[2]["window_right"] == 0 and not c[2]["bottom_right"]
    assert (
        c[3]["attn_mask"] is not None and c[3]["window_right"] == -1
    )  # a mask without the hint stays a mask
    for i in (4, 5):  # not right padding: a broadcast (N, 1, 1, S) mask
        assert c[i]["seqused_k"] is None and tuple(c[i]["attn_mask"].shape) == (N, 1, 1, L), i
    assert c[6]["attn_mask"] is None and c[6]["seqused_k"] is None and c[6]["window_right"] == 0


def test_key_padding_mask_under_inference_mode():
    """torch.inference_mode (the usual way to serve a model): a padding mask
    made there has no version counter. The layers must still run, match
    torch, and see a mask changed in place between calls (no stale lengths)."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()
    ours = TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    with torch.inference_mode():
        x = torch.randn(N, L, E)
        kpm = _right_pad(N, L, [L, 2, 4])
        for step in range(2):
            if step:
                kpm[:, 1:] = True  # in place: every sequence now has one key
            want = ref.self_attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            got = ours.self_attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
            want = ref(x, src_key_padding_mask=kpm)
            got = ours(x, src_key_padding_mask=kpm)
            valid = ~kpm  # torch's nested path leaves padded rows unspecified
            torch.testing.assert_close(got[valid], want[valid], rtol=2e-5, atol=2e-5)


def test_mask_memo_stays_bounded():
    """The per-mask memo of right-padding lengths keeps at most its size of
    entries (oldest out) and answers every mask right."""
    from pyfastattn.nn import attention as pfa_attention

    masks = [_right_pad(2, 40, [40, 1 + i % 39]) for i in range(3 * pfa_attention._MASK_MEMO_SIZE)]
    for i, m in enumerate(masks):
        assert pfa_attention.right_padding_lengths(m).tolist() == [40, 1 + i % 39]
        assert len(pfa_attention._MASK_MEMO) <= pfa_attention._MASK_MEMO_SIZE
    for i in (0, len(masks) - 1):  # an evicted mask and a cached one, asked again
        assert pfa_attention.right_padding_lengths(masks[i]).tolist() == [40, 1 + i % 39]


class _SelfAttention(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x, kpm):
        return self.mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]


def test_jit_trace_keeps_the_padding_mask_an_input():
    """torch.jit.trace with a right-padding key_padding_mask: the traced model
    must honour whatever mask it is given later (holes, left padding), not
    the key lengths derived from the example mask."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = MultiheadAttention(E, H, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, L, E)
    right = _right_pad(N, L, [L, 2, 4])
    holes = right.clone()
    holes[0, 1] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_SelfAttention(ours), (x, right))
        for kpm in (right, holes, right.flip(-1)):
            want = _SelfAttention(ref)(x, kpm)
            torch.testing.assert_close(traced(x, kpm), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_without_keys(need_weights):
    """Cross-attention to an empty memory (S = 0), as torch allows: the
    attention is 0, so the output is out_proj's bias; weights (N, L, 0)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiheadAttention(E, H, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    q, kv = torch.randn(N, L, E), torch.randn(N, 0, E)
    out, w = ours(q, kv, kv, need_weights=need_weights)
    want, want_w = ref(q, kv, kv, need_weights=need_weights)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, ref.out_proj.bias.expand(N, L, E))
    assert (w is None) == (want_w is None)
    if w is not None:
        assert w.shape == want_w.shape == (N, L, 0)


def test_multihead_attention_dropout_only_in_training():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dropout=0.5)
    ours = MultiheadAttention(E, H, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(L, N, E)
    ref.eval(), ours.eval()
    a = ours(x, x, x, need_weights=False)[0]
    assert_tolerance("eval", a, ref.double()(x.double(), x.double(), x.double())[0], None, torch.float32)
    ours.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dropout runs on the reference path
        b = ours(x, x, x, need_weights=False)[0]
        c = ours(x, x, x, need_weights=False)[0]
        _, w = ours(x, x, x)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)
    # returned weights carry the dropout, as torch's do: some zeros, survivors scaled by 2
    assert (w == 0).any()


def _same_error(make_torch, make_ours):
    with pytest.raises(Exception) as torch_err:
        make_torch()
    with pytest.raises(torch_err.type) as our_err:
        make_ours()
    assert str(our_err.value), "error without a message"


def _bad_mha_inputs():
    x = torch.randn(L, N, E)
    yield "int attn_mask", {"attn_mask": torch.zeros(L, L, dtype=torch.int64)}
    yield "int key_padding_mask", {"key_padding_mask": torch.zeros(N, L, dtype=torch.int32)}
    yield "float64 attn_mask", {"attn_mask": torch.zeros(L, L, dtype=torch.float64), "need_weights": False}
    yield "2-D attn_mask wrong shape", {"attn_mask": torch.zeros(L - 1, L, dtype=torch.bool)}
    yield "3-D attn_mask wrong shape", {"attn_mask": torch.zeros(N, L, L, dtype=torch.bool)}
    yield "4-D attn_mask", {"attn_mask": torch.zeros(1, 1, L, L, dtype=torch.bool)}
    yield "key_padding_mask wrong length", {"key_padding_mask": torch.zeros(N, L + 1, dtype=torch.bool)}
    yield "key_padding_mask wrong batch", {"key_padding_mask": torch.zeros(N + 1, L, dtype=torch.bool)}
    yield "3-D key_padding_mask", {"key_padding_mask": torch.zeros(N, L, 1, dtype=torch.bool)}
    yield "is_causal without a mask", {"is_causal": True}
    yield "query of the wrong width", {"query": torch.randn(L, N, E + 1)}
    yield "4-D query", {"query": x[None]}
    yield "unbatched, bad (H, L, S) mask", {"query": x[:, 0], "attn_mask": torch.zeros(H + 1, L, L)}


@pytest.mark.parametrize("case", list(_bad_mha_inputs()), ids=lambda c: c[0])
def test_multihead_attention_bad_input_same_error_class(case):
    _, kw = case
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H)
    ours = MultiheadAttention(E, H)
    x = kw.pop("query", torch.randn(L, N, E))
    kv = x if x.dim() != 4 else x
    _same_error(lambda: ref(x, kv, kv, **kw), lambda: ours(x, kv, kv, **kw))


def test_embed_dim_not_divisible_same_error_class():
    _same_error(lambda: nn.MultiheadAttention(10, 3), lambda: MultiheadAttention(10, 3))
    _same_error(lambda: nn.TransformerEncoderLayer(10, 3), lambda: TransformerEncoderLayer(10, 3))
    _same_error(lambda: nn.TransformerDecoderLayer(10, 3), lambda: TransformerDecoderLayer(10, 3))
    _same_error(lambda: nn.Transformer(10, 3), lambda: Transformer(10, 3))
    with pytest.raises(AssertionError, match="divisible.*10.*3"):
        MultiheadAttention(10, 3)


def test_bad_activation_same_error_class():
    _same_error(
        lambda: nn.TransformerEncoderLayer(E, H, activation="tanh"),
        lambda: TransformerEncoderLayer(E, H, activation="tanh"),
    )


# ---------------------------------------------------------------------------
# Encoder / decoder layers
# ---------------------------------------------------------------------------


def _leaky(x):
    return F.leaky_relu(x, 0.1)


_ENCODER_LAYER_CASES = [
    ("relu, seq-first", {}, "none"),
    ("gelu string, batch_first, right-padding kpm", {"activation": "gelu", "batch_first": True}, "kpm"),
    ("F.gelu, norm_first, causal mask + is_causal", {"activation": F.gelu, "norm_first": True}, "causal"),
    (
        "nn.GELU(tanh), bias=False, float mask + kpm",
        {"activation": nn.GELU(approximate="tanh"), "bias": False},
        "both",
    ),
    ("F.silu, unbatched", {"activation": F.silu}, "unbatched"),
    ("custom callable, batch_first, kpm with holes", {"activation": _leaky, "batch_first": True}, "holes"),
    ("nn.ReLU module, training without dropout", {"activation": nn.ReLU(), "dropout": 0.0}, "train"),
]


def _encoder_inputs(kind: str, batch_first: bool):
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    t = {"src": x}
    if kind == "kpm":
        t["src_key_padding_mask"] = _right_pad(N, L, [L, 3, 5])
    elif kind == "causal":
        t["src_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
    elif kind == "both":
        t["src_mask"] = torch.randn(L, L)
        t["src_key_padding_mask"] = _right_pad(N, L, [4, L, 2])
    elif kind == "unbatched":
        t = {"src": torch.randn(L, E), "src_key_padding_mask": torch.arange(L) >= 5}
    elif kind == "holes":
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, 1] = kpm[2, 3:5] = True
        t["src_key_padding_mask"] = kpm
    return t


@pytest.mark.parametrize(
    "case,dtype",
    _with_dtypes(
        _ENCODER_LAYER_CASES, [c[0] for c in _ENCODER_LAYER_CASES], lambda c: c[2] in ("kpm", "causal")
    ),
)
def test_encoder_layer_matches_torch(case, dtype):
    name, kwargs, kind = case
    torch.manual_seed(2)
    ref = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, **kwargs)
    ref.train(kind == "train")
    ours = TransformerEncoderLayer(E, H, dim_feedforward=24, **kwargs)
    inputs = _encoder_inputs(kind, kwargs.get("batch_first", False))

    def call(m, t):
        return m(
            t["src"],
            src_mask=t.get("src_mask"),
            src_key_padding_mask=t.get("src_key_padding_mask"),
            is_causal=kind == "causal",
        )

    check_equivalent(name, ref, ours, inputs, call, dtype)


_DECODER_LAYER_CASES = [
    ("relu, seq-first, causal tgt + memory kpm", {}, True),
    ("gelu, batch_first, norm_first", {"activation": "gelu", "batch_first": True, "norm_first": True}, True),
    ("custom callable, bias=False, no masks", {"activation": _leaky, "bias": False}, False),
]


@pytest.mark.parametrize(
    "case,dtype", _with_dtypes(_DECODER_LAYER_CASES, [c[0] for c in _DECODER_LAYER_CASES], lambda c: c[2])
)
def test_decoder_layer_matches_torch(case, dtype):
    name, kwargs, masked = case
    torch.manual_seed(4)
    ref = nn.TransformerDecoderLayer(E, H, dim_feedforward=24, **kwargs).eval()
    ours = TransformerDecoderLayer(E, H, dim_feedforward=24, **kwargs)
    bf = kwargs.get("batch_first", False)
    inputs = {
        "tgt": torch.randn(N, L, E) if bf else torch.randn(L, N, E),
        "memory": torch.randn(N, S, E) if bf else torch.randn(S, N, E),
    }
    if masked:
        inputs["tgt_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        inputs["memory_key_padding_mask"] = _right_pad(N, S, [S, 5, 2])
        inputs["tgt_key_padding_mask"] = _right_pad(N, L, [L, L, 4])

    def call(m, t):
        return m(
            t["tgt"],
            t["memory"],
            tgt_mask=t.get("tgt_mask"),
            tgt_key_padding_mask=t.get("tgt_key_padding_mask"),
            memory_key_padding_mask=t.get("memory_key_padding_mask"),
            tgt_is_causal=masked,
        )

    check_equivalent(name, ref, ours, inputs, call, dtype)


def test_layer_dropout_only_in_training():
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.3)
    x = torch.randn(L, N, E)
    ours.eval()
    a, b = ours(x), ours(x)
    assert torch.equal(a, b)
    ours.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        c, d = ours(x), ours(x)
    assert not torch.allclose(c, d) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------
# Stacks and the full Transformer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encoder_stack_inference_matches_torch_nested_path(dtype):
    """Eval + no_grad + right padding: torch runs on NestedTensor and returns
    zeros (then the final norm) at padded positions; so must we."""
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E)).eval()
    ours = TransformerEncoder(
        TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True), 2, norm=nn.LayerNorm(E)
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(N, L, E)
    kpm = _right_pad(N, L, [L, 2, 4])
    with torch.no_grad():
        r = copy.deepcopy(ref).double()(x.double(), src_key_padding_mask=kpm)
        b = copy.deepcopy(ref).to(dtype)(x.to(dtype), src_key_padding_mask=kpm)
        with pyfastattn.backend("kernel"):
            o = ours.to(dtype)(x.to(dtype), src_key_padding_mask=kpm)
    assert_tolerance("encoder stack, nested path", o, r, b, dtype)


def test_encoder_stack_nested_path_with_a_soft_float_padding_mask():
    """Where torch's encoder runs on NestedTensor (eval, no_grad, padding
    mask), a float src_key_padding_mask marks padding by being nonzero: a
    key with a finite negative bias (-2, or -1e4 as many codebases write it)
    is dropped, not added to. The padding mask means the same for us there."""
    torch.manual_seed(5)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, batch_first=True), 2
    ).eval()
    ours = TransformerEncoder(
        TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, batch_first=True), 2
    ).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, L, E)
    soft = torch.zeros(N, L)
    soft[0, L - 1] = -2.0
    soft[1, 3:] = -1e4
    with torch.no_grad():
        want = ref(x, src_key_padding_mask=soft)
        got = ours(x, src_key_padding_mask=soft)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_encoder_converts_given_torch_layers():
    enc = TransformerEncoder(nn.TransformerEncoderLayer(E, H), 2, enable_nested_tensor=False)
    assert all(type(m) is TransformerEncoderLayer for m in enc.layers)
    assert all(type(m.self_attn) is MultiheadAttention for m in enc.layers)
    dec = TransformerDecoder(nn.TransformerDecoderLayer(E, H), 2)
    assert all(type(m) is TransformerDecoderLayer for m in dec.layers)


_TRANSFORMER_KW = {
    "d_model": E,
    "nhead": H,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "dim_feedforward": 24,
}


@pytest.mark.parametrize(
    "batch_first,dtype", _with_dtypes([False, True], ["seq-first", "batch_first"], lambda bf: bf)
)
def test_transformer_matches_torch(batch_first, dtype):
    torch.manual_seed(6)
    ref = nn.Transformer(**_TRANSFORMER_KW, batch_first=batch_first).eval()
    ours = Transformer(**_TRANSFORMER_KW, batch_first=batch_first)
    T = 5

    def seq(n):
        return torch.randn(N, n, E) if batch_first else torch.randn(n, N, E)

    inputs = {
        "src": seq(S),
        "tgt": seq(T),
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(T),
        "src_key_padding_mask": _right_pad(N, S, [S, 6, 3]),
        "memory_key_padding_mask": _right_pad(N, S, [S, 6, 3]),
    }

    def call(m, t):
        return m(
            t["src"],
            t["tgt"],
            tgt_mask=t["tgt_mask"],
            src_key_padding_mask=t["src_key_padding_mask"],
            memory_key_padding_mask=t["memory_key_padding_mask"],
        )

    check_equivalent("Transformer", ref, ours, inputs, call, dtype)


def test_transformer_same_init_keys_and_classes():
    torch.manual_seed(7)
    ref = nn.Transformer(**_TRANSFORMER_KW)
    torch.manual_seed(7)
    ours = Transformer(**_TRANSFORMER_KW)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert type(ours.encoder) is TransformerEncoder and type(ours.decoder) is TransformerDecoder
    assert sum(type(m) is MultiheadAttention for m in ours.modules()) == 2 + 2 * 2
    for sz in (1, 5):
        assert torch.equal(
            Transformer.generate_square_subsequent_mask(sz),
            nn.Transformer.generate_square_subsequent_mask(sz),
        )
    # custom encoder/decoder are used as given
    custom = nn.Identity()
    t = Transformer(**_TRANSFORMER_KW, custom_encoder=custom)
    assert t.encoder is custom and type(t.decoder) is TransformerDecoder


def test_transformer_bad_input_same_error_class():
    torch.manual_seed(0)
    ref, ours = nn.Transformer(**_TRANSFORMER_KW), Transformer(**_TRANSFORMER_KW)
    src, tgt = torch.randn(S, N, E), torch.randn(L, N + 1, E)
    _same_error(lambda: ref(src, tgt), lambda: ours(src, tgt))
    tgt = torch.randn(L, N, E)
    bad = torch.zeros(L, L + 1)
    _same_error(lambda: ref(src, tgt, tgt_mask=bad), lambda: ours(src, tgt, tgt_mask=bad))


# ---------------------------------------------------------------------------
# The fused FFN, torch.compile
# ---------------------------------------------------------------------------


def test_ffn_block_uses_fused_feed_forward(monkeypatch):
    ffn = pytest.importorskip("pyfastattn.ffn")
    calls = []
    real = ffn.feed_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("activation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ffn, "feed_forward", spy)
    x = torch.randn(L, N, E)
    expect = {"relu": "relu", F.gelu: "gelu", nn.GELU(approximate="tanh"): "gelu_tanh", F.silu: "silu"}
    for act, name in expect.items():
        calls.clear()
        TransformerEncoderLayer(E, H, dim_feedforward=24, activation=act).eval()(x)
        assert calls == [name], act
    calls.clear()
    TransformerEncoderLayer(E, H, dim_feedforward=24, activation=_leaky).eval()(x)
    layer = TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.2).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer(x)  # the inner dropout needs the unfused block
    layer.eval()
    layer.linear1.register_forward_hook(lambda *a: None)
    layer(x)  # a hook on linear1 must still fire
    assert calls == []


def test_encoder_layer_under_autocast():
    torch.manual_seed(9)
    ref = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True).eval()
    ours = TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, L, E)
    kpm = _right_pad(N, L, [L, 3, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x, src_key_padding_mask=kpm)
        got = ours(x, src_key_padding_mask=kpm)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_compile_encoder_layer():
    torch.manual_seed(8)
    layer = TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True).eval()
    x = torch.randn(N, L, E, requires_grad=True)
    kpm = _right_pad(N, L, [L, 3, 5])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with pyfastattn.backend("kernel"):
        want = layer(x, src_key_padding_mask=kpm)
        got = compiled(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
