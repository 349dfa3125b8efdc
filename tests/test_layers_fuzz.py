"""Randomized differential tests of the drop-in modules as user code swaps them
in: ``pyfastattn.nn.MultiheadAttention``, the Transformer layers and stacks
(built directly or by ``pyfastattn.patch``) and ``pyfastattn.linear``, each
against its ``torch.nn`` / ``F.linear`` original with the same weights.

The truth is the torch module in float64; pyfastattn runs in float64 and
float32 (the kernels' dtype), held to the tolerance rule of
pyfastattn.testing with plain torch in the same dtype as the baseline.
Cases draw the corners real code reaches: batch_first on and off, unbatched
inputs, kdim/vdim, bias, add_bias_kv, add_zero_attn, key padding masks (bool
and float, right padding, holes), attention masks (2-D / 3-D, bool / float,
a row that masks every key), the is_causal hint, need_weights and
average_attn_weights, cross-attention with L != S, shared key/value tensors,
train and eval, gradients, and calls under torch.no_grad and
torch.inference_mode (masks made there too); for the layers norm_first,
activations (strings, functions, modules, a lambda), layer_norm_eps,
bias=False, enable_nested_tensor and padding masks. Training with dropout
is left out: the kernel draws its own keep pattern (README, known limits).

A fixed seed per case: ``-k "mha and 17"`` reruns one.
PYFASTATTN_LAYERS_FUZZ_CASES=N runs N cases of each kind,
PYFASTATTN_LAYERS_FUZZ_SEED=S another draw of them.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastattn
from pyfastattn.testing import tolerance_failure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEFAULT_CASES = (60, 40, 24)
_n = os.environ.get("PYFASTATTN_LAYERS_FUZZ_CASES")
N_MHA, N_LAYERS, N_LINEAR = DEFAULT_CASES if _n is None else (int(_n),) * 3
SEED = int(os.environ.get("PYFASTATTN_LAYERS_FUZZ_SEED", 0)) * 100_000

DTYPES = (torch.float64, torch.float32)


def _grad_mode(ctx: str):
    return {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[ctx]()


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Weights far from their initialisation (zero biases would hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return module


def _check_all(name, got, want, base, dt, fails):
    """Tolerance rule on each pair; a None on one side only is a failure."""
    for i, (a, w, b) in enumerate(zip(got, want, base)):
        if (a is None) != (w is None):
            fails.append(f"{name} {i}: None on one side only")
        elif a is not None:
            f = tolerance_failure(
                f"{name} {i}", a.detach(), w.detach(), None if b is None else b.detach(), dt
            )
            if f:
                fails.append(f)


# ---------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------


def _draw_mha(rng):
    h = rng.choice([1, 2, 3, 4])
    e = h * rng.choice([4, 5, 8, 16])
    cross = rng.random() < 0.5
    c = dict(
        E=e, H=h, cross=cross, bias=rng.random() < 0.7, add_bias_kv=rng.random() < 0.25,
        add_zero_attn=rng.random() < 0.25, batch_first=rng.random() < 0.5, batched=rng.random() < 0.8,
        kdim=None, vdim=None, N=rng.choice([1, 2, 3]), L=rng.choice([1, 2, 5, 17]), S=rng.choice([1, 3, 7, 17]),
        shared_kv=rng.random() < 0.5,
        kpm=rng.choice([None, "bool_right", "bool_holes", "float_right", "float_rand"]),
        am=rng.choice([None, "2d_bool", "2d_float", "3d_bool", "3d_float", "2d_neginf_row"]),
        is_causal=rng.random() < 0.25, need_weights=rng.random() < 0.4, avg=rng.random() < 0.5,
        train=rng.random() < 0.3, ctx=rng.choice(["grad", "grad", "no_grad", "inference"]),
        seed=rng.randrange(1 << 30),
    )  # fmt: skip
    c["dropout"] = 0.0 if c["train"] else rng.choice([0.0, 0.3])  # eval ignores it
    if cross and rng.random() < 0.4:
        c["kdim"] = e + 3
        c["vdim"] = rng.choice([e + 3, e + 1])
    if not cross or c["is_causal"]:
        c["S"] = c["L"]
    if c["is_causal"]:
        c["am"] = "causal"
    return c


def _mha_inputs(c):
    """query, key, value (float64, the caller's layout), key_padding_mask, attn_mask."""
    g = torch.Generator().manual_seed(c["seed"])
    n, lq, s, e = c["N"], c["L"], c["S"], c["E"]

    def seq(length, dim):
        x = torch.randn(n, length, dim, generator=g, dtype=torch.float64)
        if not c["batch_first"]:
            x = x.transpose(0, 1).contiguous()
        return x if c["batched"] else (x[0] if c["batch_first"] else x[:, 0])

    q = seq(lq, e)
    if c["cross"]:
        k = seq(s, c["kdim"] or e)
        v = k if c["shared_kv"] and c["kdim"] == c["vdim"] else seq(s, c["vdim"] or e)
    else:
        k = v = q
    nb = n if c["batched"] else 1
    kpm = None
    if c["kpm"]:
        pad = torch.arange(s) >= torch.randint(1, s + 1, (nb, 1), generator=g)
        if c["kpm"] == "bool_holes":
            pad = torch.rand(nb, s, generator=g) < 0.3
            pad[:, 0] = False
        kpm = pad
        if c["kpm"].startswith("float"):
            kpm = torch.zeros(nb, s, dtype=torch.float64).masked_fill(pad, float("-inf"))
            if c["kpm"] == "float_rand":
                kpm = kpm + torch.randn(nb, s, generator=g, dtype=torch.float64)
        if not c["batched"]:
            kpm = kpm[0]
    am = None
    if c["am"] == "causal":
        am = nn.Transformer.generate_square_subsequent_mask(lq, dtype=torch.float64)
        if c["seed"] % 2:
            am = am.isinf()
    elif c["am"]:
        shape = (lq, s) if c["am"].startswith("2d") else (nb * c["H"], lq, s)
        if "bool" in c["am"]:
            am = torch.rand(*shape, generator=g) < 0.3
            am[..., 0] = False
        else:
            am = torch.randn(*shape, generator=g, dtype=torch.float64)
            if c["am"] == "2d_neginf_row":
                am[0] = float("-inf")
    return q, k, v, kpm, am


def _mha_pair(c, dt):
    torch.manual_seed(c["seed"])
    kw = dict(dropout=c["dropout"], bias=c["bias"], add_bias_kv=c["add_bias_kv"], add_zero_attn=c["add_zero_attn"],
              kdim=c["kdim"], vdim=c["vdim"], batch_first=c["batch_first"], dtype=torch.float64)  # fmt: skip
    ref = _perturbed(nn.MultiheadAttention(c["E"], c["H"], **kw), c["seed"])
    ours = pyfastattn.nn.MultiheadAttention(c["E"], c["H"], **kw)
    ours.load_state_dict(ref.state_dict())
    return ref.to(dt).train(c["train"]), ours.to(dt).train(c["train"])


def _mha_call(m, c, dt, tensors, need_weights):
    """One forward (and backward with ctx 'grad') in dtype ``dt`` -> [out, weights, *grads]."""
    q, k, v, kpm, am = tensors
    with _grad_mode(c["ctx"]):
        # cast inside the mode: under inference_mode the masks are inference tensors
        cast = [
            None if t is None else (t.to(dt) if t.is_floating_point() else t.clone())
            for t in (q, k, v, kpm, am)
        ]
        q2, k2, v2, kpm2, am2 = cast
        if c["ctx"] == "grad":
            q2.requires_grad_()
            k2.requires_grad_()
            v2.requires_grad_()
        if v is k:
            v2 = k2
        if not c["cross"]:
            k2 = v2 = q2
        out, w = m(q2, k2, v2, key_padding_mask=kpm2, need_weights=need_weights, attn_mask=am2,
                   average_attn_weights=c["avg"], is_causal=c["is_causal"])  # fmt: skip
        res = [out, w]
        if c["ctx"] == "grad":
            leaves = list({id(t): t for t in (q2, k2, v2)}.values()) + list(m.parameters())
            dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            res += torch.autograd.grad(out, leaves, dy, allow_unused=True)
    return res


@pytest.mark.parametrize("case", range(N_MHA))
def test_mha_against_torch_float64(case):
    c = _draw_mha(random.Random(SEED + case))
    tensors = _mha_inputs(c)
    ref64, _ = _mha_pair(c, torch.float64)
    try:
        truth = _mha_call(ref64, c, torch.float64, tensors, c["need_weights"])
    except (RuntimeError, AssertionError):
        pytest.skip("torch rejects this combination")
    nan_rows = torch.isnan(truth[0])
    if nan_rows.any():
        # torch's need_weights path gives NaN to a query row that sees no key;
        # its need_weights=False path gives it 0 attention (out = out_proj.bias), as
        # pyfastattn does (documented). Its gradients are NaN: not compared.
        plain = _mha_call(ref64, dict(c, ctx="no_grad"), torch.float64, tensors, need_weights=False)[0]
        truth = [torch.where(nan_rows, plain, truth[0]), truth[1].nan_to_num(0.0)]
    fails = []
    for dt in DTYPES:
        ref, ours = _mha_pair(c, dt)
        got = _mha_call(ours, c, dt, tensors, c["need_weights"])
        base = _mha_call(ref, c, dt, tensors, c["need_weights"])[: len(truth)]
        base = [None if b is None or torch.isnan(b).any() else b for b in base]
        _check_all(f"{dt}", got[: len(truth)], truth, base, dt, fails)
    assert not fails, f"{c}\n" + "\n".join(fails[:6])


# ---------------------------------------------------------------------------
# Transformer layers and stacks, built directly or by patch()
# ---------------------------------------------------------------------------

_ACTIVATIONS = {
    "relu": lambda: "relu", "gelu": lambda: "gelu", "F.gelu": lambda: F.gelu, "F.silu": lambda: F.silu,
    "nn.ReLU": nn.ReLU, "nn.SiLU": nn.SiLU, "nn.GELU": nn.GELU, "lambda": lambda: (lambda x: torch.tanh(x) * 1.5),
}  # fmt: skip


def _draw_layers(rng):
    h = rng.choice([1, 2, 4])
    c = dict(
        kind=rng.choice(["enc_layer", "dec_layer", "encoder", "decoder", "transformer"]),
        via=rng.choice(["ours", "patch"]), E=h * rng.choice([4, 8, 16]), H=h, FF=rng.choice([8, 32, 96]),
        act=rng.choice(sorted(_ACTIVATIONS)), eps=rng.choice([1e-5, 1e-3]), batch_first=rng.random() < 0.6,
        norm_first=rng.random() < 0.4, bias=rng.random() < 0.8, train=rng.random() < 0.3,
        nested=rng.random() < 0.6, final_norm=rng.random() < 0.5, layers=rng.choice([1, 2]),
        N=rng.choice([1, 2, 3]), S=rng.choice([1, 4, 9]), T=rng.choice([1, 3, 7]), batched=rng.random() < 0.85,
        kpm=rng.choice([None, "right", "holes", "float", "soft"]), mkpm=rng.choice([None, "right"]),
        mask=rng.choice([None, "causal", "causal_bool", "rand_float"]), tmask=rng.choice([None, "causal"]),
        is_causal=rng.choice([None, True, False]), ctx=rng.choice(["grad", "no_grad", "inference"]),
        seed=rng.randrange(1 << 30),
    )  # fmt: skip
    c["dropout"] = 0.0 if c["train"] else rng.choice([0.0, 0.2])
    return c


def _layers_model(c, dt, ns):
    torch.manual_seed(c["seed"])
    kw = dict(dim_feedforward=c["FF"], dropout=c["dropout"], activation=_ACTIVATIONS[c["act"]](),
              layer_norm_eps=c["eps"], batch_first=c["batch_first"], norm_first=c["norm_first"], bias=c["bias"],
              dtype=torch.float64)  # fmt: skip
    e, h = c["E"], c["H"]
    norm = nn.LayerNorm(e, dtype=torch.float64) if c["final_norm"] else None
    if c["kind"] == "enc_layer":
        m = ns.TransformerEncoderLayer(e, h, **kw)
    elif c["kind"] == "dec_layer":
        m = ns.TransformerDecoderLayer(e, h, **kw)
    elif c["kind"] == "encoder":
        m = ns.TransformerEncoder(ns.TransformerEncoderLayer(e, h, **kw), c["layers"], norm=norm,
                                  enable_nested_tensor=c["nested"])  # fmt: skip
    elif c["kind"] == "decoder":
        m = ns.TransformerDecoder(ns.TransformerDecoderLayer(e, h, **kw), c["layers"], norm=norm)
    else:
        m = ns.Transformer(e, h, c["layers"], c["layers"], **kw)
    return _perturbed(m, c["seed"]).to(dt).train(c["train"])


def _layers_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    n, e = c["N"], c["E"]
    nb = n if c["batched"] else 1

    def seq(length):
        x = torch.randn(n, length, e, generator=g, dtype=torch.float64)
        if not c["batched"]:
            return x[0]
        return x if c["batch_first"] else x.transpose(0, 1).contiguous()

    def kpm(kind, length):
        if kind is None:
            return None
        pad = torch.arange(length) >= torch.randint(1, length + 1, (nb, 1), generator=g)
        if kind == "holes":
            pad = torch.rand(nb, length, generator=g) < 0.3
            pad[:, 0] = False
        m = pad
        if kind in ("float", "soft"):
            # soft: padding written as -1e4, as many codebases do. (A soft bias such as
            # -2 is not drawn: torch's eval fast paths treat any nonzero float as padding,
            # its other paths add it; pyfastattn adds it, except where the encoder
            # reproduces torch's NestedTensor path.)
            fill = float("-inf") if kind == "float" else -1e4
            m = torch.zeros(nb, length, dtype=torch.float64).masked_fill(pad, fill)
        return m if c["batched"] else m[0]

    def square(kind, length):
        if kind is None:
            return None
        if kind == "causal":
            return nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
        if kind == "causal_bool":
            return torch.ones(length, length, dtype=torch.bool).triu(1)
        return torch.randn(length, length, generator=g, dtype=torch.float64)

    return dict(src=seq(c["S"]), tgt=seq(c["T"]), kpm=kpm(c["kpm"], c["S"]), tkpm=kpm(c["kpm"], c["T"]),
                mkpm=kpm(c["mkpm"], c["S"]), mask=square(c["mask"], c["S"]), tmask=square(c["tmask"], c["T"]))  # fmt: skip


def _layers_call(m, c, dt, a):
    with _grad_mode(c["ctx"]):
        a = {
            k: None if t is None else (t.to(dt) if t.is_floating_point() else t.clone()) for k, t in a.items()
        }
        if c["ctx"] == "grad":
            a["src"].requires_grad_()
            a["tgt"].requires_grad_()
        causal_mask = c["mask"] in ("causal", "causal_bool")
        kind = c["kind"]
        if kind == "enc_layer":  # torch requires a mask with the hint
            out = m(a["src"], src_mask=a["mask"], src_key_padding_mask=a["kpm"],
                    is_causal=bool(c["is_causal"]) and causal_mask)  # fmt: skip
        elif kind == "encoder":
            out = m(a["src"], mask=a["mask"], src_key_padding_mask=a["kpm"],
                    is_causal=c["is_causal"] if causal_mask else None)  # fmt: skip
        elif kind in ("dec_layer", "decoder"):
            out = m(a["tgt"], a["src"], tgt_mask=a["tmask"], tgt_key_padding_mask=a["tkpm"],
                    memory_key_padding_mask=a["mkpm"], tgt_is_causal=bool(c["is_causal"]) and a["tmask"] is not None)  # fmt: skip
        else:
            out = m(a["src"], a["tgt"], src_mask=a["mask"], tgt_mask=a["tmask"], src_key_padding_mask=a["kpm"],
                    tgt_key_padding_mask=a["tkpm"], memory_key_padding_mask=a["mkpm"])  # fmt: skip
        res = [out]
        if c["ctx"] == "grad":
            dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            leaves = [a["src"], a["tgt"], *m.parameters()]
            res += torch.autograd.grad(out.nan_to_num(), leaves, dy, allow_unused=True)
    return res


@pytest.mark.parametrize("case", range(N_LAYERS))
def test_layers_against_torch_float64(case):
    c = _draw_layers(random.Random(SEED + 10_000 + case))
    if c["act"] == "nn.GELU" and c["ctx"] != "grad":
        c["act"] = "gelu"  # nn.GELU('tanh') aside, torch's eval fast path is exact for these
    a = _layers_inputs(c)
    ref64 = _layers_model(c, torch.float64, nn)
    try:
        truth = _layers_call(ref64, c, torch.float64, a)
    except (RuntimeError, AssertionError):
        pytest.skip("torch rejects this combination")
    nan_rows = torch.isnan(truth[0])
    fails = []
    for dt in DTYPES:
        if c["via"] == "ours":
            ours = _layers_model(c, dt, pyfastattn.nn)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = pyfastattn.patch(_layers_model(c, dt, nn))
        got = _layers_call(ours, c, dt, a)
        base = _layers_call(_layers_model(c, dt, nn), c, dt, a)
        # torch gives NaN where a query sees no key in some paths; pyfastattn 0 (documented)
        want = [torch.where(nan_rows, got[0].detach().double(), truth[0])] + truth[1:]
        base[0] = torch.where(nan_rows, got[0].detach().to(dt), base[0])
        if nan_rows.any():  # NaN reached the gradients through the rows above
            want, got, base = want[:1], got[:1], base[:1]
        base = [None if b is None or torch.isnan(b).any() else b for b in base]
        _check_all(f"{dt}", got, want, base, dt, fails)
    assert not fails, f"{c}\n" + "\n".join(fails[:6])


# ---------------------------------------------------------------------------
# pyfastattn.linear against F.linear, around the own GEMM's thresholds
# ---------------------------------------------------------------------------


def _draw_linear(rng):
    c = dict(
        # the own GEMM takes fp32 from 32 rows, fp16 from 8, and >= 2M multiply-adds
        rows=rng.choice([1, 7, 8, 9, 31, 32, 33, 64, 97]), k=rng.choice([1, 17, 129, 1024, 1024]),
        n=rng.choice([1, 520, 2048, 2048]), lead=rng.choice([(), (), (2,), (2, 3)]),
        dtype=rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
        bias=rng.choice(["full", "full", None, "one"]), layout=rng.choice(["contig", "x_t", "w_t", "x_step"]),
        req=rng.choice([(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 1, 1)]), inplace=rng.random() < 0.3,
        seed=rng.randrange(1 << 30),
    )  # fmt: skip
    return c


@pytest.mark.parametrize("case", range(N_LINEAR))
def test_linear_against_f_linear_float64(case):
    c = _draw_linear(random.Random(SEED + 20_000 + case))
    g = torch.Generator().manual_seed(c["seed"])
    dt, k, n = c["dtype"], c["k"], c["n"]
    x = torch.randn(*c["lead"], c["rows"], k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = {None: None, "full": torch.randn(n, generator=g, dtype=torch.float64),
         "one": torch.randn(1, generator=g, dtype=torch.float64)}[c["bias"]]  # fmt: skip
    dy = torch.randn(*x.shape[:-1], n, generator=g, dtype=torch.float64)

    def run(fn, dtype):
        xx = x.to(dtype)
        ww = w.to(dtype)
        if c["layout"] == "x_t":
            xx = xx.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif c["layout"] == "w_t":
            ww = ww.t().contiguous().t()
        elif c["layout"] == "x_step":
            xx = torch.stack([xx, xx], -1)[..., 0]
        ts = [xx, ww, None if b is None else b.to(dtype)]
        for t, r in zip(ts, c["req"]):
            if t is not None and r:
                t.requires_grad_()
        y = fn(*ts)
        if c["inplace"]:
            y = y.mul_(1.5) if not y.requires_grad or y.grad_fn is not None else y * 1.5
        wrt = [t for t in ts if t is not None and t.requires_grad]
        return [y, *torch.autograd.grad(y, wrt, dy.to(dtype))]

    truth = run(F.linear, torch.float64)
    got, base = run(pyfastattn.linear, dt), run(F.linear, dt)
    fails = []
    _check_all(f"{dt}", got, truth, base, dt, fails)
    assert got[0].dtype == dt
    assert not fails, f"{c}\n" + "\n".join(fails[:6])


def test_case_counts_are_bounded():
    # CI's default must stay well under a minute on one core
    assert sum(DEFAULT_CASES) <= 150
