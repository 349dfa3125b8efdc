"""One bad-metadata call of attention_kvcache_fwd in this process (argv: cpu|cuda, table|capacity)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import pyfastattn
from tests.test_gpu_kvcache import make_case

dev, what = sys.argv[1], sys.argv[2]
q, kc, vc, k, v, args = make_case(b=2, hq=4, hk=2, d=64, cap=64, block=16, dtype=torch.bfloat16)
t = [x.to(dev) for x in (q, kc, vc, k, v)]
args = {n: (a.to(dev) if torch.is_tensor(a) else a) for n, a in args.items()}
if what == "table":
    bad = args["block_table"].clone()
    bad[0, 0] = kc.shape[0]
    args["block_table"] = bad
else:
    args["cache_seqlens"] = 64
with pyfastattn.backend("kernel"):
    try:
        pyfastattn.attention_with_kvcache(*t, **args)
        print(dev, what, "NO ERROR")
    except Exception as e:
        print(dev, what, type(e).__name__, str(e)[:120])
maps = [ln.split()[-1] for ln in open("/proc/self/maps") if "stdc++" in ln or "libgomp" in ln]
print("loaded:", sorted(set(maps)))
