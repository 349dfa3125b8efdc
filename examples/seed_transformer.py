"""The seed example: a plain ``torch.nn.Transformer`` followed by a Linear head,
written with no knowledge of pyfastattn, converted with ``pyfastattn.patch``
and trained for a step (forward and backward).

    python examples/seed_transformer.py            # small default sizes, CPU
    python examples/seed_transformer.py --device cuda --dtype bfloat16 --d-model 512 --nhead 8
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from pyfastattn.patch import patch


class Seq2Seq(nn.Module):
    """Token embeddings -> torch.nn.Transformer -> Linear head over the vocabulary."""

    def __init__(
        self,
        vocab: int = 1000,
        d_model: int = 64,
        nhead: int = 4,
        layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(
            d_model,
            nhead,
            num_encoder_layers=layers,
            num_decoder_layers=layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
        )
        self.head = nn.Linear(d_model, vocab)

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``src`` (N, S), ``tgt`` (N, T) token ids -> logits (N, T, vocab)."""
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        h = self.transformer(
            self.embed(src),
            self.embed(tgt),
            tgt_mask=tgt_mask,
            tgt_is_causal=True,
            src_key_padding_mask=src_key_padding_mask,
            memory_key_padding_mask=src_key_padding_mask,
        )
        return self.head(h)


def make_batch(
    batch: int, src_len: int, tgt_len: int, vocab: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random token ids and a right-padding mask (True = padding) with ragged source lengths."""
    src = torch.randint(0, vocab, (batch, src_len), device=device)
    tgt = torch.randint(0, vocab, (batch, tgt_len), device=device)
    lengths = torch.randint(src_len // 2, src_len + 1, (batch,), device=device)
    lengths[0] = src_len
    pad = torch.arange(src_len, device=device) >= lengths[:, None]
    return src, tgt, pad


def train_step(model: nn.Module, src, tgt, pad) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward of next-token cross-entropy; returns (logits, loss)."""
    logits = model(src, tgt[:, :-1], src_key_padding_mask=pad)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
    loss.backward()
    return logits, loss


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--nhead", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--src-len", type=int, default=33)
    p.add_argument("--tgt-len", type=int, default=17)
    p.add_argument("--dropout", type=float, default=0.1, help="attention dropout runs on the reference path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model = Seq2Seq(args.vocab, args.d_model, args.nhead, args.layers, args.ffn, args.dropout)
    model = model.to(args.device, dtype)
    model, report = patch(model, return_report=True)
    print(report)

    src, tgt, pad = make_batch(args.batch, args.src_len, args.tgt_len, args.vocab, args.device)
    t0 = time.perf_counter()
    logits, loss = train_step(model, src, tgt, pad)
    elapsed = time.perf_counter() - t0
    grad_norm = torch.sqrt(sum((q.grad.float() ** 2).sum() for q in model.parameters() if q.grad is not None))
    print(f"loss {loss.item():.4f}  grad norm {grad_norm.item():.4f}  fwd+bwd {elapsed * 1e3:.1f} ms")
    return {"model": model, "report": report, "logits": logits, "loss": loss, "batch": (src, tgt, pad)}


if __name__ == "__main__":
    main()
