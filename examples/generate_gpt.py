"""GPT-style generation: a small character-level causal language model, trained
briefly, then generating text greedily and by sampling through a KV cache.

Data: the Python language reference that ships inside CPython's standard
library (``pydoc_data.topics``, about 460 KB of English prose and grammar
rules), read from disk: nothing is downloaded. Heading underlines,
indentation and blank lines are collapsed (a fifth of the raw text is
spaces). Characters are the tokens; the last 10% of the text is held out for
the validation loss. ``--quick`` trains for only ~300k characters: the loss
falls from ln(94) = 4.5 to about 2.5, the sampled text has the corpus's
letters, spacing and short words, and greedy decoding already settles into a
loop of frequent words ("the the the"), as a briefly trained character model
does.

The model is written the way a GPT is usually written (nanoGPT-style blocks:
LayerNorm, fused QKV projection, causal self-attention, output projection,
LayerNorm, FFN), in two flavours that share one ``state_dict`` layout:

* pyfastattn: attention is ``pyfastattn.attention(q, k, v, causal=True)``
  when training, the FFN is ``pyfastattn.nn.FeedForward``, and generation
  appends to a preallocated cache and attends over it with
  ``pyfastattn.attention_with_kvcache``;
* plain PyTorch, the baseline: ``torch.nn.functional.scaled_dot_product_attention``,
  a Linear-GELU-Linear FFN, and a KV cache written with tensor slices.

Both start from the same weights and take the same steps on the same batches,
interleaved step by step in one process, so their step times are measured
under the same machine load; the script prints the training and generation
speeds (tokens/s, medians) of both and both validation losses. The greedy
check: the pyfastattn-trained weights are loaded into the plain-PyTorch model
and both decode greedily from the same prompts; the tokens must be the same.

    python examples/generate_gpt.py --quick     # ~1 minute on 2 CPU cores
    python examples/generate_gpt.py             # a larger model, longer training

The last line printed is ``RESULT {json}``, read by tests/test_examples.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F
from side_by_side import print_footer, print_speeds, step_both
from torch import nn
from torch.nn.attention.bias import causal_lower_right

import pyfastattn

# Typographic characters of the reference text, mapped to ASCII.
_ASCII = {
    "\u2019": "'",
    "\u2018": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2014": "-",
    "\u2013": "-",
    "\u2026": "...",
}


def load_corpus() -> str:
    """The Python language reference text from the standard library, ASCII only."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data off
        raise SystemExit(f"this example needs the standard library's pydoc_data module: {e}") from e
    text = "\n".join(topics[k] for k in sorted(topics))
    text = "".join(_ASCII.get(c, c) for c in text)
    text = "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)
    # Prose over layout: drop heading underlines, collapse indentation and blank lines
    # (a fifth of the raw text is spaces, which a briefly trained model would mostly repeat).
    text = re.sub(r"(?m)^[*=\-]{3,}$", "", text)
    text = re.sub(r" {2,}", " ", text)
    return re.sub(r"\n\s*\n+", "\n", text)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache.

    ``x`` (B, S, d_model) -> (B, S, d_model). With ``cache = (k_cache, v_cache,
    pos)``, k_cache/v_cache (B, max_len, H, D) hold ``pos`` earlier tokens;
    the new keys/values are written at pos .. pos + S - 1 and the S queries
    attend causally (bottom-right) over all pos + S keys.
    """

    def __init__(self, d_model: int, n_head: int, fused: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.fused = n_head, d_model // n_head, fused
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: tuple | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim).unbind(2)  # (B, S, H, D)
        if self.fused:
            if cache is None:
                o = pyfastattn.attention(q, k, v, causal=True)
            else:
                k_cache, v_cache, pos = cache
                o = pyfastattn.attention_with_kvcache(
                    q, k_cache, v_cache, k, v, cache_seqlens=pos, causal=True
                )
        else:
            if cache is not None:
                k_cache, v_cache, pos = cache
                k_cache[:, pos : pos + s] = k
                v_cache[:, pos : pos + s] = v
                k, v = k_cache[:, : pos + s], v_cache[:, : pos + s]
            n = k.shape[1]
            mask = None if s == 1 else causal_lower_right(s, n)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)
        return self.proj(o.reshape(b, s, -1))


class TorchFeedForward(nn.Module):
    """Linear-GELU-Linear with the parameter names of ``pyfastattn.nn.FeedForward``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_ff: int, fused: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, fused)
        self.ffn = (
            pyfastattn.nn.FeedForward(d_model, d_ff, "gelu") if fused else TorchFeedForward(d_model, d_ff)
        )

    def forward(self, x: torch.Tensor, cache: tuple | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.ffn(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, LayerNorm, tied LM head."""

    def __init__(self, vocab: int, block_size: int, d_model: int, n_head: int, layers: int, fused: bool):
        super().__init__()
        self.block_size, self.n_head, self.head_dim = block_size, n_head, d_model // n_head
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, 4 * d_model, fused) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():  # GPT-2's initialisation: small weights, so the first loss is ~ln(vocab)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, caches: list | None = None, pos: int = 0) -> torch.Tensor:
        """``idx`` (B, S) token ids at positions pos .. pos + S - 1 -> logits (B, S, vocab)."""
        x = self.tok(idx) + self.pos(torch.arange(pos, pos + idx.shape[1], device=idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else (*caches[i], pos))
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, new_tokens: int, *, use_cache: bool = True, temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Continue ``prompt`` (B, P) by ``new_tokens``: greedy when temperature
        is 0, else sampled from softmax(logits / temperature) with ``generator``.
        With ``use_cache`` the prompt is prefilled into a KV cache and each step
        feeds one token; without, every step reruns the whole prefix."""
        b, p = prompt.shape
        if p + new_tokens > self.block_size:
            raise ValueError(
                f"prompt + new_tokens must be <= block_size ({self.block_size}), got {p + new_tokens}"
            )
        caches = None
        if use_cache:
            shape = (b, p + new_tokens, self.n_head, self.head_dim)
            dtype = self.tok.weight.dtype
            caches = [
                (prompt.new_zeros(shape, dtype=dtype), prompt.new_zeros(shape, dtype=dtype))
                for _ in self.blocks
            ]
        out, step_in, pos = prompt, prompt, 0
        for _ in range(new_tokens):
            logits = self(step_in, caches, pos)[:, -1] if use_cache else self(out)[:, -1]
            if temperature == 0.0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
            if use_cache:
                pos += step_in.shape[1]
                step_in = nxt
            out = torch.cat([out, nxt], 1)
        return out


def batches(data: torch.Tensor, batch: int, block: int, steps: int, seed: int):
    """``steps`` (inputs, targets) pairs of (batch, block) windows at random offsets."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[j : j + block] for j in i.tolist()])
        y = torch.stack([data[j + 1 : j + block + 1] for j in i.tolist()])
        yield x, y


@torch.no_grad()
def eval_loss(model: GPT, val: torch.Tensor, block: int, n_batches: int) -> float:
    model.eval()
    losses = [
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        for x, y in batches(val, 8, block, n_batches, 1)
    ]
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and ~1 minute of training on 2 cores")
    p.add_argument("--steps", type=int, help="training steps (default: 300 quick, 1500 full)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        cfg = dict(d_model=128, n_head=4, layers=2, block=128, batch=8, steps=300, lr=6e-3, new_tokens=96)
    else:
        cfg = dict(d_model=256, n_head=4, layers=4, block=256, batch=16, steps=1500, lr=2e-3, new_tokens=200)
    if args.steps:
        cfg["steps"] = args.steps
    print(f"config: {cfg}  threads: {torch.get_num_threads()}  load average: {os.getloadavg()[0]:.2f}")
    cpu0 = time.process_time()

    text = load_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * len(data))
    train, val = data[:n_train], data[n_train:]
    print(f"corpus: {len(text)} characters of the Python language reference, vocabulary {len(chars)}")

    torch.manual_seed(args.seed)
    arch = (len(chars), cfg["block"], cfg["d_model"], cfg["n_head"], cfg["layers"])
    fast = GPT(*arch, fused=True)
    base = GPT(*arch, fused=False)
    base.load_state_dict(fast.state_dict())  # the same initial weights
    models = {"pyfastattn": fast, "torch": base}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=cfg["lr"], weight_decay=0.01) for k, m in models.items()}
    # linear warm-up over 30 steps, then a cosine decay to a tenth of the peak rate
    lr_factor = lambda s: min((s + 1) / 30, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / cfg["steps"]))))
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for k, o in opts.items()}
    n_val = 4 if args.quick else 16
    loss0 = eval_loss(fast, val, cfg["block"], n_val)
    print(
        f"validation loss before training: {loss0:.3f} (uniform guess: ln {len(chars)} = {math.log(len(chars)):.3f})"
    )

    step_times: dict[str, list[float]] = {k: [] for k in models}
    train_losses: dict[str, list[float]] = {k: [] for k in models}
    t_start = time.perf_counter()
    for step, (x, y) in enumerate(batches(train, cfg["batch"], cfg["block"], cfg["steps"], args.seed)):
        step_both(models, opts, scheds, step, lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten()),  # noqa: B023
                  step_times, train_losses)  # fmt: skip
        if step % max(1, cfg["steps"] // 5) == 0 or step == cfg["steps"] - 1:
            print(f"step {step:5d}  train loss  pyfastattn {train_losses['pyfastattn'][-1]:.3f}  "
                  f"torch {train_losses['torch'][-1]:.3f}")  # fmt: skip
    train_s = time.perf_counter() - t_start
    tokens_per_step = cfg["batch"] * cfg["block"]
    # median step time, the first 3 steps (warm-up) left out
    train_tps = {k: tokens_per_step / statistics.median(v[3:] or v) for k, v in step_times.items()}
    val_loss = {k: eval_loss(m, val, cfg["block"], n_val) for k, m in models.items()}

    # Generation. The greedy check runs the pyfastattn-trained weights through
    # the plain-PyTorch model: same weights, different attention/FFN/cache code.
    fast.eval()
    twin = GPT(*arch, fused=False).eval()
    twin.load_state_dict(fast.state_dict())
    base.eval()
    plen = 16
    starts = [
        text.index(s) for s in ('The "assert" ', "Assignment stat", 'The "for" stat', "Class definitio")
    ]
    prompt = torch.stack([data[i : i + plen] for i in starts])
    decode = lambda ids: "".join(chars[i] for i in ids.tolist())
    greedy = {"pyfastattn": fast.generate(prompt, cfg["new_tokens"]),
              "torch, same weights": twin.generate(prompt, cfg["new_tokens"])}  # fmt: skip
    no_cache = fast.generate(prompt, cfg["new_tokens"], use_cache=False)
    same_greedy = torch.equal(greedy["pyfastattn"], greedy["torch, same weights"])
    same_no_cache = torch.equal(greedy["pyfastattn"], no_cache)
    sampled = {}
    for k, m in (("pyfastattn", fast), ("torch, same weights", twin)):
        sampled[k] = m.generate(
            prompt, cfg["new_tokens"], temperature=0.8, generator=torch.Generator().manual_seed(1)
        )
    gen_times: dict[str, list[float]] = {"pyfastattn": [], "torch": []}
    for rep in range(3):  # interleaved, median: both KV-cache decoders, greedy, same weights
        for k, m in (
            (("pyfastattn", fast), ("torch", twin))
            if rep % 2 == 0
            else (("torch", twin), ("pyfastattn", fast))
        ):
            t = time.perf_counter()
            m.generate(prompt, cfg["new_tokens"])
            gen_times[k].append(time.perf_counter() - t)
    gen_tps = {k: prompt.shape[0] * cfg["new_tokens"] / statistics.median(v) for k, v in gen_times.items()}

    print(f"\nprompt: {decode(prompt[0])!r}")
    print(f"greedy  (pyfastattn, KV cache): {decode(greedy['pyfastattn'][0, plen:])!r}")
    print(f"sampled (pyfastattn, T=0.8):    {decode(sampled['pyfastattn'][0, plen:])!r}")
    print(f"greedy tokens, pyfastattn vs the same weights in plain torch: {'identical' if same_greedy else 'DIFFERENT'}"
          f" ({prompt.shape[0]} prompts x {cfg['new_tokens']} tokens); KV cache vs no cache: "
          f"{'identical' if same_no_cache else 'DIFFERENT'}; sampled (same seed): "
          f"{'identical' if torch.equal(*sampled.values()) else 'different'}")  # fmt: skip
    print_speeds([("train tokens/s", train_tps), ("generate tokens/s", gen_tps)], "torch")
    print(
        f"{'validation loss':24s}{val_loss['pyfastattn']:12.3f}{val_loss['torch']:12.3f}   (before: {loss0:.3f})"
    )
    cpu = print_footer(train_s, cfg["steps"], cpu0)
    result = {
        "example": "generate_gpt",
        "config": cfg,
        "val_loss_before": loss0,
        "val_loss": val_loss,
        "train_loss_first": {k: v[0] for k, v in train_losses.items()},
        "train_loss_last10": {k: sum(v[-10:]) / 10 for k, v in train_losses.items()},
        "train_tokens_per_s": train_tps,
        "generate_tokens_per_s": gen_tps,
        "greedy_same_as_torch": same_greedy,
        "greedy_same_as_no_cache": same_no_cache,
        "greedy_tokens": greedy["pyfastattn"][:, plen:].tolist(),
        "cpu_s": cpu,
        "load_average": os.getloadavg()[0],
    }
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
