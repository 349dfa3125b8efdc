"""The benchmark's peak probes (csrc/cpu/peak_probe.cpp): they do the work they
claim (the FLOP count the benchmark divides by), read every element, and
refuse bad arguments by name."""

import pytest
import torch

import pyfastattn  # noqa: F401

op = torch.ops.pyfastattn


@pytest.mark.parametrize("kind", ["fp32_fma", "bf16_dot"])
@pytest.mark.parametrize("threads", [1, 2])
def test_peak_probe_counts_its_work(kind, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        isa = op.cpu_peak_probe_isa(kind)
        lanes = 16 if "zmm" in isa else 8 if "ymm" in isa else 1
        per_lane = 4 if "vdpbf16ps" in isa else 2
        iters = 1000
        # 16 accumulators per thread, each iteration one instruction on each
        assert op.cpu_peak_probe(kind, iters) == iters * 16 * lanes * per_lane * torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def test_peak_probe_isa_matches_the_cpu():
    assert op.cpu_peak_probe_isa("fp32_fma") in (
        "vfmadd231ps zmm (AVX-512)", "vfmadd231ps ymm (AVX2)", "fmaf (portable)")  # fmt: skip
    bf16 = op.cpu_peak_probe_isa("bf16_dot")
    assert bf16 == "vdpbf16ps zmm (AVX512_BF16)" or bf16 == op.cpu_peak_probe_isa("fp32_fma")


@pytest.mark.parametrize("prefetch_bytes", [0, 64, 16384])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 1000, 4097, 70001])
def test_read_probe_reads_every_element(n, prefetch_bytes):
    """Every element once, with and without the software prefetches (the
    prefetching loop stops short of the end; the rest is read without)."""
    torch.manual_seed(0)
    buf = torch.randint(-8, 8, (n,)).float()  # small integers: every partial sum is exact
    assert op.cpu_read_probe(buf, prefetch_bytes) == buf.double().sum().item()


def test_probes_refuse_bad_arguments():
    with pytest.raises(ValueError, match="kind must be 'fp32_fma' or 'bf16_dot', got 'fp16'"):
        op.cpu_peak_probe("fp16", 10)
    with pytest.raises(ValueError, match="kind must be"):
        op.cpu_peak_probe_isa("int8")
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        op.cpu_peak_probe("fp32_fma", 0)
    with pytest.raises(ValueError, match="buf must be a contiguous float32 CPU tensor, got Double"):
        op.cpu_read_probe(torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        op.cpu_read_probe(torch.ones(8, 2)[:, 0])
    for bad in (-64, 100, 2 << 20):
        with pytest.raises(
            ValueError, match=f"prefetch_bytes must be a multiple of 64 in \\[0, 1048576\\], got {bad}"
        ):
            op.cpu_read_probe(torch.ones(8), bad)
