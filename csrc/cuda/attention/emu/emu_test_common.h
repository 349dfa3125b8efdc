// What the attention forward and backward emulator tests share
// (attention_fwd_emu_test.cc, attention_bwd_emu_test.cc): 16-bit bit
// conversions, the poison and sentinel values, the random test case and its
// description, the strided [b, s, h, d] test tensor, and the run header that
// names the CTA dispatch order. Include after the kernel headers (it needs
// the emulation of sm80_emulation.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../../attention/params.h"

namespace pyfastattn {
namespace emu_test {

// Inputs hold NaN wherever the kernel must not read; outputs hold a
// different NaN (the sentinel) wherever it must not write.
constexpr uint16_t kNaNBits = 0x7fff;       // NaN in fp16 and bf16
constexpr uint16_t kSentinelBits = 0x7e5a;  // another NaN: "never written"
constexpr float kLseSentinel = 12345.f;
const float kFloatNaN = std::numeric_limits<float>::quiet_NaN();

inline float to_float(uint16_t b, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

inline uint16_t to_bits(float f, bool bf16) {
  if (bf16) return __nv_bfloat16_raw(__float2bfloat16_rn(f)).x;
  return __half_raw(__float2half_rn(f)).x;
}

// One attention call: shapes, layout and every masking feature.
struct Case {
  bool bf16 = false;
  int head_dim = 64;
  int batch = 1, hq = 1, hk = 1;
  bool varlen = false;
  std::vector<int> len_q, len_k;  // per sequence: rows present in the tensors
  bool seqused = false;
  std::vector<int> used_k;  // seqused_k
  int window_left = -1, window_right = -1;
  bool bottom_right = false;
  MaskKind mask = MaskKind::kNone;
  bool mask_b1 = false, mask_h1 = false, mask_q1 = false;
  int mask_pad = 0, mask_offset = 0;
  float scale = 0.125f, softcap = 0.f;
  bool with_lse = true;        // forward: write the LSE
  bool deterministic = false;  // backward: dQ by turns
  bool head_major = false;
  int d_pad = 0, row_pad = 0;
  int grid_y = 0;
  // Issue 17: dropout (the keep function of csrc/attention/dropout.h) and
  // ALiBi slopes ([hq] or [batch][hq]).
  float dropout_p = 0.f;
  uint64_t seed = 0, offset = 0;
  std::vector<float> slopes;
  bool slopes_per_batch = false;

  float slope(int b, int h) const { return slopes_per_batch ? slopes[b * hq + h] : slopes[h]; }
  DropoutKey dropout_key() const { return DropoutKey{seed, offset, dropout_threshold(dropout_p)}; }
  // Z: 1 / (1 - p) where query i keeps key j, 0 where it drops it (p = 1:
  // always 0); 1 without dropout.
  double keep_factor(int b, int h, int i, int j) const {
    if (dropout_p <= 0) return 1.0;
    if (!dropout_keep(dropout_key(), b, h, i, j)) return 0.0;
    return 1.0 / (1.0 - double(dropout_p));
  }
  // The params' fields for both features.
  template <typename Params>
  void fill_dropout_alibi(Params& p) const {
    p.dropout_p = dropout_p;
    p.dropout_rescale = dropout_p >= 1.f ? 0.f : 1.f / (1.f - dropout_p);
    p.dropout_rng = nullptr;
    p.dropout = dropout_key();
    p.alibi_slopes = slopes.empty() ? nullptr : slopes.data();
    p.alibi_batch_stride = slopes_per_batch ? hq : 0;
  }

  int seqlen_q() const { return *std::max_element(len_q.begin(), len_q.end()); }
  int seqlen_k() const { return *std::max_element(len_k.begin(), len_k.end()); }
  int key_len(int b) const { return seqused ? used_k[b] : len_k[b]; }
  bool consistent() const {
    return int(len_q.size()) == batch && int(len_k.size()) == batch &&
           (!seqused || int(used_k.size()) == batch) &&
           (slopes.empty() || int(slopes.size()) == (slopes_per_batch ? batch : 1) * hq);
  }

  std::string describe() const {
    std::ostringstream s;
    s << (bf16 ? "bf16" : "fp16") << " d=" << head_dim << " b=" << batch << " hq=" << hq
      << " hk=" << hk << (varlen ? " varlen" : " dense") << " lq=[";
    for (int x : len_q) s << x << ",";
    s << "] lk=[";
    for (int x : len_k) s << x << ",";
    s << "]";
    if (seqused) {
      s << " used=[";
      for (int x : used_k) s << x << ",";
      s << "]";
    }
    s << " win=(" << window_left << "," << window_right << ")" << (bottom_right ? " br" : " tl")
      << " mask=" << int(mask) << (mask_b1 ? "b1" : "") << (mask_h1 ? "h1" : "")
      << (mask_q1 ? "q1" : "") << " mpad=" << mask_pad << " moff=" << mask_offset
      << " scale=" << scale << " softcap=" << softcap << " lse=" << with_lse
      << " det=" << deterministic << (head_major ? " bhsd" : " bshd") << " dpad=" << d_pad
      << " rpad=" << row_pad << " gy=" << grid_y;
    if (dropout_p > 0) s << " dropout=" << dropout_p << " seed=" << seed << " offset=" << offset;
    if (!slopes.empty()) s << " alibi" << (slopes_per_batch ? "[b,h]" : "[h]");
    return s.str();
  }
};

// What random_case draws differently for the forward and the backward.
struct CaseLimits {
  int max_len_small_d;  // sequence length cap for head_dim <= 128
  int max_len_large_d;  // ... and above (the emulation's time grows with d)
  double p_with_lse;    // chance of writing the LSE (forward)
  double p_deterministic;  // chance of the deterministic dQ (backward)
};

inline Case random_case(std::mt19937& rng, int index, const CaseLimits& lim) {
  auto pick = [&](std::initializer_list<int> xs) {
    std::vector<int> v(xs);
    return v[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng)];
  };
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto len = [&](int hi) {
    // Mostly small, sometimes 0 or 1, sometimes across several blocks.
    const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
    if (kind == 0) return 0;
    if (kind == 1) return 1;
    if (kind <= 5) return std::uniform_int_distribution<int>(2, 40)(rng);
    return std::uniform_int_distribution<int>(41, hi)(rng);
  };
  Case c;
  c.bf16 = chance(0.5);
  c.head_dim = pick({8, 16, 24, 32, 40, 48, 64, 72, 80, 96, 104, 128, 136, 160, 192, 256});
  const int size_cap = c.head_dim > 128 ? lim.max_len_large_d : lim.max_len_small_d;
  c.batch = pick({1, 1, 2, 3});
  c.hk = pick({1, 1, 2});
  c.hq = c.hk * pick({1, 1, 2, 3});
  c.varlen = chance(0.35);
  if (c.varlen) {
    for (int b = 0; b < c.batch; ++b) {
      c.len_q.push_back(len(size_cap));
      c.len_k.push_back(len(size_cap));
    }
  } else {
    const int lq = len(size_cap), lk = len(size_cap);
    c.len_q.assign(c.batch, lq);
    c.len_k.assign(c.batch, lk);
  }
  if (c.seqlen_q() == 0 && chance(0.8)) {
    if (c.varlen) c.len_q[0] = 1 + index % 7;
    else c.len_q.assign(c.batch, 1 + index % 7);  // dense: one length for all
  }
  c.seqused = chance(0.25);
  if (c.seqused)
    for (int b = 0; b < c.batch; ++b)
      c.used_k.push_back(std::uniform_int_distribution<int>(0, c.len_k[b])(rng));
  const int mode = std::uniform_int_distribution<int>(0, 5)(rng);
  if (mode == 1) c.window_right = 0;  // causal
  if (mode == 2) c.window_left = pick({0, 1, 5, 31, 64, 100}), c.window_right = pick({0, 3, 40});
  if (mode == 3) c.window_left = pick({0, 7, 70});
  if (mode == 4) c.window_right = pick({2, 33});
  c.bottom_right = chance(0.5);
  if (!c.varlen && chance(0.35)) {
    c.mask = chance(0.5) ? MaskKind::kBool : MaskKind::kAdditive;
    c.mask_b1 = chance(0.4), c.mask_h1 = chance(0.5), c.mask_q1 = chance(0.2);
    c.mask_pad = pick({0, 1, 2, 3, 8});
    c.mask_offset = pick({0, 1, 2, 3});
  }
  c.scale = std::uniform_real_distribution<float>(0.05f, 0.6f)(rng);
  if (chance(0.25)) c.softcap = pick({2, 5, 30});
  c.with_lse = chance(lim.p_with_lse);
  c.deterministic = chance(lim.p_deterministic);
  c.head_major = chance(0.3);
  c.d_pad = pick({0, 0, 8, 24});
  c.row_pad = pick({0, 0, 8, 40});
  c.grid_y = chance(0.3) ? pick({1, 2, 3, 5}) : 0;
  if (chance(0.3)) {  // p = 1 drops every weight (O = 0, and every gradient 0)
    c.dropout_p = pick({1, 5, 9, 9, 10}) / 10.f;
    c.seed = (uint64_t(rng()) << 32) | rng();
    c.offset = (uint64_t(rng()) << 32) | rng();
  }
  if (chance(0.3)) {
    c.slopes_per_batch = chance(0.5);
    std::uniform_real_distribution<float> sl(0.f, 0.5f);
    for (int x = 0; x < (c.slopes_per_batch ? c.batch : 1) * c.hq; ++x) c.slopes.push_back(sl(rng));
  }
  return c;
}

// A [b, s, h, d] tensor (varlen: b = 1, s = total rows) with padded strides.
struct Tensor {
  std::vector<uint16_t> data;
  int64_t bs = 0, rs = 0, hs = 0;
  int64_t at(int b, int s, int h, int d) const { return b * bs + s * rs + h * hs + d; }
};

inline Tensor make_tensor(const Case& c, int nb, int ns, int nh, uint16_t fill) {
  Tensor t;
  const int d_alloc = c.head_dim + c.d_pad;
  if (c.head_major && !c.varlen) {
    t.rs = d_alloc;
    t.hs = int64_t(ns) * d_alloc + c.row_pad;
    t.bs = nh * t.hs;
  } else {
    t.hs = d_alloc;
    t.rs = int64_t(nh) * d_alloc + c.row_pad;
    t.bs = int64_t(ns) * t.rs + c.row_pad;
  }
  const int64_t size = std::max<int64_t>(1, nb * t.bs + 8);
  t.data.assign(size, fill);
  return t;
}

// The fixed cases, then `count` random ones; exits if a case is inconsistent.
template <typename Fixed>
std::vector<Case> all_cases(Fixed fixed_cases, int count, std::mt19937& rng, const CaseLimits& lim) {
  std::vector<Case> all = fixed_cases();
  for (int i = 0; i < count; ++i) all.push_back(random_case(rng, i, lim));
  for (const Case& c : all)
    if (!c.consistent()) {
      std::printf("bad test case: %s\n", c.describe().c_str());
      std::exit(2);
    }
  return all;
}

// The first line of every emulator test's output: the case count, the seed
// and the CTA dispatch order (PFA_EMU_CTA_ORDER, PFA_EMU_CTA_SEED).
inline void print_run_header(const char* test, int cases, unsigned seed) {
  std::printf("%s: %d random cases, seed %u; %s\n", test, cases, seed,
              emu::cta_order_line().c_str());
  std::fflush(stdout);
}

}  // namespace emu_test
}  // namespace pyfastattn
