"""pyfastattn.patch on models written without pyfastattn, the seed example first."""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import warnings

import pytest
import torch
from torch import nn

import pyfastattn
from pyfastattn.nn.attention import MultiheadAttention
from pyfastattn.nn.transformer import Transformer, TransformerDecoderLayer, TransformerEncoderLayer
from pyfastattn.patch import PatchReport, patch

from ._helpers import assert_tolerance

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "seed_transformer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("seed_transformer", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_example_runs_patched():
    ex = _load_example()
    with pyfastattn.backend("kernel"):
        res = ex.main(
            ["--dropout", "0", "--layers", "1", "--d-model", "24", "--nhead", "3", "--src-len", "13"]
        )
    report = res["report"]
    assert len(report.replaced) == 1 + 2 + 1 + 1 + 1 + 2  # Transformer, stacks, layers, 3 attentions
    assert not report.left_alone
    assert torch.isfinite(res["loss"])
    assert all(p.grad is not None for p in res["model"].transformer.parameters())


def test_seed_example_patched_matches_unpatched():
    """The same seed model, patched and not: logits and every gradient within
    the tolerance rule against the unpatched model in float64."""
    ex = _load_example()
    torch.manual_seed(0)
    model = ex.Seq2Seq(vocab=50, d_model=24, nhead=3, layers=2, dim_feedforward=40, dropout=0.0)
    ref = copy.deepcopy(model).double()
    base = copy.deepcopy(model)
    patch(model)
    src, tgt, pad = ex.make_batch(3, 11, 7, 50, "cpu")

    def run(m):
        logits = m(src, tgt, src_key_padding_mask=pad)
        logits.double().mul(torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()
        return logits, {n: p.grad for n, p in m.named_parameters()}

    r, rg = run(ref)
    b, bg = run(base)
    with pyfastattn.backend("kernel"):
        o, og = run(model)
    assert_tolerance("seed logits", o, r, b, torch.float32)
    assert og.keys() == rg.keys()
    for k in rg:
        assert_tolerance(f"seed grad {k}", og[k], rg[k], bg[k], torch.float32)


def test_patch_keeps_identity_weights_device_dtype_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16),
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
        ),
        nn.MultiheadAttention(16, 4, batch_first=True),
    ).to(torch.bfloat16)
    model.train()
    model[1].layers[1].eval()  # a mixed training state must survive
    attn = model[2]
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    hook_calls = []
    attn.register_forward_hook(lambda *a: hook_calls.append(1))

    out = patch(model)
    assert out is model
    assert model[2] is attn and type(attn) is MultiheadAttention
    assert isinstance(attn, nn.MultiheadAttention)
    assert type(model[1].layers[0]) is TransformerEncoderLayer
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    attn(x, x, x, need_weights=False)
    assert hook_calls == [1]


class _CustomAttention(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_patch_report_says_what_and_why():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "plain": nn.MultiheadAttention(8, 2),
            "custom": _CustomAttention(8, 2),
            "scripted": torch.jit.script(nn.MultiheadAttention(8, 2)),
            "layer": nn.TransformerEncoderLayer(8, 2, 16, activation=lambda x: x.tanh()),
        }
    )
    model, report = patch(model, return_report=True)
    assert isinstance(report, PatchReport)
    replaced = {r[0]: r for r in report.replaced}
    assert set(replaced) == {"plain", "layer", "layer.self_attn"}
    assert replaced["plain"][2] == "pyfastattn.nn.attention.MultiheadAttention"
    assert "FFN runs unfused" in replaced["layer"][3]
    left = {r[0]: r[2] for r in report.left_alone}
    assert "subclass" in left["custom"]
    assert "TorchScript" in left["scripted"]
    assert type(model["custom"]) is _CustomAttention
    text = str(report)
    assert "replaced 3 module(s)" in text and "custom" in text and "TorchScript" in text

    # patching again changes nothing and says so
    _, again = patch(model, return_report=True)
    assert not again.replaced
    assert {r[0] for r in again.left_alone if r[2] == "already a pyfastattn module"} == set(replaced)


def test_patch_root_module_and_full_transformer():
    torch.manual_seed(0)
    t = nn.Transformer(8, 2, 1, 1, 16)
    patch(t)
    assert type(t) is Transformer
    assert type(t.decoder.layers[0]) is TransformerDecoderLayer
    assert type(t.decoder.layers[0].multihead_attn) is MultiheadAttention
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch(object())


def test_patch_leaves_hugging_face_models_to_attn_implementation():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = nn.Sequential(transformers.BertModel(cfg))
    _, report = patch(wrapper, return_report=True)
    assert [r[0] for r in report.left_alone] == ["0"]
    assert "attn_implementation" in report.left_alone[0][2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=32,
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
            )
        )
    _, report = patch(lm, return_report=True)
    assert [r[0] for r in report.left_alone] == [""]  # the inner LlamaModel is not listed again


def test_report_ends_with_what_still_runs_unfused():
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
    _, report = pyfastattn.patch(enc, return_report=True)
    last = str(report).splitlines()[-1]
    assert len(report.replaced) == 5  # the encoder, 2 layers, 2 attentions
    assert last.startswith("still unfused: ") and "attention dropout" not in last, last  # fused (issue 17)
    assert "FFN dropout (p=0.1)" in last
    assert "need_weights" not in last  # the layers call their attention with need_weights=False
    enc0 = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2
    )
    _, report0 = pyfastattn.patch(enc0, return_report=True)
    assert str(report0).splitlines()[-1].startswith("still unfused: nothing"), str(report0)
    _, bare = pyfastattn.patch(torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4)), return_report=True)
    assert "need_weights=True" in str(bare).splitlines()[-1]
    _, none = pyfastattn.patch(torch.nn.Linear(3, 3), return_report=True, linear=False)
    assert str(none).splitlines()[-1] == "still unfused: everything (no module was converted)"
    lin, only = pyfastattn.patch(torch.nn.Linear(3, 3), return_report=True)
    assert type(lin) is pyfastattn.nn.Linear and only.linears == 1
    assert (
        str(only).splitlines()[-1]
        == "still unfused: everything (no attention or Transformer module was converted)"
    )


def test_linear_modules_become_pyfastattn_linear():
    """patch turns exact nn.Linear modules into pyfastattn.nn.Linear (same
    parameters, same object), not their subclasses; the model computes the
    same values and gradients; linear=False keeps them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(96, 300),
        torch.nn.GELU(),
        torch.nn.Linear(300, 96),
        torch.nn.MultiheadAttention(96, 4),
    )
    ref = copy.deepcopy(model)
    w0 = model[0].weight
    out = pyfastattn.patch(model)
    assert out is model and model[0].weight is w0
    assert type(model[0]) is pyfastattn.nn.Linear and type(model[2]) is pyfastattn.nn.Linear
    assert isinstance(model[0], torch.nn.Linear)
    # MHA's out_proj is torch's NonDynamicallyQuantizableLinear subclass: left as it is
    assert type(model[3].out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(2, 50, 96, requires_grad=True)
    y = model[2](model[1](model[0](x)))
    yr = ref[2](ref[1](ref[0](x)))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.square().sum(), [x, model[0].weight])
    gr = torch.autograd.grad(yr.square().sum(), [x, ref[0].weight])
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    kept = pyfastattn.patch(copy.deepcopy(ref), linear=False)
    assert type(kept[0]) is torch.nn.Linear


def test_patched_linears_keep_the_transformer_ffn_fused():
    """A Transformer layer's linear1/linear2 turned into pyfastattn.nn.Linear
    still count as plain linears for the fused FFN."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    _, report = pyfastattn.patch(layer, return_report=True)
    assert report.linears == 2 and type(layer.linear1) is pyfastattn.nn.Linear
    assert str(report).splitlines()[-1].startswith("still unfused: nothing"), str(report)


def test_patched_linears_script_and_trace():
    """A model whose nn.Linear modules patch converted still scripts, traces
    and FX-traces (pyfastattn.nn.Linear is F.linear there)."""
    model = pyfastattn.patch(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    )
    assert type(model[0]) is pyfastattn.nn.Linear
    x = torch.randn(40, 64)
    want = model(x)
    for conv in (torch.jit.script, lambda m: torch.jit.trace(m, (x,)), torch.fx.symbolic_trace):
        torch.testing.assert_close(conv(model)(x), want, rtol=1e-5, atol=1e-5)


def test_patched_linear_logs_no_torch_warning(caplog):
    """Calling a patched nn.Linear must not make torch log its
    'is_fx_tracing will return true for both ...' deprecation warning (it did
    on the first call of every process)."""
    from torch.fx import _symbolic_trace

    once = getattr(_symbolic_trace, "is_fx_tracing_warning", None)  # lru_cache'd: logs once per process
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    model = pyfastattn.patch(torch.nn.Sequential(torch.nn.Linear(64, 256)))
    with caplog.at_level("WARNING"):
        model(torch.randn(40, 64))
        torch.fx.symbolic_trace(model)
    assert "is_fx_tracing" not in caplog.text
