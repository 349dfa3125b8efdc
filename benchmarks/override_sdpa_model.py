"""A model that calls ``torch.nn.functional.scaled_dot_product_attention``
itself, run as it is and under ``pyfastattn.override_sdpa()``: inference and a
training step (forward, ``logits.square().mean()``, backward), same weights,
same inputs, the two interleaved round by round.

    python benchmarks/override_sdpa_model.py [--threads 1] [--dtype float32]
        [--rounds 3] [--reps 3] [--layers 4] [--dmodel 512] [--heads 8]
        [--kv-heads 2] [--dff 1408] [--batch 1] [--seq 2048]

The model: a randomly initialised Hugging Face ``LlamaForCausalLM`` (needs
``transformers``; nothing is downloaded) with ``attn_implementation="sdpa"``,
whose attention is one ``F.scaled_dot_product_attention`` call per layer
(causal, GQA). Nothing else is converted: the projections and the MLP run
as torch runs them, so the ratio is what the one-line override buys a model
of this shape. One thread: thread CPU time; more: wall clock. Median of
``--reps`` calls per round, milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import pyfastattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import median_pass_us, print_infer_train_round  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--dtype", default="float32", help="the model's dtype (float32, bfloat16, float16)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each timing both modes")
    ap.add_argument("--reps", type=int, default=3, help="calls per mode per round (the median is kept)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--dmodel", type=int, default=512, help="hidden size")
    ap.add_argument("--heads", type=int, default=8, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    ap.add_argument("--dff", type=int, default=1408, help="MLP intermediate size")
    ap.add_argument("--batch", type=int, default=1, help="sequences per call")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    timer = time.thread_time if args.threads == 1 else time.perf_counter
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=args.dmodel,
        intermediate_size=args.dff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq),
    )
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    print(
        f"# HF LlamaForCausalLM, {args.layers} layers d{args.dmodel} h{args.heads}/{args.kv_heads} ff{args.dff} "
        f"B{args.batch} S{args.seq} {args.dtype}, {args.threads} thread(s); load {os.getloadavg()[0]:.2f}"
    )

    def infer():
        with torch.no_grad():
            model(ids)

    def train():
        model.zero_grad(set_to_none=True)
        model(ids).logits.float().square().mean().backward()

    def median_ms(f, override: bool) -> float:
        if override:
            with pyfastattn.override_sdpa():
                f()  # warm-up
                return median_pass_us([f], timer, args.reps) / 1e3
        f()
        return median_pass_us([f], timer, args.reps) / 1e3

    model.eval()
    with torch.no_grad():
        y0 = model(ids).logits
        with pyfastattn.override_sdpa():
            y1 = model(ids).logits
    print(
        f"# max |override - torch| of the logits (eval): {(y0.float() - y1.float()).abs().max().item():.3g}"
    )
    for r in range(args.rounds):
        model.eval()
        ie, io = median_ms(infer, False), median_ms(infer, True)
        model.train()
        te, to = median_ms(train, False), median_ms(train, True)
        print_infer_train_round(r, (ie, io), (te, to))


if __name__ == "__main__":
    main()
