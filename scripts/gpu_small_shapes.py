"""Every CUDA kernel once on small, odd shapes: the workload that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck).

Attention forward and backward (atomic and deterministic dQ paths, GQA, a
broadcast bool mask, window + softcap, dropout + ALiBi, varlen with an empty
sequence, inputs that are misaligned offset views), and the FFN (fused GEMM path and cuBLAS
path, plain and gated, forward and backward), all through the public API with
the backend forced to the kernels.

    python scripts/gpu_small_shapes.py [--dtypes float16,bfloat16] [--check-args]

--check-args parses the arguments and exits (the dry run of gpu_check.sh).
"""

from __future__ import annotations

import argparse
import os

import torch

import pyfastattn


def attention_shapes(dt: torch.dtype) -> None:
    for b, sq, sk, h, hk, d in (
        (2, 17, 33, 4, 2, 64),
        (1, 65, 1, 2, 2, 128),
        (1, 3, 130, 2, 1, 256),
        (2, 129, 77, 2, 2, 40),
    ):
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dt, requires_grad=True)
        pyfastattn.attention(q, k, v, causal=True).sum().backward()
        pyfastattn.attention(q, k, v, window_size=(5, 3), softcap=4.0).sum().backward()
        slopes = torch.rand(h, device="cuda")  # dropout's keep-bit staging and ALiBi (issue 17)
        pyfastattn.attention(q, k, v, causal=True, dropout_p=0.2, alibi_slopes=slopes).sum().backward()
        torch.use_deterministic_algorithms(True)  # the backward's turn-taking dQ path
        try:
            pyfastattn.attention(q, k, v, causal=True).sum().backward()
            pyfastattn.attention(q, k, v, dropout_p=0.5, alibi_slopes=slopes).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        m = torch.rand(b, 1, sq, sk, device="cuda") > 0.3
        pyfastattn.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, enable_gqa=True
        ).sum().backward()
    # Contiguous views 4 elements (8 bytes) past an aligned block: the glue
    # must copy them before any 16-byte cp.async (memcheck reports a
    # misaligned access otherwise).
    b, s, h, d = 1, 33, 2, 64
    off = [torch.randn(b * s * h * d + 4, device="cuda", dtype=dt)[4:].view(b, s, h, d) for _ in range(3)]
    off = [t.detach().requires_grad_() for t in off]
    pyfastattn.attention(*off, causal=True).sum().backward()
    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32, device="cuda")
    qp = torch.randn(40, 4, 64, device="cuda", dtype=dt, requires_grad=True)
    pyfastattn.attention(
        qp,
        qp[:, :2],
        qp[:, :2],
        causal=True,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=35,
        max_seqlen_k=35,
    ).sum().backward()


def kvcache_shapes(dt: torch.dtype) -> None:
    """Paged (blocks 16 and 64, shuffled tables) and contiguous caches with
    append, rotary, leftpad and forced splits, through both split-KV kernels
    (PYFASTATTN_KVCACHE_CUDA_KERNEL simt and mma): memcheck sees every cache
    read through the block table, racecheck the mma kernel's per-warp rings."""
    b, hq, hk, d = 2, 8, 2, 128
    cases = [
        (kernel, block, splits)
        for kernel in ("simt", "mma")
        for block, splits in ((16, 3), (64, 0), (None, 1))
    ]
    for kernel, block, splits in cases:
        os.environ["PYFASTATTN_KVCACHE_CUDA_KERNEL"] = kernel  # read by the op on every call
        seqlens = torch.tensor([70, 5], dtype=torch.int32, device="cuda")
        if block is None:
            kc = torch.randn(b, 90, hk, d, device="cuda", dtype=dt)
            table = None
        else:
            nblk = (90 + block - 1) // block
            kc = torch.randn(b * nblk + 1, block, hk, d, device="cuda", dtype=dt)
            table = torch.randperm(b * nblk + 1, device="cuda")[: b * nblk].to(torch.int32).view(b, nblk)
        vc = torch.randn_like(kc)
        q = torch.randn(b, 2, hq, d, device="cuda", dtype=dt)
        k = torch.randn(b, 2, hk, d, device="cuda", dtype=dt)
        cos = torch.rand(100, 32, device="cuda")
        pyfastattn.attention_with_kvcache(
            q, kc, vc, k, torch.randn_like(k), cache_seqlens=seqlens, block_table=table, rotary_cos=cos,
            rotary_sin=cos.flip(1), causal=True, num_splits=splits,
            cache_leftpad=torch.tensor([3, 0], dtype=torch.int32, device="cuda") if block is None else None,
        )  # fmt: skip


def ffn_shapes(dt: torch.dtype) -> None:
    from pyfastattn import _ffn_cuda

    for path in ("fused", "cublas"):
        with _ffn_cuda.force_path(path):
            for tokens, d_model, d_ff in ((7, 96, 256), (130, 64, 200)):
                x = torch.randn(tokens, d_model, device="cuda", dtype=dt, requires_grad=True)
                w1 = (torch.randn(d_ff, d_model, device="cuda", dtype=dt) * 0.1).requires_grad_()
                w3 = (torch.randn(d_ff, d_model, device="cuda", dtype=dt) * 0.1).requires_grad_()
                w2 = (torch.randn(d_model, d_ff, device="cuda", dtype=dt) * 0.1).requires_grad_()
                b1 = torch.randn(d_ff, device="cuda", dtype=dt, requires_grad=True)
                pyfastattn.feed_forward(x, w1, b1, w2, activation="gelu").sum().backward()
                for recompute in (False, True):
                    pyfastattn.gated_feed_forward(
                        x, w1, w3, w2, activation="silu", recompute=recompute
                    ).sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float16,bfloat16", help="comma list of torch dtypes")
    ap.add_argument("--check-args", action="store_true", help="parse the arguments and exit")
    args = ap.parse_args()
    dtypes = [getattr(torch, n.strip()) for n in args.dtypes.split(",")]
    if args.check_args:
        print(f"gpu_small_shapes: dtypes {dtypes}")
        return
    torch.manual_seed(0)
    with pyfastattn.backend("kernel"):
        for dt in dtypes:
            attention_shapes(dt)
            kvcache_shapes(dt)
            ffn_shapes(dt)
    torch.cuda.synchronize()
    print("small shapes ok")


if __name__ == "__main__":
    main()
