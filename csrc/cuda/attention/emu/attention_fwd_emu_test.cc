// Runs the CUDA attention forward kernel under the CPU emulation of its sm_80
// primitives (sm80_emulation.h) on random configurations, and compares O and
// LSE with a float64 reference written from the contract in
// csrc/attention/params.h, not from the kernel. It exercises the kernel's
// indexing, masking, pipeline barriers and fragment layouts; it cannot show
// speed, hardware rounding, or compiler bugs. A standalone program (it has a
// main): not part of the extension build.
//
//   g++ -std=c++17 -O2 -DPFA_ATTN_HOST_EMULATION -I/usr/local/cuda/include
//       csrc/cuda/attention/emu/attention_fwd_emu_test.cc -o /tmp/attention_fwd_emu_test
//   /tmp/attention_fwd_emu_test [cases=200] [seed=1]    (about 8 s per 100 cases)
// Exit status 0 when every case and the bank-conflict counts pass.
//
// Inputs hold NaN wherever the kernel must not read (head-dim and row
// padding, keys past seqused_k), outputs a sentinel wherever it must not
// write; every case checks both.
#include "../attention_fwd_launch.h"  // first: cuda_runtime.h before the emulation macros
#include "../static_switch.h"
#include "../attention_fwd_kernel.cuh"

#include <algorithm>
#include <cinttypes>
#include <limits>
#include <random>
#include <sstream>

using pyfastattn::AttentionFwdParams;
using pyfastattn::DType;
using pyfastattn::MaskKind;
namespace attn = pyfastattn::cuda::attention;
namespace emu = pyfastattn::emu;

namespace {

constexpr uint16_t kNaNBits = 0x7fff;       // NaN in fp16 and bf16
constexpr uint16_t kSentinelBits = 0x7e5a;  // another NaN: "never written"
constexpr float kLseSentinel = 12345.f;

float to_float(uint16_t b, bool bf16) {
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

uint16_t to_bits(float f, bool bf16) {
  if (bf16) return __nv_bfloat16_raw(__float2bfloat16_rn(f)).x;
  return __half_raw(__float2half_rn(f)).x;
}

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
  bool with_lse = true;
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
  int seqlen_q() const { return *std::max_element(len_q.begin(), len_q.end()); }
  int seqlen_k() const { return *std::max_element(len_k.begin(), len_k.end()); }
  int key_len(int b) const { return seqused ? used_k[b] : len_k[b]; }

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
      << (head_major ? " bhsd" : " bshd") << " dpad=" << d_pad << " rpad=" << row_pad
      << " gy=" << grid_y;
    if (dropout_p > 0) s << " dropout=" << dropout_p << " seed=" << seed << " offset=" << offset;
    if (!slopes.empty()) s << " alibi" << (slopes_per_batch ? "[b,h]" : "[h]");
    return s.str();
  }
};

// A [b, s, h, d] tensor (varlen: b = 1, s = total rows) with padded strides.
struct Tensor {
  std::vector<uint16_t> data;
  int64_t bs = 0, rs = 0, hs = 0;
  int64_t at(int b, int s, int h, int d) const { return b * bs + s * rs + h * hs + d; }
};

Tensor make_tensor(const Case& c, int nb, int ns, int nh, uint16_t fill) {
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

struct Result {
  bool ok = true;
  double max_err = 0, max_lse_err = 0;
  int64_t checked = 0;
};

template <typename Element, int kHeadDim>
Result run_case(const Case& c, std::mt19937& rng) {
  using Traits = attn::AttentionFwdTraits<kHeadDim, Element>;
  const bool bf16 = c.bf16;
  std::normal_distribution<float> normal(0.f, 1.f);

  // ---- sequences -------------------------------------------------------------
  std::vector<int32_t> cu_q(c.batch + 1, 0), cu_k(c.batch + 1, 0);
  for (int b = 0; b < c.batch; ++b) {
    cu_q[b + 1] = cu_q[b] + c.len_q[b];
    cu_k[b + 1] = cu_k[b] + c.len_k[b];
  }
  const int sq = c.seqlen_q(), sk = c.seqlen_k();
  const int nb = c.varlen ? 1 : c.batch;
  const int nsq = c.varlen ? cu_q[c.batch] : sq;
  const int nsk = c.varlen ? cu_k[c.batch] : sk;
  auto q_row = [&](int b, int i) { return c.varlen ? std::make_pair(0, cu_q[b] + i) : std::make_pair(b, i); };
  auto k_row = [&](int b, int j) { return c.varlen ? std::make_pair(0, cu_k[b] + j) : std::make_pair(b, j); };

  // ---- inputs: NaN everywhere the kernel must not read -----------------------
  Tensor q = make_tensor(c, nb, nsq, c.hq, kNaNBits);
  Tensor k = make_tensor(c, nb, nsk, c.hk, kNaNBits);
  Tensor v = make_tensor(c, nb, nsk, c.hk, kNaNBits);
  for (int b = 0; b < c.batch; ++b) {
    for (int i = 0; i < c.len_q[b]; ++i)
      for (int h = 0; h < c.hq; ++h)
        for (int d = 0; d < c.head_dim; ++d) {
          auto [bb, r] = q_row(b, i);
          q.data[q.at(bb, r, h, d)] = to_bits(normal(rng), bf16);
        }
    for (int j = 0; j < c.key_len(b); ++j)
      for (int h = 0; h < c.hk; ++h)
        for (int d = 0; d < c.head_dim; ++d) {
          auto [bb, r] = k_row(b, j);
          k.data[k.at(bb, r, h, d)] = to_bits(normal(rng), bf16);
          v.data[v.at(bb, r, h, d)] = to_bits(normal(rng), bf16);
        }
  }

  // ---- mask [b|1, hq|1, sq|1, sk] ---------------------------------------------
  std::vector<uint8_t> mask_bytes;
  int64_t mbs = 0, mhs = 0, mrs = 0;
  const int es = c.mask == MaskKind::kBool ? 1 : 2;
  if (c.mask != MaskKind::kNone) {
    const int mb = c.mask_b1 ? 1 : c.batch, mh = c.mask_h1 ? 1 : c.hq, mq = c.mask_q1 ? 1 : sq;
    const int64_t row = sk + c.mask_pad;
    mrs = c.mask_q1 ? 0 : row;
    mhs = c.mask_h1 ? 0 : int64_t(mq) * row;
    mbs = c.mask_b1 ? 0 : int64_t(mh) * mq * row;
    const int64_t elems = int64_t(mb) * mh * mq * row + c.mask_offset + 4;
    mask_bytes.resize(elems * es);
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& x : mask_bytes) x = static_cast<uint8_t>(byte(rng));  // garbage in padding
    std::uniform_real_distribution<float> uni(0.f, 1.f);
    const float lowest_bf16 = -3.3895313892515355e38f;
    for (int b = 0; b < mb; ++b)
      for (int h = 0; h < mh; ++h)
        for (int i = 0; i < mq; ++i) {
          const float row_kind = uni(rng);  // some rows fully hidden
          for (int j = 0; j < sk; ++j) {
            const int64_t e = c.mask_offset + b * mbs + h * mhs + i * mrs + j;
            if (c.mask == MaskKind::kBool) {
              const uint8_t vals[4] = {1, 2, 255, 17};
              mask_bytes[e] = row_kind < 0.08f ? 0 : (uni(rng) < 0.3f ? 0 : vals[byte(rng) % 4]);
            } else {
              float x = normal(rng);
              const float r = uni(rng);
              if (row_kind < 0.05f) x = -INFINITY;
              else if (row_kind < 0.1f) x = bf16 ? lowest_bf16 : -65504.f;
              else if (r < 0.15f) x = -INFINITY;
              else if (r < 0.2f) x = bf16 ? lowest_bf16 : -65504.f;
              const uint16_t bits = to_bits(x, bf16);
              std::memcpy(&mask_bytes[2 * e], &bits, 2);
            }
          }
        }
  }
  auto mask_value = [&](int b, int h, int i, int j) -> double {
    const int64_t e = c.mask_offset + b * mbs + h * mhs + int64_t(i) * mrs + j;
    if (c.mask == MaskKind::kBool) return mask_bytes[e] != 0 ? 0.0 : -INFINITY;
    uint16_t bits;
    std::memcpy(&bits, &mask_bytes[2 * e], 2);
    return to_float(bits, bf16);
  };

  // ---- outputs: sentinel everywhere ---------------------------------------------
  Tensor o = make_tensor(c, nb, nsq, c.hq, kSentinelBits);
  std::vector<float> lse;
  int64_t lse_bs = 0, lse_hs = 0;
  if (c.with_lse) {
    if (c.varlen) {
      lse_hs = nsq + 3;
      lse.assign(c.hq * lse_hs + 1, kLseSentinel);
    } else {
      lse_hs = sq + 5;
      lse_bs = c.hq * lse_hs + 2;
      lse.assign(c.batch * lse_bs + 1, kLseSentinel);
    }
  }

  // ---- params ---------------------------------------------------------------
  AttentionFwdParams p{};
  p.q = q.data.data();
  p.k = k.data.data();
  p.v = v.data.data();
  p.q_batch_stride = q.bs, p.q_row_stride = q.rs, p.q_head_stride = q.hs;
  p.k_batch_stride = k.bs, p.k_row_stride = k.rs, p.k_head_stride = k.hs;
  p.v_batch_stride = v.bs, p.v_row_stride = v.rs, p.v_head_stride = v.hs;
  p.o = o.data.data();
  p.o_batch_stride = o.bs, p.o_row_stride = o.rs, p.o_head_stride = o.hs;
  p.lse = c.with_lse ? lse.data() : nullptr;
  p.lse_batch_stride = lse_bs, p.lse_head_stride = lse_hs;
  p.batch = c.batch;
  p.seqlen_q = sq;
  p.seqlen_k = sk;
  p.num_heads = c.hq;
  p.num_heads_k = c.hk;
  p.head_dim = p.head_dim_v = c.head_dim;
  p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat16;
  p.cu_seqlens_q = c.varlen ? cu_q.data() : nullptr;
  p.cu_seqlens_k = c.varlen ? cu_k.data() : nullptr;
  p.seqused_k = c.seqused ? c.used_k.data() : nullptr;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  p.bottom_right = c.bottom_right;
  p.mask_kind = c.mask;
  p.mask = c.mask != MaskKind::kNone ? mask_bytes.data() + c.mask_offset * es : nullptr;
  p.mask_batch_stride = mbs, p.mask_head_stride = mhs, p.mask_row_stride = mrs;
  p.scale = c.scale;
  p.softcap = c.softcap;
  p.scale_log2 = c.softcap > 0.f ? 0.f : c.scale * 1.4426950408889634f;
  p.dropout_p = c.dropout_p;
  p.dropout_rescale = c.dropout_p >= 1.f ? 0.f : 1.f / (1.f - c.dropout_p);
  p.dropout_rng = nullptr;
  p.dropout = pyfastattn::DropoutKey{c.seed, c.offset, pyfastattn::dropout_threshold(c.dropout_p)};
  p.alibi_slopes = c.slopes.empty() ? nullptr : c.slopes.data();
  p.alibi_batch_stride = c.slopes_per_batch ? c.hq : 0;

  emu::clear_ranges();
  emu::add_range(q.data.data(), q.data.size() * 2, false);
  emu::add_range(k.data.data(), k.data.size() * 2, false);
  emu::add_range(v.data.data(), v.data.size() * 2, false);
  if (!mask_bytes.empty()) emu::add_range(mask_bytes.data(), mask_bytes.size(), false);
  emu::add_range(o.data.data(), o.data.size() * 2, true);
  if (c.with_lse) emu::add_range(lse.data(), lse.size() * 4, true);

  // ---- launch, as AttentionFwdVariant::run does (optionally another y/z split) ---
  attn::AttentionFwdGrid g = attn::attention_fwd_grid(p, Traits::kBlockM);
  if (c.grid_y > 0 && g.y > 0) {
    g.y = std::min<int64_t>(c.grid_y, g.y);
    g.z = (int64_t(c.hq) * c.batch + g.y - 1) / g.y;
  }
  if (g.m_blocks > 0 && g.y > 0) {
    const size_t smem = Traits::kSmemBytes + (c.mask != MaskKind::kNone ? Traits::kSmemMaskBytes : 0);
    emu::launch(dim3(unsigned(g.m_blocks), unsigned(g.y), unsigned(g.z)), Traits::kNThreads, smem,
                [&] { attn::attention_fwd_kernel<Traits>(p); });
  }

  // ---- reference and comparison ------------------------------------------------
  Result res;
  const double atol = bf16 ? 2.5e-2 : 4e-3;
  std::vector<bool> o_expected(o.data.size(), false), lse_expected(lse.size(), false);
  std::vector<double> scores;
  for (int b = 0; b < c.batch; ++b) {
    const int lq = c.len_q[b], lk = c.key_len(b);
    const int offset = c.bottom_right ? lk - lq : 0;
    for (int h = 0; h < c.hq; ++h) {
      const int hkv = h / (c.hq / c.hk);
      for (int i = 0; i < lq; ++i) {
        scores.assign(lk, -INFINITY);
        double mx = -INFINITY;
        auto [qb, qr] = q_row(b, i);
        for (int j = 0; j < lk; ++j) {
          if (c.window_left >= 0 && j < int64_t(i) + offset - c.window_left) continue;
          if (c.window_right >= 0 && j > int64_t(i) + offset + c.window_right) continue;
          auto [kb, kr] = k_row(b, j);
          double s = 0;
          for (int d = 0; d < c.head_dim; ++d)
            s += double(to_float(q.data[q.at(qb, qr, h, d)], bf16)) *
                 double(to_float(k.data[k.at(kb, kr, hkv, d)], bf16));
          s *= c.scale;
          if (c.softcap > 0) s = c.softcap * std::tanh(s / c.softcap);
          if (c.mask != MaskKind::kNone) s += mask_value(b, h, i, j);
          if (!c.slopes.empty()) s -= double(c.slope(b, h)) * std::fabs(double(i + c.key_len(b) - lq - j));
          scores[j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0;
        std::vector<double> out(c.head_dim, 0.0);
        if (mx > -INFINITY) {
          for (int j = 0; j < lk; ++j) {
            if (scores[j] == -INFINITY) continue;
            const double w = std::exp(scores[j] - mx);
            sum += w;
            double wv = w;  // dropout after the row sum, kept weights scaled by 1 / (1 - p)
            if (c.dropout_p > 0)
              wv = pyfastattn::dropout_keep(p.dropout, b, h, i, j) ? w / (1.0 - c.dropout_p) : 0.0;
            auto [kb, kr] = k_row(b, j);
            for (int d = 0; d < c.head_dim; ++d) out[d] += wv * to_float(v.data[v.at(kb, kr, hkv, d)], bf16);
          }
          for (double& x : out) x /= sum;
        }
        const double ref_lse = mx > -INFINITY ? mx + std::log(sum) : -INFINITY;
        auto [ob, orow] = q_row(b, i);
        for (int d = 0; d < c.head_dim; ++d) {
          const int64_t idx = o.at(ob, orow, h, d);
          o_expected[idx] = true;
          const float got = to_float(o.data[idx], bf16);
          const double err = std::fabs(got - out[d]);
          res.max_err = std::max(res.max_err, std::isnan(got) ? 1e9 : err);
          ++res.checked;
          if (!(err <= atol + atol * std::fabs(out[d]))) {
            if (res.ok)
              std::printf("  O mismatch b=%d h=%d i=%d d=%d got %g want %g\n", b, h, i, d, got, out[d]);
            res.ok = false;
          }
        }
        if (c.with_lse) {
          const int64_t idx = c.varlen ? h * lse_hs + cu_q[b] + i : b * lse_bs + h * lse_hs + i;
          lse_expected[idx] = true;
          const float got = lse[idx];
          bool good;
          if (ref_lse == -INFINITY) good = got == -INFINITY;
          else if (ref_lse < -1e30) good = got < -1e30;  // rows hidden only by lowest-value biases
          else {
            const double err = std::fabs(got - ref_lse);
            res.max_lse_err = std::max(res.max_lse_err, std::isnan(got) ? 1e9 : err);
            good = err <= 2e-3 + 1e-4 * std::fabs(ref_lse);
          }
          if (!good) {
            if (res.ok) std::printf("  LSE mismatch b=%d h=%d i=%d got %g want %g\n", b, h, i, got, ref_lse);
            res.ok = false;
          }
        }
      }
    }
  }
  for (size_t idx = 0; idx < o.data.size(); ++idx)
    if (!o_expected[idx] && o.data[idx] != kSentinelBits) {
      if (res.ok) std::printf("  O element %zu written but outside the output rows\n", idx);
      res.ok = false;
    }
  for (size_t idx = 0; idx < lse.size(); ++idx)
    if (!lse_expected[idx] && lse[idx] != kLseSentinel) {
      if (res.ok) std::printf("  LSE element %zu written but outside the output rows\n", idx);
      res.ok = false;
    }
  return res;
}

Case random_case(std::mt19937& rng, int index) {
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
  const int size_cap = c.head_dim > 128 ? 100 : 170;
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
  c.with_lse = chance(0.85);
  c.head_major = chance(0.3);
  c.d_pad = pick({0, 0, 8, 24});
  c.row_pad = pick({0, 0, 8, 40});
  c.grid_y = chance(0.3) ? pick({1, 2, 3, 5}) : 0;
  if (chance(0.3)) {
    c.dropout_p = pick({1, 5, 9}) / 10.f;
    c.seed = rng();
    c.offset = (uint64_t(rng()) << 32) | rng();
  }
  if (chance(0.3)) {
    c.slopes_per_batch = chance(0.5);
    std::uniform_real_distribution<float> sl(0.f, 0.5f);
    for (int x = 0; x < (c.slopes_per_batch ? c.batch : 1) * c.hq; ++x) c.slopes.push_back(sl(rng));
  }
  return c;
}

// The mask-tile path must see its words at any alignment of the mask rows, so
// a few fixed cases pin the edge cases down besides the random ones.
std::vector<Case> fixed_cases() {
  std::vector<Case> out;
  Case c;
  c.head_dim = 64, c.len_q = {1}, c.len_k = {1};
  out.push_back(c);                                      // one query, one key
  c.len_q = {130}, c.len_k = {70}, c.window_right = 0;   // causal top-left, lq > lk
  out.push_back(c);
  c.bottom_right = true;                                  // bottom-right: first rows see nothing
  out.push_back(c);
  c.len_q = {0}, c.len_k = {5};                           // no queries
  out.push_back(c);
  c.len_q = {9}, c.len_k = {0}, c.window_right = -1;      // no keys: O = 0, LSE = -inf
  out.push_back(c);
  Case m;
  m.head_dim = 128, m.len_q = {33}, m.len_k = {77}, m.mask = MaskKind::kAdditive, m.mask_pad = 1,
  m.mask_offset = 1, m.bf16 = true;
  out.push_back(m);
  m.mask = MaskKind::kBool, m.mask_pad = 3, m.mask_offset = 3, m.softcap = 5;
  out.push_back(m);
  Case v;
  v.varlen = true, v.batch = 3, v.head_dim = 96, v.len_q = {5, 0, 140}, v.len_k = {70, 3, 1};
  v.hq = 4, v.hk = 2, v.window_left = 3, v.window_right = 0, v.bottom_right = true;
  out.push_back(v);
  v.seqused = true, v.used_k = {33, 0, 1}, v.window_left = -1, v.window_right = -1;
  out.push_back(v);
  Case w;
  w.head_dim = 256, w.len_q = {70}, w.len_k = {130}, w.window_left = 0, w.window_right = 0;
  out.push_back(w);  // diagonal only
  w.head_dim = 32, w.batch = 2, w.hq = 6, w.hk = 1, w.grid_y = 5, w.softcap = 30;
  w.len_q = {70, 70}, w.len_k = {130, 130};
  out.push_back(w);  // MQA, a y/z grid split with rounding
  Case l;  // long sequences: many trips through the K/V pipeline
  l.varlen = true, l.batch = 2, l.head_dim = 64, l.len_q = {300, 257}, l.len_k = {700, 129};
  l.window_right = 0, l.bottom_right = true, l.bf16 = true;
  out.push_back(l);
  l.dropout_p = 0.3f, l.seed = 12345, l.offset = 678;  // issue 17: dropout + ALiBi over many blocks
  l.slopes = {0.1f, 0.25f}, l.slopes_per_batch = true;
  out.push_back(l);
  l.head_dim = 128, l.window_left = 200, l.softcap = 30, l.bf16 = false;
  out.push_back(l);
  Case a;  // additive mask over several key blocks, odd row stride, misaligned base
  a.head_dim = 256, a.batch = 2, a.hq = 2, a.hk = 2, a.len_q = {70, 70}, a.len_k = {301, 301};
  a.mask = MaskKind::kAdditive, a.mask_pad = 5, a.mask_offset = 1, a.window_right = 0,
  a.bottom_right = true;
  out.push_back(a);
  return out;
}

// Static checks of the shared-memory layout for one head dim: the swizzle maps
// a tile's chunks one-to-one onto itself, and every 8-lane phase of the
// cp.async tile copy (load_rows_async's thread mapping) and of the O staging
// reads hits 8 different 16-byte bank groups. (ldmatrix and the 4-byte O
// staging stores are counted while the kernel runs.)
template <int kHeadDim>
bool check_layout() {
  using Tile = attn::SwizzledRows<kHeadDim>;
  constexpr int kChunks = kHeadDim / 8, kRows = 128;
  std::vector<int> hits(kRows * kChunks, 0);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) ++hits[Tile::offset(r, c) / 16];
  for (int h : hits)
    if (h != 1) return false;
  constexpr int kSpan = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  for (int pass = 0; pass < 4; ++pass)
    for (int phase = 0; phase < 16; ++phase) {
      int groups = 0, lanes = 0;
      for (int t = 8 * phase; t < 8 * phase + 8; ++t) {
        const int chunk = t % kSpan, row = t / kSpan + pass * (128 / kSpan);
        if (chunk >= kChunks) continue;
        groups |= 1 << ((Tile::offset(row, chunk) / 16) % 8);
        ++lanes;
      }
      if (__builtin_popcount(groups) != lanes) return false;
    }
  for (int it = 0; it < 8; ++it)  // store_out: 32 lanes read chunks it*32 + lane
    for (int phase = 0; phase < 4; ++phase) {
      int groups = 0;
      for (int l = 8 * phase; l < 8 * phase + 8; ++l) {
        const int idx = it * 32 + l;
        groups |= 1 << ((Tile::offset(idx / kChunks, idx % kChunks) / 16) % 8);
      }
      if (__builtin_popcount(groups) != 8) return false;
    }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (!(check_layout<32>() && check_layout<64>() && check_layout<96>() && check_layout<128>() &&
        check_layout<256>())) {
    std::printf("FAIL shared-memory layout check\n");
    return 1;
  }
  std::printf("layout: swizzle is a bijection; cp.async and O-read phases conflict-free\n");
  const int cases = argc > 1 ? std::atoi(argv[1]) : 200;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1u;
  std::mt19937 rng(seed);
  std::vector<Case> all = fixed_cases();
  for (int i = 0; i < cases; ++i) all.push_back(random_case(rng, i));
  for (const Case& c : all)
    if (int(c.len_q.size()) != c.batch || int(c.len_k.size()) != c.batch ||
        (c.seqused && int(c.used_k.size()) != c.batch)) {
      std::printf("bad test case: %s\n", c.describe().c_str());
      return 2;
    }
  int failed = 0;
  double worst_fp16 = 0, worst_bf16 = 0, worst_lse = 0;
  for (size_t n = 0; n < all.size(); ++n) {
    const Case& c = all[n];
    emu::context() = "case " + std::to_string(n) + ": " + c.describe();
    AttentionFwdParams sel{};
    sel.head_dim = c.head_dim;
    const Result r = PFA_FP16_SWITCH(c.bf16, Element, [&] {
      return PFA_HEADDIM_SWITCH(sel.head_dim, kHeadDim, [&] { return run_case<Element, kHeadDim>(c, rng); });
    });
    (c.bf16 ? worst_bf16 : worst_fp16) = std::max(c.bf16 ? worst_bf16 : worst_fp16, r.max_err);
    worst_lse = std::max(worst_lse, r.max_lse_err);
    if (!r.ok) {
      ++failed;
      std::printf("FAIL %s\n", emu::context().c_str());
    }
  }
  const emu::Stats& s = emu::rt().stats;
  std::printf("%zu cases, %d failed; max |O err| fp16 %.2e bf16 %.2e; max |LSE err| %.2e\n",
              all.size(), failed, worst_fp16, worst_bf16, worst_lse);
  std::printf("CTAs %" PRIu64 ", mma %" PRIu64 "; bank conflicts (extra wavefronts): ldmatrix %" PRIu64
              "/%" PRIu64 ", st.shared %" PRIu64 "/%" PRIu64 ", ld.shared.v4 %" PRIu64 "/%" PRIu64 "\n",
              s.ctas, s.mma, s.ldmatrix_extra_wavefronts, s.ldmatrix, s.sts_extra_wavefronts, s.sts,
              s.lds128_extra_wavefronts, s.lds128);
  if (s.ldmatrix_extra_wavefronts || s.sts_extra_wavefronts || s.lds128_extra_wavefronts) {
    std::printf("FAIL shared-memory bank conflicts in the kernel's ldmatrix / staging accesses\n");
    return 1;
  }
  return failed ? 1 : 0;
}
