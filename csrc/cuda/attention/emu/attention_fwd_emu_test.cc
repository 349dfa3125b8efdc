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
//   /tmp/attention_fwd_emu_test keep-pattern SEED OFFSET P B H S
//       prints the kernel's dropout keep pattern (see print_keep_pattern)
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

#include "emu_test_common.h"

using pyfastattn::AttentionFwdParams;
using pyfastattn::DType;
using pyfastattn::MaskKind;
namespace attn = pyfastattn::cuda::attention;
namespace emu = pyfastattn::emu;
using namespace pyfastattn::emu_test;  // NOLINT: the shared test vocabulary

namespace {

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
  c.fill_dropout_alibi(p);

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
  std::vector<double> scores, score_err;
  // tanh.approx's documented relative error (2^-10.987, as sm80_emulation.h
  // models it) moves a capped score softcap * tanh(u) by up to this much of
  // itself; to first order O then moves by sum_j P_j err_j |v_j - O| and the
  // LSE by sum_j P_j err_j. Both join the tolerance.
  const double kTanhRelErr = std::exp2(-10.987);
  // The kernel's fp32 scores in log2 units are rounded by up to four
  // operations (scale, + bias, - ALiBi, - the running max), each by at most
  // half an ulp of a value <= |s| log2(e): a weight's relative error is up to
  // 4 |s| 2^-24 (natural units). Negligible for ordinary scores; for a row
  // that an additive mask pushes to -65504 (fp16's lowest) it is ~1.5% of
  // each weight, and one such case (fp16, d = 136, ALiBi) missed the plain
  // tolerance by 30%. Added to score_err like the tanh term.
  const double kScoreRoundErr = 4.0 * std::exp2(-24.0);
  for (int b = 0; b < c.batch; ++b) {
    const int lq = c.len_q[b], lk = c.key_len(b);
    const int offset = c.bottom_right ? lk - lq : 0;
    for (int h = 0; h < c.hq; ++h) {
      const int hkv = h / (c.hq / c.hk);
      for (int i = 0; i < lq; ++i) {
        scores.assign(lk, -INFINITY);
        score_err.assign(lk, 0.0);
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
          if (c.softcap > 0) {
            s = c.softcap * std::tanh(s / c.softcap);
            score_err[j] = kTanhRelErr * std::fabs(s);
          }
          if (c.mask != MaskKind::kNone) s += mask_value(b, h, i, j);
          if (!c.slopes.empty()) s -= double(c.slope(b, h)) * std::fabs(double(i + lk - lq - j));
          score_err[j] += kScoreRoundErr * std::fabs(s);
          scores[j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0;
        std::vector<double> out(c.head_dim, 0.0);
        if (mx > -INFINITY) {
          for (int j = 0; j < lk; ++j) {
            if (scores[j] == -INFINITY) continue;
            const double w = std::exp(scores[j] - mx);
            sum += w;  // the row sum before dropout; kept weights times 1 / (1 - p)
            const double wv = w * c.keep_factor(b, h, i, j);
            auto [kb, kr] = k_row(b, j);
            for (int d = 0; d < c.head_dim; ++d) out[d] += wv * to_float(v.data[v.at(kb, kr, hkv, d)], bf16);
          }
          for (double& x : out) x /= sum;
        }
        std::vector<double> out_sfu(c.head_dim, 0.0);
        double lse_sfu = 0;
        if (mx > -INFINITY) {
          for (int j = 0; j < lk; ++j) {
            if (scores[j] == -INFINITY) continue;
            const double pe = std::exp(scores[j] - mx) / sum * score_err[j] *
                              std::max(1.0, c.keep_factor(b, h, i, j));
            lse_sfu += pe;
            auto [kb, kr] = k_row(b, j);
            for (int d = 0; d < c.head_dim; ++d)
              out_sfu[d] += pe * std::fabs(to_float(v.data[v.at(kb, kr, hkv, d)], bf16) - out[d]);
          }
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
          if (!(err <= atol + atol * std::fabs(out[d]) + 1.1 * out_sfu[d])) {
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
            good = err <= 2e-3 + 1e-4 * std::fabs(ref_lse) + 1.1 * lse_sfu;
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
  l.dropout_p = 0.f, l.slopes.clear();
  Case da;  // dropout (p = 0.9: O scaled by 10) and ALiBi [h], GQA, top-left causal
  da.head_dim = 96, da.batch = 2, da.hq = 4, da.hk = 2, da.len_q = {75, 75}, da.len_k = {140, 140};
  da.window_right = 0, da.dropout_p = 0.9f, da.seed = 0xdeadbeefcafe, da.offset = 1ull << 40;
  da.slopes = {0.5f, 0.0625f, 0.2f, 0.01f};
  out.push_back(da);
  da.dropout_p = 1.f;  // drops every weight: O = 0, the LSE as without dropout
  out.push_back(da);
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

// The keep pattern the CUDA forward applies, read off its output: Q = 0 makes
// every weight 1 / S, and V's rows are one-hot (v_j = e_j, head dim 64), so
// O[b, i, h, j] = keep(b, h, i, j) / ((1 - p) S) is nonzero exactly where
// key j is kept. Prints one line per (b, h, i): "b h i " and S digits 0/1.
// tests/test_dropout_alibi.py compares it with the CPU kernel's pattern for
// the same (seed, offset), the check that both devices drop the same elements.
int print_keep_pattern(uint64_t seed, uint64_t offset, float dropout_p, int batch, int heads, int s) {
  using Traits = attn::AttentionFwdTraits<64, __half>;
  if (s < 1 || s > 64 || batch < 1 || heads < 1) {
    std::printf("keep-pattern: need 1 <= S <= 64, B >= 1, H >= 1\n");
    return 2;
  }
  Case c;
  c.batch = batch, c.hq = c.hk = heads, c.len_q.assign(batch, s), c.len_k.assign(batch, s);
  c.dropout_p = dropout_p, c.seed = seed, c.offset = offset;
  Tensor q = make_tensor(c, batch, s, heads, to_bits(0.f, false));
  Tensor k = make_tensor(c, batch, s, heads, to_bits(0.f, false));
  Tensor v = make_tensor(c, batch, s, heads, to_bits(0.f, false));
  Tensor o = make_tensor(c, batch, s, heads, kSentinelBits);
  for (int b = 0; b < batch; ++b)
    for (int j = 0; j < s; ++j)
      for (int h = 0; h < heads; ++h) v.data[v.at(b, j, h, j)] = to_bits(1.f, false);
  AttentionFwdParams p{};
  p.q = q.data.data(), p.k = k.data.data(), p.v = v.data.data(), p.o = o.data.data();
  p.q_batch_stride = q.bs, p.q_row_stride = q.rs, p.q_head_stride = q.hs;
  p.k_batch_stride = k.bs, p.k_row_stride = k.rs, p.k_head_stride = k.hs;
  p.v_batch_stride = v.bs, p.v_row_stride = v.rs, p.v_head_stride = v.hs;
  p.o_batch_stride = o.bs, p.o_row_stride = o.rs, p.o_head_stride = o.hs;
  p.batch = batch, p.seqlen_q = p.seqlen_k = s, p.num_heads = p.num_heads_k = heads;
  p.head_dim = p.head_dim_v = 64;
  p.dtype = DType::kFloat16;
  p.window_left = p.window_right = -1;
  p.scale = 0.125f, p.scale_log2 = 0.125f * 1.4426950408889634f;
  c.fill_dropout_alibi(p);
  emu::clear_ranges();
  for (const Tensor* t : {&q, &k, &v}) emu::add_range(t->data.data(), t->data.size() * 2, false);
  emu::add_range(o.data.data(), o.data.size() * 2, true);
  const attn::AttentionFwdGrid g = attn::attention_fwd_grid(p, Traits::kBlockM);
  emu::launch(dim3(unsigned(g.m_blocks), unsigned(g.y), unsigned(g.z)), Traits::kNThreads, Traits::kSmemBytes,
              [&] { attn::attention_fwd_kernel<Traits>(p); });
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < s; ++i) {
        std::printf("%d %d %d ", b, h, i);
        for (int j = 0; j < s; ++j) std::printf("%d", to_float(o.data[o.at(b, i, h, j)], false) != 0.f ? 1 : 0);
        std::printf("\n");
      }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 8 && std::string(argv[1]) == "keep-pattern")  // SEED OFFSET P B H S
    return print_keep_pattern(std::stoull(argv[2]), std::stoull(argv[3]), std::stof(argv[4]), std::atoi(argv[5]),
                              std::atoi(argv[6]), std::atoi(argv[7]));
  if (!(check_layout<32>() && check_layout<64>() && check_layout<96>() && check_layout<128>() &&
        check_layout<256>())) {
    std::printf("FAIL shared-memory layout check\n");
    return 1;
  }
  std::printf("layout: swizzle is a bijection; cp.async and O-read phases conflict-free\n");
  const int cases = argc > 1 ? std::atoi(argv[1]) : 200;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1u;
  print_run_header("attention_fwd_emu_test", cases, seed);
  std::mt19937 rng(seed);
  const std::vector<Case> all = all_cases(fixed_cases, cases, rng, CaseLimits{170, 100, 0.85, 0.0});
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
