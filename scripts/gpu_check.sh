#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: build, run the GPU tests, memcheck a
# few small shapes, run the benchmarks. Logs and results go to OUTDIR.
# Budget: < 8 minutes on 16 cores + one H200 (Python 3.12, torch 2.11, offline).
#
# usage: scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
t0=$SECONDS
step() { echo; echo "=== [$((SECONDS - t0)) s] $*"; }
status=0

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"

step "build (MAX_JOBS=$MAX_JOBS)"
if ! PYFASTATTN_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build took $((SECONDS - t0)) s"
python3 -m pyfastattn.info | tee "$OUT/info.txt"

step "GPU tests"
timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE 2>&1 | tee "$OUT/tests_gpu.log" | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "drop-in modules on CUDA"
PYFASTATTN_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q tests/test_nn.py -p no:cacheprovider -rfE 2>&1 | tee "$OUT/tests_nn_cuda.log" | tail -20
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "property tests on CUDA (forward + backward through the public APIs)"
PYFASTATTN_BACKEND=kernel PYFASTATTN_FUZZ_DEVICE=cuda PYFASTATTN_FUZZ_NATIVE=150 PYFASTATTN_FUZZ_SDPA=50 timeout 150 python3 -m pytest -q tests/test_fuzz.py \
  -p no:cacheprovider -rfE 2>&1 | tee "$OUT/tests_fuzz_cuda.log" | tail -20
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "compute-sanitizer memcheck + racecheck on small shapes (forward + backward)"
cat > /tmp/pfa_small.py <<'PY'
import torch, pyfastattn
torch.manual_seed(0)
with pyfastattn.backend("kernel"):
    for dt in (torch.float16, torch.bfloat16):
        for (b, sq, sk, h, hk, d) in ((2, 17, 33, 4, 2, 64), (1, 65, 1, 2, 2, 128), (1, 3, 130, 2, 1, 256), (2, 129, 77, 2, 2, 40)):
            q = torch.randn(b, sq, h, d, device="cuda", dtype=dt, requires_grad=True)
            k = torch.randn(b, sk, hk, d, device="cuda", dtype=dt, requires_grad=True)
            v = torch.randn(b, sk, hk, d, device="cuda", dtype=dt, requires_grad=True)
            pyfastattn.attention(q, k, v, causal=True).sum().backward()  # forward + CUDA backward
            pyfastattn.attention(q, k, v, window_size=(5, 3), softcap=4.0).sum().backward()
            torch.use_deterministic_algorithms(True)  # the backward's semaphore path
            pyfastattn.attention(q, k, v, causal=True).sum().backward()
            torch.use_deterministic_algorithms(False)
            m = torch.rand(b, 1, sq, sk, device="cuda") > 0.3
            pyfastattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m,
                                                    enable_gqa=True).sum().backward()
        cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32, device="cuda")
        qp = torch.randn(40, 4, 64, device="cuda", dtype=dt, requires_grad=True)
        pyfastattn.attention(qp, qp[:, :2], qp[:, :2], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=35, max_seqlen_k=35).sum().backward()
torch.cuda.synchronize()
print("small shapes ok")
PY
for tool in memcheck racecheck; do
  if command -v compute-sanitizer >/dev/null; then
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 /tmp/pfa_small.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?; echo "$tool exit $rc"; tail -5 "$OUT/sanitizer_$tool.log"; [ "$rc" = 0 ] || status=1
  else
    echo "compute-sanitizer not found"
  fi
done

step "CUDA FFN: both paths timed, dispatch table written (bf16, issue grid)"
timeout 120 python3 benchmarks/ffn_bench.py --device cuda --dtype bfloat16 --tokens 16,512,8192 --dmodel 1024,4096 \
  --write-dispatch "$OUT/ffn_cuda_dispatch.py" 2>&1 | tee "$OUT/ffn_dispatch.log" | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "benchmarks (quick)"
timeout 240 python3 benchmarks/run.py --device cuda --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "done: status $status"
exit "$status"
