// Runs the CUDA KV-cache kernels (append / rotary, split-KV attention,
// combine; ../kvcache_fwd_kernel.cuh) under the CPU emulation of their sm_80
// primitives (csrc/cuda/attention/emu/sm80_emulation.h) on random calls, and
// compares the cache after the append, O and the LSE with a float64
// reference written from the contract in csrc/attention/params.h (the KV
// cache block) and FlashAttention 2's flash_attn_with_kvcache, not from the
// kernels. Covers: contiguous caches (with cache_batch_idx) and paged ones
// (block 16, 64, 256, tables in shuffled order), cache_leftpad, append of
// 0-3 keys, rotary (interleaved and half-split, fp32 or 16-bit tables),
// GQA/MQA, causal and windows (bottom-right), softcap, ALiBi (per head and
// per sequence), 1-5 key splits, head dims that are not powers of two.
// It cannot show speed, hardware rounding, or compiler bugs.
//
//   g++ -std=c++17 -O2 -DPFA_ATTN_HOST_EMULATION -I/usr/local/cuda/include -Icsrc
//       csrc/cuda/kvcache/emu/kvcache_fwd_emu_test.cc -o /tmp/kvcache_fwd_emu_test
//   /tmp/kvcache_fwd_emu_test [cases=60] [seed=1]
// Exit status 0 when every case passes and the hot loop's 16-byte shared
// loads are free of bank conflicts.
//
// The cache holds NaN everywhere the kernels must not read (positions before
// cache_leftpad or past the keys, blocks and rows no sequence owns, head-dim
// padding); outputs hold a sentinel wherever they must not write; every case
// checks both, and that the append changed nothing but the new rows.
#include "../kvcache_fwd.h"  // first: cuda_runtime.h before the emulation macros
#include "../kvcache_fwd_kernel.cuh"
#include "../kvcache_fwd_mma_kernel.cuh"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <numeric>
#include <random>
#include <sstream>

#include "../../attention/emu/emu_test_common.h"
#include "../../attention/static_switch.h"

using pyfastattn::AttentionFwdParams;
using pyfastattn::DType;
namespace kv = pyfastattn::cuda::kvcache;
namespace emu = pyfastattn::emu;
using pyfastattn::cpu::KvAppendParams;
using pyfastattn::cuda::KvSplitOut;
using namespace pyfastattn::emu_test;  // NOLINT: the shared test vocabulary

namespace {

struct KvCase {
  bool bf16 = true;
  int d = 64, d_pad = 0;
  int batch = 1, hk = 1, group = 1, sq = 1, s_new = 0;
  int page = 0;          // 0: contiguous cache
  int cache_len = 0;     // contiguous: keys per cache row; paged: blocks per sequence * page
  int cache_rows = 1;    // contiguous: rows (>= batch with batch idx); paged: blocks in the pool
  bool batch_idx = false, leftpad = false;
  std::vector<int> seqlens, lp, bidx;
  std::vector<int> table;  // [batch][max_blocks]
  int max_blocks = 0;
  int rotary = 0;  // 0 none, 1 interleaved, 2 half-split
  int rotary_dim = 0;
  bool rotary_fp32 = true;
  bool causal = false;
  int wl = -1, wr = -1;
  float scale = 0.125f, softcap = 0.f;
  int alibi = 0;  // 0 none, 1 per head, 2 per (sequence, head)
  int splits = 1;
  bool mma = false;  // kvcache_split_mma_kernel instead of kvcache_split_kernel

  int hq() const { return hk * group; }
  std::string describe() const {
    std::ostringstream s;
    s << (bf16 ? "bf16" : "fp16") << " d=" << d << " dpad=" << d_pad << " b=" << batch << " hk=" << hk
      << " group=" << group << " sq=" << sq << " new=" << s_new << " page=" << page << " cap=" << cache_len
      << " rows=" << cache_rows << " seqlens=[";
    for (int x : seqlens) s << x << ",";
    s << "]" << (batch_idx ? " bidx" : "") << (leftpad ? " leftpad=[" : "");
    if (leftpad)
      for (int x : lp) s << x << ",";
    s << (leftpad ? "]" : "") << " rotary=" << rotary << "/" << rotary_dim << (rotary_fp32 ? "f32" : "16")
      << " win=(" << wl << "," << wr << ") scale=" << scale << " softcap=" << softcap << " alibi=" << alibi
      << " splits=" << splits << (mma ? " kernel=mma" : " kernel=simt");
    return s.str();
  }
};

KvCase random_case(std::mt19937& rng) {
  auto pick = [&](std::initializer_list<int> xs) {
    std::vector<int> v(xs);
    return v[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng)];
  };
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  KvCase c;
  c.bf16 = chance(0.5);
  c.d = pick({8, 24, 64, 72, 96, 128, 136, 256});
  c.d_pad = pick({0, 0, 8});
  c.batch = pick({1, 1, 2, 3});
  c.hk = pick({1, 1, 2});
  c.group = pick({1, 2, 3, 4, 8});
  c.sq = pick({1, 1, 1, 2, 3, 5});
  c.s_new = pick({0, 1, 1, 3});
  const int keys_cap = c.d > 128 ? 90 : 200;  // emulation time grows with d
  c.page = pick({0, 0, 16, 64, 256, 3, 5});  // 3, 5: blocks smaller than a tile of keys
  if (c.page > 0) {
    c.max_blocks = std::max(1, (keys_cap + c.page - 1) / c.page + uni(0, 1));
    c.cache_len = c.max_blocks * c.page;
    c.cache_rows = c.batch * c.max_blocks + uni(0, 3);
  } else {
    c.cache_len = uni(std::max(1, c.s_new), keys_cap);
    c.batch_idx = chance(0.4);
    c.cache_rows = c.batch + (c.batch_idx ? uni(0, 2) : 0);
  }
  c.leftpad = chance(0.3);
  const int max_keys = std::min(c.cache_len, keys_cap);
  for (int b = 0; b < c.batch; ++b) {
    const int kind = uni(0, 5);
    int sl = kind == 0 ? 0 : kind == 1 ? uni(0, 3) : uni(0, max_keys - c.s_new);
    sl = std::max(0, std::min(sl, c.cache_len - c.s_new));
    c.seqlens.push_back(sl);
    c.lp.push_back(c.leftpad ? uni(0, sl) : 0);
  }
  if (c.batch_idx) {
    std::vector<int> rows(c.cache_rows);
    std::iota(rows.begin(), rows.end(), 0);
    std::shuffle(rows.begin(), rows.end(), rng);
    c.bidx.assign(rows.begin(), rows.begin() + c.batch);
  }
  if (c.page > 0) {  // every sequence its own blocks, in shuffled order
    std::vector<int> blocks(c.cache_rows);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    c.table.assign(blocks.begin(), blocks.begin() + c.batch * c.max_blocks);
  }
  if (c.s_new > 0 && c.d >= 16 && chance(0.5)) {
    c.rotary = chance(0.5) ? 1 : 2;
    c.rotary_dim = 16 * uni(1, c.d / 16);
    c.rotary_fp32 = chance(0.5);
  }
  const int mode = uni(0, 4);
  if (mode == 1) c.causal = true, c.wr = 0;
  if (mode == 2) c.wl = pick({0, 3, 20, 70}), c.wr = pick({0, 2});
  if (mode == 3) c.wl = pick({5, 40});
  c.scale = std::uniform_real_distribution<float>(0.05f, 0.5f)(rng);
  if (chance(0.2)) c.softcap = float(pick({2, 5, 30}));
  c.alibi = chance(0.3) ? uni(1, 2) : 0;
  c.splits = pick({1, 1, 2, 3, 5});
  return c;
}

struct Result {
  bool ok = true;
  double max_err = 0, max_lse_err = 0;
};

#define CHECK_OR_FAIL(cond, ...)                    \
  do {                                              \
    if (!(cond)) {                                  \
      if (res.ok) std::printf("  " __VA_ARGS__);    \
      res.ok = false;                               \
    }                                               \
  } while (0)

template <typename Element, int kHeadDim>
Result run_case(const KvCase& c, std::mt19937& rng) {
  const bool bf16 = c.bf16;
  const int hq = c.hq(), d = c.d, da = c.d + c.d_pad;
  std::normal_distribution<float> normal(0.f, 1.f);
  auto rnd = [&] { return to_bits(normal(rng), bf16); };
  Result res;

  // ---- tensors: [rows, len, h, da] caches, NaN wherever no key lies ----------
  const int cache_len = c.page > 0 ? c.page : c.cache_len;  // rows per cache entry
  const int64_t khs = da, krs = int64_t(c.hk) * da, kbs = int64_t(cache_len) * krs;
  std::vector<uint16_t> kc(c.cache_rows * kbs + 8, kNaNBits), vc(kc.size(), kNaNBits);
  // The cache position t of sequence b, as (entry, row) -> element offset.
  auto cache_at = [&](int b, int64_t t, int h, int e) -> int64_t {
    if (c.page > 0)
      return c.table[b * c.max_blocks + t / c.page] * kbs + (t % c.page) * krs + h * khs + e;
    const int r = c.batch_idx ? c.bidx[b] : b;
    return r * kbs + t * krs + h * khs + e;
  };
  for (int b = 0; b < c.batch; ++b)
    for (int t = c.lp[b]; t < c.seqlens[b]; ++t)
      for (int h = 0; h < c.hk; ++h)
        for (int e = 0; e < d; ++e) kc[cache_at(b, t, h, e)] = rnd(), vc[cache_at(b, t, h, e)] = rnd();
  // New keys / values, query: [b, s, h, da] with head-dim padding NaN.
  auto tensor = [&](int s, int h) { return std::vector<uint16_t>(size_t(c.batch) * s * h * da + 8, kNaNBits); };
  std::vector<uint16_t> kn = tensor(c.s_new, c.hk), vn = tensor(c.s_new, c.hk), q = tensor(c.sq, hq);
  auto at4 = [&](int b, int s, int h, int e, int ns, int nh) { return ((int64_t(b) * ns + s) * nh + h) * da + e; };
  for (int b = 0; b < c.batch; ++b)
    for (int s = 0; s < c.s_new; ++s)
      for (int h = 0; h < c.hk; ++h)
        for (int e = 0; e < d; ++e) {
          kn[at4(b, s, h, e, c.s_new, c.hk)] = rnd();
          vn[at4(b, s, h, e, c.s_new, c.hk)] = rnd();
        }
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < c.sq; ++i)
      for (int h = 0; h < hq; ++h)
        for (int e = 0; e < d; ++e) q[at4(b, i, h, e, c.sq, hq)] = rnd();
  // Rotary tables [seqlen_ro, rd / 2] (exactly the positions needed, no more).
  const bool per_row = c.wl >= 0 || c.wr >= 0;
  int seqlen_ro = 0;
  for (int b = 0; b < c.batch; ++b)
    seqlen_ro = std::max(seqlen_ro, c.seqlens[b] + std::max(c.s_new, per_row ? c.sq : 1));
  const int rh = c.rotary_dim / 2;
  std::vector<float> cos32(size_t(seqlen_ro) * rh + 1), sin32(cos32.size());
  std::vector<uint16_t> cos16(cos32.size()), sin16(cos32.size());
  for (int t = 0; t < seqlen_ro; ++t)
    for (int i = 0; i < rh; ++i) {
      const double ang = t * std::pow(10000.0, -2.0 * i / std::max(1, c.rotary_dim));
      cos32[t * rh + i] = float(std::cos(ang)), sin32[t * rh + i] = float(std::sin(ang));
      cos16[t * rh + i] = to_bits(cos32[t * rh + i], bf16), sin16[t * rh + i] = to_bits(sin32[t * rh + i], bf16);
      if (!c.rotary_fp32) {  // the reference uses the table the kernel reads
        cos32[t * rh + i] = to_float(cos16[t * rh + i], bf16);
        sin32[t * rh + i] = to_float(sin16[t * rh + i], bf16);
      }
    }
  std::vector<float> slopes(size_t(c.alibi == 2 ? c.batch : 1) * hq);
  for (float& s : slopes) s = std::uniform_real_distribution<float>(0.01f, 0.6f)(rng);

  // ---- metadata and params, as prepare_kvcache_call fills them -----------------
  std::vector<int32_t> used(c.batch), seqlens(c.seqlens.begin(), c.seqlens.end()), lp(c.lp.begin(), c.lp.end());
  std::vector<int32_t> bidx(c.bidx.begin(), c.bidx.end()), table(c.table.begin(), c.table.end());
  for (int b = 0; b < c.batch; ++b) used[b] = c.seqlens[b] + c.s_new - c.lp[b];
  std::vector<uint16_t> q_rot = tensor(c.sq, hq), out = tensor(c.sq, hq);
  std::fill(q_rot.begin(), q_rot.end(), kSentinelBits);
  std::fill(out.begin(), out.end(), kSentinelBits);
  std::vector<float> lse(size_t(c.batch) * hq * c.sq, kLseSentinel);
  const int64_t rows = int64_t(c.batch) * c.sq * hq;
  std::vector<float> o_acc(size_t(c.splits) * rows * d + 8, kFloatNaN), lse_acc(size_t(c.splits) * rows + 1, kFloatNaN);

  AttentionFwdParams p{};
  p.q = c.rotary ? q_rot.data() : q.data();
  p.k = kc.data();
  p.v = vc.data();
  p.q_batch_stride = int64_t(c.sq) * hq * da, p.q_row_stride = int64_t(hq) * da, p.q_head_stride = da;
  p.k_batch_stride = p.v_batch_stride = kbs, p.k_row_stride = p.v_row_stride = krs;
  p.k_head_stride = p.v_head_stride = khs;
  p.o = out.data();
  p.lse = lse.data();
  p.o_batch_stride = p.q_batch_stride, p.o_row_stride = p.q_row_stride, p.o_head_stride = da;
  p.lse_batch_stride = int64_t(hq) * c.sq, p.lse_head_stride = c.sq;
  p.batch = c.batch, p.seqlen_q = c.sq, p.seqlen_k = c.page > 0 ? c.max_blocks * c.page : c.cache_len;
  p.num_heads = hq, p.num_heads_k = c.hk, p.head_dim = p.head_dim_v = d;
  p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat16;
  p.seqused_k = used.data();
  p.window_left = c.wl, p.window_right = c.wr, p.bottom_right = true;
  p.scale = c.scale, p.softcap = c.softcap;
  p.scale_log2 = c.softcap > 0 ? 0.f : float(c.scale * 1.4426950408889634);
  p.block_table = c.page > 0 ? table.data() : nullptr;
  p.block_table_batch_stride = c.page > 0 ? c.max_blocks : 0;
  p.page_block_size = c.page;
  p.cache_batch_idx = c.batch_idx ? bidx.data() : nullptr;
  p.cache_leftpad = c.leftpad ? lp.data() : nullptr;
  p.alibi_slopes = c.alibi ? slopes.data() : nullptr;
  p.alibi_batch_stride = c.alibi == 2 ? hq : 0;

  KvAppendParams a{};
  a.k_new = kn.data(), a.v_new = vn.data();
  a.kn_batch_stride = a.vn_batch_stride = int64_t(c.s_new) * c.hk * da;
  a.kn_row_stride = a.vn_row_stride = int64_t(c.hk) * da;
  a.kn_head_stride = a.vn_head_stride = da;
  a.s_new = c.s_new;
  a.cache_seqlens = seqlens.data();
  if (c.rotary) {
    a.rotary_cos = c.rotary_fp32 ? static_cast<const void*>(cos32.data()) : cos16.data();
    a.rotary_sin = c.rotary_fp32 ? static_cast<const void*>(sin32.data()) : sin16.data();
    a.rotary_row_stride = rh, a.rotary_dim = c.rotary_dim, a.rotary_fp32 = c.rotary_fp32;
    a.rotary_interleaved = c.rotary == 1;
    a.q = q.data(), a.q_rot = q_rot.data();
    a.q_batch_stride = a.qr_batch_stride = p.q_batch_stride;
    a.q_row_stride = a.qr_row_stride = p.q_row_stride;
    a.q_head_stride = a.qr_head_stride = da;
    a.q_per_row = per_row;
  }
  const std::vector<uint16_t> kc_before = kc, vc_before = vc;

  // ---- launches, as KvCacheVariant::append / attend do --------------------------
  emu::clear_ranges();
  emu::add_range(q.data(), q.size() * 2, false);
  emu::add_range(kn.data(), kn.size() * 2, false);
  emu::add_range(vn.data(), vn.size() * 2, false);
  emu::add_range(kc.data(), kc.size() * 2, true);
  emu::add_range(vc.data(), vc.size() * 2, true);
  emu::add_range(q_rot.data(), q_rot.size() * 2, true);
  emu::add_range(out.data(), out.size() * 2, true);
  emu::add_range(lse.data(), lse.size() * 4, true);
  emu::add_range(o_acc.data(), o_acc.size() * 4, true);
  emu::add_range(lse_acc.data(), lse_acc.size() * 4, true);
  if (c.s_new > 0 || c.rotary) {
    const int64_t items = 2 * int64_t(c.batch) * c.s_new * c.hk * (d / 8) +
                          (c.rotary ? int64_t(c.batch) * c.sq * hq * (d / 8) : 0);
    if (items > 0)
      emu::launch(dim3(unsigned((items + 127) / 128)), 128, 0, [&] { kv::kvcache_append_kernel<Element>(p, a); });
  }
  const KvSplitOut w{o_acc.data(), lse_acc.data(), c.splits};
  if (c.mma) {
    using Traits = kv::KvMmaTraits<Element, kHeadDim>;
    const kv::KvCacheGrid g = kv::kvcache_grid(p, Traits::kRows, c.splits);
    emu::launch(dim3(unsigned(g.x), unsigned(g.y), unsigned(g.z)), Traits::kNThreads, Traits::kSmemBytes,
                [&] { kv::kvcache_split_mma_kernel<Traits>(p, w); });
  } else {
    using Traits = kv::KvCacheTraits<Element, kHeadDim>;
    const kv::KvCacheGrid g = kv::kvcache_grid(p, Traits::kRows, c.splits);
    emu::launch(dim3(unsigned(g.x), unsigned(g.y), unsigned(g.z)), Traits::kNThreads, Traits::kSmemBytes,
                [&] { kv::kvcache_split_kernel<Traits>(p, w); });
  }
  if (c.splits > 1)
    emu::launch(dim3(unsigned((rows + 3) / 4)), 128, 0, [&] { kv::kvcache_combine_kernel<Element>(p, w); });

  // ---- reference: rotary in float (as FlashAttention: fp32 math, one rounding)
  auto rotate = [&](const std::vector<uint16_t>& x, int64_t base, int64_t pos, int e) -> float {
    const float xe = to_float(x[base + e], bf16);
    if (!c.rotary || e >= c.rotary_dim) return xe;
    float x0, x1, cs, sn;
    bool first;
    if (c.rotary == 1) {
      first = e % 2 == 0;
      const int i = e / 2;
      cs = cos32[pos * rh + i], sn = sin32[pos * rh + i];
      x0 = to_float(x[base + (first ? e : e - 1)], bf16), x1 = to_float(x[base + (first ? e + 1 : e)], bf16);
    } else {
      first = e < rh;
      const int i = first ? e : e - rh;
      cs = cos32[pos * rh + i], sn = sin32[pos * rh + i];
      x0 = to_float(x[base + i], bf16), x1 = to_float(x[base + i + rh], bf16);
    }
    return first ? x0 * cs - x1 * sn : x0 * sn + x1 * cs;
  };
  // Rounded once to the element type; the kernel may contract to an FMA, so
  // the comparison allows one unit in the last place.
  auto close16 = [&](uint16_t got, float want) {
    const float g16 = to_float(got, bf16), w16 = to_float(to_bits(want, bf16), bf16);
    const float ulp = bf16 ? std::exp2(-7.f) : std::exp2(-10.f);
    return std::fabs(g16 - w16) <= ulp * std::max(std::fabs(w16), 1e-3f) * 1.01f + 1e-6f;
  };
  // The cache after the append: new rows equal, everything else unchanged.
  std::vector<char> is_new(kc.size(), 0);
  for (int b = 0; b < c.batch; ++b)
    for (int s = 0; s < c.s_new; ++s)
      for (int h = 0; h < c.hk; ++h) {
        const int64_t pos = c.seqlens[b] + s;
        for (int e = 0; e < d; ++e) {
          const int64_t idx = cache_at(b, pos, h, e);
          is_new[idx] = 1;
          const float kw = rotate(kn, at4(b, s, h, 0, c.s_new, c.hk), pos, e);
          CHECK_OR_FAIL(close16(kc[idx], kw), "k_cache b=%d s=%d h=%d e=%d got %g want %g\n", b, s, h, e,
                        to_float(kc[idx], bf16), kw);
          CHECK_OR_FAIL(vc[idx] == vn[at4(b, s, h, e, c.s_new, c.hk)], "v_cache b=%d s=%d h=%d e=%d\n", b, s, h, e);
        }
      }
  for (size_t idx = 0; idx < kc.size(); ++idx)
    if (!is_new[idx]) {
      CHECK_OR_FAIL(kc[idx] == kc_before[idx] && vc[idx] == vc_before[idx], "cache element %zu changed\n", idx);
    }
  // The rotated query (what the kernel attends with).
  std::vector<float> qr(q.size(), 0.f);
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < c.sq; ++i)
      for (int h = 0; h < hq; ++h) {
        const int64_t base = at4(b, i, h, 0, c.sq, hq);
        for (int e = 0; e < d; ++e) {
          const float want = rotate(q, base, c.seqlens[b] + (per_row ? i : 0), e);
          if (c.rotary) {
            CHECK_OR_FAIL(close16(q_rot[base + e], want), "q_rot b=%d i=%d h=%d e=%d got %g want %g\n", b, i, h, e,
                          to_float(q_rot[base + e], bf16), want);
            qr[base + e] = to_float(q_rot[base + e], bf16);
          } else {
            qr[base + e] = want;
          }
        }
      }

  // ---- reference attention in float64 -------------------------------------------
  const double atol = bf16 ? 2.5e-2 : 4e-3, kTanhRelErr = std::exp2(-10.987);
  std::vector<char> o_expected(out.size(), 0), lse_expected(lse.size(), 0);
  for (int b = 0; b < c.batch; ++b) {
    const int lk = used[b], off = lk - c.sq;
    for (int h = 0; h < hq; ++h) {
      const int hkv = h / c.group;
      const float slope = c.alibi ? slopes[(c.alibi == 2 ? b * hq : 0) + h] : 0.f;
      for (int i = 0; i < c.sq; ++i) {
        std::vector<double> sc(lk, -INFINITY), serr(lk, 0.0);
        double mx = -INFINITY;
        for (int j = 0; j < lk; ++j) {
          if (c.wl >= 0 && j < int64_t(i) + off - c.wl) continue;
          if (c.wr >= 0 && j > int64_t(i) + off + c.wr) continue;
          const int64_t t = int64_t(j) + c.lp[b];
          double s = 0;
          for (int e = 0; e < d; ++e)
            s += double(qr[at4(b, i, h, e, c.sq, hq)]) * to_float(kc[cache_at(b, t, hkv, e)], bf16);
          s *= c.scale;
          if (c.softcap > 0) {
            s = c.softcap * std::tanh(s / c.softcap);
            serr[j] = kTanhRelErr * std::fabs(s);
          }
          s -= double(slope) * std::fabs(double(i + off - j));
          sc[j] = s;
          mx = std::max(mx, s);
        }
        std::vector<double> o(d, 0.0), o_sfu(d, 0.0);
        double sum = 0, lse_sfu = 0;
        if (mx > -INFINITY) {
          for (int j = 0; j < lk; ++j) {
            if (sc[j] == -INFINITY) continue;
            const double wgt = std::exp(sc[j] - mx);
            sum += wgt;
            for (int e = 0; e < d; ++e) o[e] += wgt * to_float(vc[cache_at(b, j + c.lp[b], hkv, e)], bf16);
          }
          for (double& x : o) x /= sum;
          for (int j = 0; j < lk && c.softcap > 0; ++j) {
            if (sc[j] == -INFINITY) continue;
            const double pe = std::exp(sc[j] - mx) / sum * serr[j];
            lse_sfu += pe;
            for (int e = 0; e < d; ++e)
              o_sfu[e] += pe * std::fabs(to_float(vc[cache_at(b, j + c.lp[b], hkv, e)], bf16) - o[e]);
          }
        }
        const double ref_lse = mx > -INFINITY ? mx + std::log(sum) : -INFINITY;
        const int64_t obase = at4(b, i, h, 0, c.sq, hq);
        for (int e = 0; e < d; ++e) {
          o_expected[obase + e] = 1;
          const float got = to_float(out[obase + e], bf16);
          const double err = std::fabs(got - o[e]);
          res.max_err = std::max(res.max_err, std::isnan(got) ? 1e9 : err);
          CHECK_OR_FAIL(err <= atol + atol * std::fabs(o[e]) + 1.1 * o_sfu[e],
                        "O mismatch b=%d h=%d i=%d e=%d got %g want %g\n", b, h, i, e, got, o[e]);
        }
        const int64_t li = (int64_t(b) * hq + h) * c.sq + i;
        lse_expected[li] = 1;
        const float got = lse[li];
        if (ref_lse == -INFINITY) {
          CHECK_OR_FAIL(got == -INFINITY, "LSE b=%d h=%d i=%d got %g want -inf\n", b, h, i, got);
        } else {
          const double err = std::fabs(got - ref_lse);
          res.max_lse_err = std::max(res.max_lse_err, std::isnan(got) ? 1e9 : err);
          CHECK_OR_FAIL(err <= 2e-3 + 1e-4 * std::fabs(ref_lse) + 1.1 * lse_sfu,
                        "LSE mismatch b=%d h=%d i=%d got %g want %g\n", b, h, i, got, ref_lse);
        }
      }
    }
  }
  for (size_t idx = 0; idx < out.size(); ++idx)
    if (!o_expected[idx]) CHECK_OR_FAIL(out[idx] == kSentinelBits, "O element %zu written outside the rows\n", idx);
  for (size_t idx = 0; idx < lse.size(); ++idx)
    if (!lse_expected[idx]) CHECK_OR_FAIL(lse[idx] == kLseSentinel, "LSE element %zu written\n", idx);
  if (!c.rotary)
    for (size_t idx = 0; idx < q_rot.size(); ++idx)
      CHECK_OR_FAIL(q_rot[idx] == kSentinelBits, "q_rot written without rotary\n");
  return res;
}

// Fixed cases first: the decode shapes of the issue (paged 16/64/256, GQA
// 4:1, append + rotary, leftpad, batch idx, ALiBi) at small sizes.
std::vector<KvCase> fixed_cases() {
  std::vector<KvCase> all;
  for (int page : {16, 64, 256}) {
    KvCase c;
    c.bf16 = page != 64;
    c.d = 128, c.batch = 2, c.hk = 2, c.group = 4, c.sq = 1, c.s_new = 1, c.page = page;
    c.max_blocks = (150 + page - 1) / page, c.cache_len = c.max_blocks * page, c.cache_rows = 2 * c.max_blocks + 1;
    c.seqlens = {149 - page / 16, 37};
    c.lp = {0, 0};
    for (int b = 0; b < 2; ++b)
      for (int k = 0; k < c.max_blocks; ++k) c.table.push_back((b * c.max_blocks + k + 1) % c.cache_rows);
    c.rotary = page == 16 ? 1 : 2, c.rotary_dim = page == 256 ? 64 : 128;
    c.splits = page == 64 ? 3 : 1;
    c.alibi = page == 256 ? 1 : 0;
    all.push_back(c);
  }
  {  // contiguous, batch index, leftpad, causal, several query rows, splits
    KvCase c;
    c.d = 64, c.batch = 3, c.hk = 1, c.group = 8, c.sq = 3, c.s_new = 3, c.cache_len = 97, c.cache_rows = 5;
    c.batch_idx = true, c.bidx = {4, 0, 2};
    c.leftpad = true;
    c.seqlens = {90, 0, 41}, c.lp = {17, 0, 41};
    c.causal = true, c.wr = 0;
    c.alibi = 2, c.splits = 4;
    all.push_back(c);
  }
  {  // odd head dim, window, softcap, fp16, MQA
    KvCase c;
    c.bf16 = false;
    c.d = 72, c.batch = 1, c.hk = 1, c.group = 3, c.sq = 2, c.s_new = 0, c.cache_len = 65, c.cache_rows = 1;
    c.seqlens = {65}, c.lp = {0};
    c.wl = 20, c.wr = 0, c.softcap = 5.f, c.splits = 2;
    all.push_back(c);
  }
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 60;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1u;
  std::printf("kvcache_fwd_emu_test: %d random cases, seed %u; %s\n", cases, seed, emu::cta_order_line().c_str());
  std::fflush(stdout);
  std::mt19937 rng(seed);
  std::vector<KvCase> all = fixed_cases();
  for (int i = 0; i < cases; ++i) all.push_back(random_case(rng));
  // Every case through both split kernels (the data is drawn again per run).
  const size_t n_simt = all.size();
  for (size_t n = 0; n < n_simt; ++n) {
    all.push_back(all[n]);
    all.back().mma = true;
  }
  int failed = 0;
  double worst_fp16 = 0, worst_bf16 = 0, worst_lse = 0;
  for (size_t n = 0; n < all.size(); ++n) {
    const KvCase& c = all[n];
    emu::context() = "case " + std::to_string(n) + ": " + c.describe();
    const Result r = PFA_FP16_SWITCH(c.bf16, Element, [&] {
      if (c.d <= 64) return run_case<Element, 64>(c, rng);
      if (c.d <= 128) return run_case<Element, 128>(c, rng);
      return run_case<Element, 256>(c, rng);
    });
    double& worst = c.bf16 ? worst_bf16 : worst_fp16;
    worst = std::max(worst, r.max_err);
    worst_lse = std::max(worst_lse, r.max_lse_err);
    if (!r.ok) {
      ++failed;
      std::printf("FAIL %s\n", emu::context().c_str());
    }
  }
  const emu::Stats& s = emu::rt().stats;
  std::printf("%zu cases, %d failed; max |O err| fp16 %.2e bf16 %.2e; max |LSE err| %.2e\n", all.size(), failed,
              worst_fp16, worst_bf16, worst_lse);
  std::printf("CTAs %" PRIu64 "; bank conflicts (extra wavefronts): ld.shared.v4 %" PRIu64 "/%" PRIu64
              ", st.shared %" PRIu64 "/%" PRIu64
              " (counted, not failed: the Q staging once per CTA, d = 256's dump stores)\n",
              s.ctas, s.lds128_extra_wavefronts, s.lds128, s.sts_extra_wavefronts, s.sts);
  if (s.lds128_extra_wavefronts) {
    std::printf("FAIL shared-memory bank conflicts in the K / Q / V reads\n");
    return 1;
  }
  return failed ? 1 : 0;
}
