"""A patched encoder against the unpatched one: inference and a training step
(forward, ``y.square().mean()``, backward), same inputs, same weights, modes
interleaved round by round.

    python benchmarks/patched_encoder.py [--model torch|hf-bert] [--threads 1] [--dtype float32]
        [--rounds 3] [--layers 4] [--dmodel 768] [--heads 12] [--dff 3072] [--batch 8] [--seq 128]

``--model torch`` (default): ``nn.TransformerEncoder`` of BERT-base-like layers
(post-norm, gelu, dropout 0, batch first), patched with ``pyfastattn.patch``.
``--model hf-bert``: a randomly initialised Hugging Face ``BertModel`` of the
same sizes (needs ``transformers``; no download), its "sdpa" attention against
``attn_implementation="pyfastattn"`` plus ``pyfastattn.patch`` (its
``nn.Linear`` layers).
Everything a patched model runs through pyfastattn is included: the attention
kernel, the FFN op (its fp32 GEMMs on AMD: ``PYFASTATTN_CPU_FFN_GEMM``), the
projections through ``pyfastattn.linear``. One thread: thread CPU time; more:
wall clock. Median of ``--reps`` calls per round, milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import pyfastattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import median_pass_us, print_infer_train_round  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("torch", "hf-bert"), default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dmodel", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dff", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timer = time.thread_time if args.threads == 1 else time.perf_counter
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model == "torch":
        layer = torch.nn.TransformerEncoderLayer(
            args.dmodel, args.heads, args.dff, dropout=0.0, batch_first=True, activation="gelu"
        )
        model = torch.nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False).to(dtype)
        ours = pyfastattn.patch(copy.deepcopy(model))
        x = torch.randn(args.batch, args.seq, args.dmodel, dtype=dtype)
        run = lambda m: m(x)  # noqa: E731
    else:
        import transformers

        import pyfastattn.integrations.transformers as pfa_hf

        pfa_hf.register()
        cfg = transformers.BertConfig(
            hidden_size=args.dmodel,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.dff,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="sdpa",
        )
        model = transformers.BertModel(cfg).to(dtype)
        ours = copy.deepcopy(model)
        ours.set_attn_implementation("pyfastattn")
        ours = pyfastattn.patch(ours)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
        run = lambda m: m(ids).last_hidden_state  # noqa: E731
    print(
        f"# {args.model}: {args.layers} layers d{args.dmodel} h{args.heads} ff{args.dff} B{args.batch} S{args.seq} {args.dtype}, "
        f"{args.threads} thread(s); own GEMM for this dtype: {torch.ops.pyfastattn.ffn_cpu_gemm(dtype)}; "
        f"PYFASTATTN_CPU_FFN_GEMM={os.environ.get('PYFASTATTN_CPU_FFN_GEMM', '')!r}; load {os.getloadavg()[0]:.2f}"
    )

    def infer(m):
        def f():
            with torch.no_grad():
                run(m)

        return f

    def train(m):
        def f():
            m.zero_grad(set_to_none=True)
            run(m).float().square().mean().backward()

        return f

    with torch.no_grad():
        y0, y1 = run(model.eval()), run(ours.eval())
    print(f"# max |patched - unpatched| (eval): {(y0.float() - y1.float()).abs().max().item():.3g}")
    model.train()
    ours.train()

    def median_ms(f) -> float:
        f()  # warm-up
        return median_pass_us([f], timer, args.reps) / 1e3

    for r in range(args.rounds):
        model.eval()
        ours.eval()
        ie, io = median_ms(infer(model)), median_ms(infer(ours))
        model.train()
        ours.train()
        te, to = median_ms(train(model)), median_ms(train(ours))
        print_infer_train_round(r, (ie, io), (te, to))


if __name__ == "__main__":
    main()
