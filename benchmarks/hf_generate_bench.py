"""Hugging Face greedy decoding with a StaticCache (or ``--cache dynamic``, HF's
default): milliseconds per generated token of a randomly initialised Llama
(nothing downloaded), with
attn_implementation "sdpa", "pyfastattn", and two earlier forms of
"pyfastattn" kept as A/Bs of the changes that replaced them:
``mask-per-layer`` (the mask analysed again in every layer, not once per
forward) and ``padded-dense`` (a left-padded batch's decode steps given the
dense mask over the whole buffer, not the cache API with cache_leftpad;
``--batch B --left-pad P`` pads sequence i with i x P tokens).
Also the time of the prefill and first token (a prompt into an empty cache;
without padding transformers passes no mask there, only the causal flag).

    python benchmarks/hf_generate_bench.py [--layers 16] [--cache-len 4096]
        [--prompt 32] [--new-tokens 32] [--rounds 5] [--threads 2] [--dtype float32|bfloat16]
        [--batch 1] [--left-pad 0] [--cache static|dynamic] [--impls sdpa,pyfastattn,mask-per-layer,padded-dense]

Each round runs every implementation once, in turn (interleaved rounds); a
token's time is generate(max_new_tokens = N + 1) minus generate(max_new_tokens
= 1) (the prefill and the first token), over N. Prints the median per
implementation and its ratio to the first one, and whether the tokens of
every implementation equal the first one's (in bfloat16, greedy tokens of two
correct implementations can part after some steps: each rounds differently;
at 4k context both "sdpa" and "pyfastattn" left the float32 model's tokens at
the same step, with the same logit errors).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyfastattn.integrations.transformers as hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--cache-len", type=int, default=4096, help="the StaticCache's max_cache_len")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--cache", default="static", choices=["static", "dynamic"], help="the cache (dynamic: HF's default)"
    )
    ap.add_argument(
        "--left-pad", type=int, default=0, help="sequence i of the batch gets i x this many pad tokens"
    )
    ap.add_argument("--impls", default="sdpa,pyfastattn,mask-per-layer")
    args = ap.parse_args()
    impls = args.impls.split(",")
    known = ("sdpa", "pyfastattn", "mask-per-layer", "padded-dense")
    if any(i not in known for i in impls):
        ap.error(f"--impls takes {', '.join(known)}; got {args.impls}")
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    hf.register()
    torch.manual_seed(0)
    heads = max(1, args.hidden // 32)
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        head_dim=32, max_position_embeddings=args.cache_len,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval().to(getattr(torch, args.dtype))
    ids = torch.randint(1, 999, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    for i in range(args.batch):
        pad = min(i * args.left_pad, args.prompt - 1)
        ids[i, :pad] = 0
        am[i, :pad] = 0
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if args.cache == "static":
        kw.update(cache_implementation="static", cache_config={"max_cache_len": args.cache_len})
    memo, spans = hf.memo_per_mask, hf.prefix_causal_spans

    def unpadded_spans(mask, batch, lq):
        r = spans(mask, batch, lq)
        return r if r is None or r[1] is None else None

    def run(impl: str):
        model.set_attn_implementation("sdpa" if impl == "sdpa" else hf.NAME)
        hf.memo_per_mask = (lambda mask, key, compute: compute()) if impl == "mask-per-layer" else memo
        hf.prefix_causal_spans = unpadded_spans if impl == "padded-dense" else spans
        try:
            with torch.no_grad():
                t = time.perf_counter()
                model.generate(ids, attention_mask=am, max_new_tokens=1, **kw)
                first = time.perf_counter() - t
                t = time.perf_counter()
                out = model.generate(ids, attention_mask=am, max_new_tokens=args.new_tokens + 1, **kw)
                total = time.perf_counter() - t
        finally:
            hf.memo_per_mask, hf.prefix_causal_spans = memo, spans
        return (total - first) / args.new_tokens * 1e3, first * 1e3, out

    times: dict[str, list[float]] = {i: [] for i in impls}
    firsts: dict[str, list[float]] = {i: [] for i in impls}
    tokens: dict[str, torch.Tensor] = {}
    for i in impls:  # warm-up
        run(i)
    for _ in range(args.rounds):
        for i in impls:
            ms, first_ms, tokens[i] = run(i)
            times[i].append(ms)
            firsts[i].append(first_ms)
    cache = f"StaticCache {args.cache_len}" if args.cache == "static" else "DynamicCache"
    print(
        f"# Llama L{args.layers} hidden {args.hidden} heads {heads}/{max(1, heads // 4)}, batch {args.batch} "
        f"(left pad {args.left_pad} x i), {cache}, {args.dtype}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, {args.rounds} rounds, threads {torch.get_num_threads()}"
    )
    base, base_first = statistics.median(times[impls[0]]), statistics.median(firsts[impls[0]])
    for i in impls:
        m, f = statistics.median(times[i]), statistics.median(firsts[i])
        same = torch.equal(tokens[i], tokens[impls[0]])
        print(
            f"{i:16s} {m:8.2f} ms/token ({m / base:5.3f}x)  prefill + first token {f:9.1f} ms ({f / base_first:5.3f}x)"
            f"  tokens {'equal' if same else 'differ'}"
        )


if __name__ == "__main__":
    main()
