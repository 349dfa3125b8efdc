"""The Hugging Face integration on a prefill chunk into a partly filled static
buffer (more than 16 queries, a prefix mask: chunked prefill, a multi-turn
continuation, a long speculative block): the prefix route (the prefix as
``seqused_k`` with bottom-right causal, only the filled keys read) against the
dense-mask route it replaced (the bool mask over the whole buffer), beside
torch SDPA on the same mask (what attn_implementation="sdpa" runs). Calls
``attention_forward`` directly, routes interleaved, median ms per call.

    python benchmarks/hf_prefill_route_ab.py [--dtype float32|bfloat16] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyfastattn.integrations.transformers as hf

# (batch, q heads, kv heads, head dim, buffer slots, chunk queries, filled keys after the chunk)
CASES = [(1, 16, 4, 64, 4096, 512, 2560), (1, 16, 4, 64, 8192, 1024, 5120), (4, 16, 4, 64, 4096, 256, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    prefix = hf.prefix_causal_lengths
    module = torch.nn.Module()
    module.is_causal = True
    print(f"# {args.dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds")
    for b, hq, hk, d, s, lq, n in CASES:
        q = torch.randn(b, hq, lq, d, dtype=dt)
        k = torch.randn(b, hk, s, d, dtype=dt)
        v = torch.randn(b, hk, s, d, dtype=dt)
        mask = torch.arange(s)[None, None, None, :] <= n - lq + torch.arange(lq)[None, None, :, None]
        mask = mask.expand(b, 1, lq, s).contiguous()
        res: dict[str, list[float]] = {"prefix": [], "dense": [], "sdpa": []}
        outs = {}
        try:
            with torch.no_grad():
                for r in range(args.rounds):
                    order = ["prefix", "dense", "sdpa"]
                    for route in order[r % 3 :] + order[: r % 3]:
                        t = time.perf_counter()
                        if route == "sdpa":
                            outs[route] = torch.nn.functional.scaled_dot_product_attention(
                                q, k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=True
                            ).transpose(1, 2)
                        else:
                            # the dense route: the prefix not recognised, as before the change
                            hf.prefix_causal_lengths = prefix if route == "prefix" else (lambda *a: None)
                            outs[route], _ = hf.attention_forward(module, q, k, v, mask, scaling=d**-0.5)
                        res[route].append((time.perf_counter() - t) * 1e3)
        finally:
            hf.prefix_causal_lengths = prefix
        err = (outs["prefix"].float() - outs["dense"].float()).abs().max().item()
        p, dn, sd = (statistics.median(res[r]) for r in ("prefix", "dense", "sdpa"))
        print(
            f"B{b} Hq{hq}/{hk} d{d} buffer {s} chunk {lq} filled {n}: prefix route {p:8.2f} ms, "
            f"dense mask {dn:8.2f} ms ({p / dn:.3f}x), torch sdpa {sd:8.2f} ms ({p / sd:.3f}x), "
            f"max |prefix - dense| {err:.1e}"
        )


if __name__ == "__main__":
    main()
