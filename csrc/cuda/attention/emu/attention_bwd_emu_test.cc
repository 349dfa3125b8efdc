// Runs the CUDA attention backward (preprocess, main kernel, dQ convert) under
// the CPU emulation of its sm_80 primitives (sm80_emulation.h) on random
// configurations, and compares dQ, dK and dV with float64 gradients written
// from the contract in csrc/attention/params.h (the derivative of the
// forward it defines), not from the kernel. Like the forward's test it shows
// indexing, masking, pipeline barriers, fragment layouts and the
// deterministic turn-taking; not speed, hardware rounding or compiler bugs. A
// standalone program (it has a main): not part of the extension build.
//
//   g++ -std=c++17 -O2 -DPFA_ATTN_HOST_EMULATION -I/usr/local/cuda/include
//       csrc/cuda/attention/emu/attention_bwd_emu_test.cc -o /tmp/attention_bwd_emu_test
//   /tmp/attention_bwd_emu_test [cases=120] [seed=1]
// Exit status 0 when every case and the bank-conflict counts pass.
//
// Inputs hold NaN wherever the kernel must not read (head-dim and row
// padding, keys past seqused_k, query rows no sequence owns), outputs and
// the workspaces a sentinel wherever it must not write (the workspaces NaN:
// every value the kernel uses must have been written by it first). A
// deterministic case runs twice and must give bit-identical dQ; its
// semaphores must end at the number of key blocks each query block sees.
#include "../attention_bwd_launch.h"  // first: cuda_runtime.h before the emulation macros
#include "../static_switch.h"
#include "../attention_bwd_kernel.cuh"
#include "../attention_bwd_traits.h"

#include <algorithm>
#include <cinttypes>
#include <limits>
#include <random>
#include <sstream>

#include "emu_test_common.h"

using pyfastattn::AttentionBwdParams;
using pyfastattn::DType;
using pyfastattn::MaskKind;
using pyfastattn::cuda::AttentionBwdKernelParams;
namespace attn = pyfastattn::cuda::attention;
namespace emu = pyfastattn::emu;
using namespace pyfastattn::emu_test;  // NOLINT: the shared test vocabulary

namespace {

struct Result {
  bool ok = true;
  double max_rel[3] = {0, 0, 0};  // dq, dk, dv: max |err| / max(1, max |ref|)
};


template <typename Element, int kHeadDim>
Result run_case(const Case& c, std::mt19937& rng) {
  using Traits = attn::AttentionBwdTraits<kHeadDim, Element>;
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
  // Varlen: a few packed rows past cu_seqlens[-1] that no sequence owns.
  const int tail = c.varlen ? 3 : 0;
  const int nsq = c.varlen ? cu_q[c.batch] + tail : sq;
  const int nsk = c.varlen ? cu_k[c.batch] + tail : sk;
  auto q_row = [&](int b, int i) { return c.varlen ? std::make_pair(0, cu_q[b] + i) : std::make_pair(b, i); };
  auto k_row = [&](int b, int j) { return c.varlen ? std::make_pair(0, cu_k[b] + j) : std::make_pair(b, j); };

  // ---- inputs: NaN everywhere the kernel must not read -----------------------
  Tensor q = make_tensor(c, nb, nsq, c.hq, kNaNBits);
  Tensor k = make_tensor(c, nb, nsk, c.hk, kNaNBits);
  Tensor v = make_tensor(c, nb, nsk, c.hk, kNaNBits);
  Tensor d_o = make_tensor(c, nb, nsq, c.hq, kNaNBits);
  Tensor o = make_tensor(c, nb, nsq, c.hq, kNaNBits);
  for (int b = 0; b < c.batch; ++b) {
    for (int i = 0; i < c.len_q[b]; ++i)
      for (int h = 0; h < c.hq; ++h)
        for (int d = 0; d < c.head_dim; ++d) {
          auto [bb, r] = q_row(b, i);
          q.data[q.at(bb, r, h, d)] = to_bits(normal(rng), bf16);
          d_o.data[d_o.at(bb, r, h, d)] = to_bits(normal(rng), bf16);
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
              // Finite biases and -inf. (A row hidden only by huge finite
              // biases such as bf16's lowest value has an lse the fp32
              // contract cannot carry into the backward: see PERF_NOTES.md.)
              float x = 2.f * normal(rng);
              const float r = uni(rng);
              if (row_kind < 0.06f || r < 0.15f) x = -INFINITY;
              else if (r < 0.2f) x = -30.f;
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

  // ---- float64 reference: forward (O, LSE) and gradients --------------------
  auto qv = [&](int b, int i, int h, int d) { auto [bb, r] = q_row(b, i); return double(to_float(q.data[q.at(bb, r, h, d)], bf16)); };
  auto kv = [&](int b, int j, int h, int d) { auto [bb, r] = k_row(b, j); return double(to_float(k.data[k.at(bb, r, h, d)], bf16)); };
  auto vv = [&](int b, int j, int h, int d) { auto [bb, r] = k_row(b, j); return double(to_float(v.data[v.at(bb, r, h, d)], bf16)); };
  auto dov = [&](int b, int i, int h, int d) { auto [bb, r] = q_row(b, i); return double(to_float(d_o.data[d_o.at(bb, r, h, d)], bf16)); };
  const int D = c.head_dim;
  // Gradients indexed like the packed/dense outputs: [row-owner b][row][head][d].
  std::vector<double> ref_dq(size_t(c.batch) * sq * c.hq * D, 0.0);
  std::vector<double> ref_dk(size_t(c.batch) * sk * c.hk * D, 0.0), ref_dv(ref_dk.size(), 0.0);
  auto qi = [&](int b, int i, int h) { return ((size_t(b) * sq + i) * c.hq + h) * D; };
  auto ki = [&](int b, int j, int h) { return ((size_t(b) * sk + j) * c.hk + h) * D; };
  // lse as the forward stores it: [b, hq, sq] (varlen [hq, total_q]), with padding.
  std::vector<float> lse;
  int64_t lse_bs = 0, lse_hs = 0;
  if (c.varlen) {
    lse_hs = nsq + 5;
    lse.assign(c.hq * lse_hs + 1, kFloatNaN);
  } else {
    lse_hs = sq + 5;
    lse_bs = c.hq * lse_hs + 2;
    lse.assign(std::max(1, c.batch) * lse_bs + 1, kFloatNaN);
  }
  std::vector<double> s(sk), pr(sk), th(sk), out(D);
  for (int b = 0; b < c.batch; ++b) {
    const int lq = c.len_q[b], lk = c.key_len(b);
    const int offset = c.bottom_right ? lk - lq : 0;
    for (int h = 0; h < c.hq; ++h) {
      const int hkv = h / (c.hq / c.hk);
      for (int i = 0; i < lq; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < lk; ++j) {
          s[j] = -INFINITY;
          th[j] = 0;
          if (c.window_left >= 0 && j < int64_t(i) + offset - c.window_left) continue;
          if (c.window_right >= 0 && j > int64_t(i) + offset + c.window_right) continue;
          double x = 0;
          for (int d = 0; d < D; ++d) x += qv(b, i, h, d) * kv(b, j, hkv, d);
          x *= c.scale;
          if (c.softcap > 0) {
            th[j] = std::tanh(x / c.softcap);
            x = c.softcap * th[j];
          }
          if (c.mask != MaskKind::kNone) x += mask_value(b, h, i, j);
          if (!c.slopes.empty()) x -= double(c.slope(b, h)) * std::fabs(double(i + lk - lq - j));
          s[j] = x;
          mx = std::max(mx, x);
        }
        double sum = 0;
        for (int j = 0; j < lk; ++j) sum += s[j] == -INFINITY ? 0 : std::exp(s[j] - mx);
        const double l = mx == -INFINITY ? -INFINITY : mx + std::log(sum);
        const int64_t lidx = c.varlen ? h * lse_hs + cu_q[b] + i : b * lse_bs + h * lse_hs + i;
        lse[lidx] = static_cast<float>(l);
        std::fill(out.begin(), out.end(), 0.0);
        for (int j = 0; j < lk; ++j) {
          pr[j] = s[j] == -INFINITY ? 0 : std::exp(s[j] - l);
          const double w = pr[j] * c.keep_factor(b, h, i, j);  // dropout after the row sum
          for (int d = 0; d < D; ++d) out[d] += w * vv(b, j, hkv, d);
        }
        auto [ob, orow] = q_row(b, i);
        for (int d = 0; d < D; ++d) o.data[o.at(ob, orow, h, d)] = to_bits(static_cast<float>(out[d]), bf16);
        // Gradients, with Z_j = keep_j / (1 - p) (1 without dropout):
        // dP_j = Z_j dO . v_j, D = dO . O, dS_j = P_j (dP_j - D), dV_j += Z_j P_j dO.
        // D from the O the backward is given (rounded to 16 bits), as the
        // contract says: with p = 0.9 (O scaled by 10) the rounding of O alone
        // moved dQ by 0.4% of max |dQ| (fp16).
        double dsum = 0;
        for (int d = 0; d < D; ++d) dsum += dov(b, i, h, d) * to_float(o.data[o.at(ob, orow, h, d)], bf16);
        for (int j = 0; j < lk; ++j) {
          if (pr[j] == 0) continue;
          double dpj = 0;
          for (int d = 0; d < D; ++d) dpj += dov(b, i, h, d) * vv(b, j, hkv, d);
          const double z = c.keep_factor(b, h, i, j);
          double ds = pr[j] * (z * dpj - dsum);
          if (c.softcap > 0) ds *= 1 - th[j] * th[j];
          for (int d = 0; d < D; ++d) {
            ref_dq[qi(b, i, h) + d] += c.scale * ds * kv(b, j, hkv, d);
            ref_dk[ki(b, j, hkv) + d] += c.scale * ds * qv(b, i, h, d);
            ref_dv[ki(b, j, hkv) + d] += z * pr[j] * dov(b, i, h, d);
          }
        }
      }
    }
  }

  // ---- outputs and workspaces: sentinels -------------------------------------
  Tensor dq = make_tensor(c, nb, nsq, c.hq, kSentinelBits);
  Tensor dk = make_tensor(c, nb, nsk, c.hk, kSentinelBits);
  Tensor dv = make_tensor(c, nb, nsk, c.hk, kSentinelBits);
  const int64_t ws_rows = c.varlen ? nsq : int64_t(c.batch) * sq;
  std::vector<float> ws(2 * std::max<int64_t>(1, ws_rows * c.hq), kFloatNaN);
  std::vector<float> dq_accum(std::max<int64_t>(4, ws_rows * c.hq * D), kFloatNaN);
  const int m_blocks = (sq + Traits::kBlockM - 1) / Traits::kBlockM;
  std::vector<int32_t> sem(std::max(1, c.batch * c.hq * m_blocks), 0);
  std::vector<uint32_t> ticket(1, 0);

  AttentionBwdKernelParams p{};
  p.q = q.data.data(), p.k = k.data.data(), p.v = v.data.data();
  p.q_batch_stride = q.bs, p.q_row_stride = q.rs, p.q_head_stride = q.hs;
  p.k_batch_stride = k.bs, p.k_row_stride = k.rs, p.k_head_stride = k.hs;
  p.v_batch_stride = v.bs, p.v_row_stride = v.rs, p.v_head_stride = v.hs;
  p.o = o.data.data();
  p.o_batch_stride = o.bs, p.o_row_stride = o.rs, p.o_head_stride = o.hs;
  p.lse = lse.data();
  p.lse_batch_stride = lse_bs, p.lse_head_stride = lse_hs;
  p.batch = c.batch, p.seqlen_q = sq, p.seqlen_k = sk;
  p.num_heads = c.hq, p.num_heads_k = c.hk;
  p.head_dim = p.head_dim_v = D;
  p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat16;
  p.cu_seqlens_q = c.varlen ? cu_q.data() : nullptr;
  p.cu_seqlens_k = c.varlen ? cu_k.data() : nullptr;
  p.seqused_k = c.seqused ? c.used_k.data() : nullptr;
  p.window_left = c.window_left, p.window_right = c.window_right;
  p.bottom_right = c.bottom_right;
  p.mask_kind = c.mask;
  p.mask = c.mask != MaskKind::kNone ? mask_bytes.data() + c.mask_offset * es : nullptr;
  p.mask_batch_stride = mbs, p.mask_head_stride = mhs, p.mask_row_stride = mrs;
  p.scale = c.scale;
  p.softcap = c.softcap;
  p.scale_log2 = c.softcap > 0.f ? 0.f : c.scale * 1.4426950408889634f;
  c.fill_dropout_alibi(p);
  p.dout = d_o.data.data();
  p.do_batch_stride = d_o.bs, p.do_row_stride = d_o.rs, p.do_head_stride = d_o.hs;
  p.dq = dq.data.data(), p.dk = dk.data.data(), p.dv = dv.data.data();
  p.dq_batch_stride = dq.bs, p.dq_row_stride = dq.rs, p.dq_head_stride = dq.hs;
  p.dk_batch_stride = dk.bs, p.dk_row_stride = dk.rs, p.dk_head_stride = dk.hs;
  p.dv_batch_stride = dv.bs, p.dv_row_stride = dv.rs, p.dv_head_stride = dv.hs;
  p.deterministic = c.deterministic;
  p.lse_log2 = ws.data();
  p.dsum = ws.data() + ws.size() / 2;
  p.ws_head_stride = c.varlen ? nsq : sq;
  p.ws_batch_stride = c.varlen ? 0 : int64_t(c.hq) * sq;
  p.dq_accum = dq_accum.data();
  p.dqa_head_stride = D;
  p.dqa_row_stride = int64_t(c.hq) * D;
  p.dqa_batch_stride = c.varlen ? 0 : int64_t(sq) * c.hq * D;
  p.dq_semaphore = sem.data();
  p.m_blocks = m_blocks;
  p.cta_ticket = c.deterministic ? ticket.data() : nullptr;

  emu::clear_ranges();
  for (const Tensor* t : {&q, &k, &v, &d_o, &o}) emu::add_range(t->data.data(), t->data.size() * 2, false);
  if (!mask_bytes.empty()) emu::add_range(mask_bytes.data(), mask_bytes.size(), false);
  emu::add_range(lse.data(), lse.size() * 4, false);
  for (const Tensor* t : {&dq, &dk, &dv}) emu::add_range(t->data.data(), t->data.size() * 2, true);
  emu::add_range(ws.data(), ws.size() * 4, true);
  emu::add_range(dq_accum.data(), dq_accum.size() * 4, true);
  emu::add_range(sem.data(), sem.size() * 4, true);
  if (c.deterministic) emu::add_range(ticket.data(), 4, true);

  // ---- launch, as attention_bwd() does (optionally another y/z split) ---------
  auto split = [&](attn::AttentionBwdGrid g, int64_t heads) {
    if (c.grid_y > 0 && g.y > 0) {
      g.y = std::min<int64_t>(c.grid_y, g.y);
      g.z = (heads * c.batch + g.y - 1) / g.y;
    }
    return dim3(unsigned(g.x), unsigned(g.y), unsigned(g.z));
  };
  uint64_t main_ctas = 0;
  auto run = [&] {
    const attn::AttentionBwdGrid rows = attn::attention_bwd_grid(sq, attn::kRowKernelRows, c.hq, c.batch);
    const attn::AttentionBwdGrid keys = attn::attention_bwd_grid(sk, Traits::kBlockN, c.hk, c.batch);
    if (rows.x > 0 && rows.y > 0)
      emu::launch(split(rows, c.hq), attn::kRowKernelThreads, 0,
                  [&] { attn::attention_bwd_preprocess_kernel<Element>(p); });
    if (keys.x > 0 && keys.y > 0) {
      const size_t smem = Traits::kSmemBytes + (c.mask != MaskKind::kNone ? 2 * Traits::kSmemMaskBytes : 0);
      const dim3 grid = split(keys, c.hk);
      emu::launch(grid, Traits::kNThreads, smem, [&] { attn::attention_bwd_kernel<Traits>(p); });
      main_ctas = uint64_t(grid.x) * grid.y * grid.z;
    }
    if (rows.x > 0 && rows.y > 0)
      emu::launch(split(rows, c.hq), attn::kRowKernelThreads, 0,
                  [&] { attn::attention_bwd_convert_dq_kernel<Element>(p); });
  };
  run();

  // ---- comparison ---------------------------------------------------------------
  Result res;
  const double tol = bf16 ? 2e-2 : 4e-3;  // of max(1, max |ref|) per tensor
  auto compare = [&](const char* name, int which, const Tensor& got, const std::vector<double>& ref,
                     int heads, bool is_q) {
    std::vector<bool> expected(got.data.size(), false);
    double ref_max = 1.0, err_max = 0.0;
    for (double x : ref) ref_max = std::max(ref_max, std::fabs(x));
    bool first = true;
    for (int b = 0; b < c.batch; ++b) {
      const int rows = is_q ? c.len_q[b] : c.key_len(b);
      for (int r = 0; r < rows; ++r)
        for (int h = 0; h < heads; ++h)
          for (int d = 0; d < D; ++d) {
            auto [bb, rr] = is_q ? q_row(b, r) : k_row(b, r);
            const int64_t idx = got.at(bb, rr, h, d);
            expected[idx] = true;
            const float g = to_float(got.data[idx], bf16);
            const double want = ref[(is_q ? qi(b, r, h) : ki(b, r, h)) + d];
            const double err = std::isnan(g) ? 1e30 : std::fabs(g - want);
            err_max = std::max(err_max, err);
            if (!(err <= tol * ref_max) && first) {
              std::printf("  %s mismatch b=%d row=%d h=%d d=%d got %g want %g (max |ref| %g)\n", name, b,
                          r, h, d, g, want, ref_max);
              first = false;
            }
          }
    }
    res.max_rel[which] = err_max / ref_max;
    if (!(err_max <= tol * ref_max)) res.ok = false;
    for (size_t idx = 0; idx < got.data.size(); ++idx)
      if (!expected[idx] && got.data[idx] != kSentinelBits) {
        if (res.ok) std::printf("  %s element %zu written but outside the output rows\n", name, idx);
        res.ok = false;
        break;
      }
  };
  compare("dQ", 0, dq, ref_dq, c.hq, true);
  compare("dK", 1, dk, ref_dk, c.hk, false);
  compare("dV", 2, dv, ref_dv, c.hk, false);

  if (c.deterministic) {
    // Every CTA of the main kernel took exactly one ticket.
    if (ticket[0] != main_ctas) {
      std::printf("  ticket counter ended at %llu, want %llu CTAs\n", (unsigned long long)ticket[0],
                  (unsigned long long)main_ctas);
      res.ok = false;
    }
    // Every counter ends at the number of key blocks its query block sees.
    for (int b = 0; b < c.batch && res.ok; ++b) {
      const pyfastattn::SeqInfo seq(p, b);
      for (int h = 0; h < c.hq; ++h)
        for (int m = 0; m < m_blocks; ++m) {
          int want = 0;
          const int m0 = m * Traits::kBlockM;
          if (m0 < seq.len_q) {
            const int lo = seq.key_lo(p, m0), hi = seq.key_hi(p, std::min(seq.len_q, m0 + Traits::kBlockM) - 1);
            if (hi > lo) want = (hi + Traits::kBlockN - 1) / Traits::kBlockN - lo / Traits::kBlockN;
          }
          const int got = sem[(b * c.hq + h) * m_blocks + m];
          if (got != want) {
            std::printf("  semaphore b=%d h=%d m=%d ended at %d, want %d\n", b, h, m, got, want);
            res.ok = false;
            break;
          }
        }
    }
    // A second run from fresh workspaces: bit-identical dQ, dK, dV.
    const std::vector<uint16_t> dq1 = dq.data, dk1 = dk.data, dv1 = dv.data;
    std::fill(dq.data.begin(), dq.data.end(), kSentinelBits);
    std::fill(dk.data.begin(), dk.data.end(), kSentinelBits);
    std::fill(dv.data.begin(), dv.data.end(), kSentinelBits);
    std::fill(ws.begin(), ws.end(), kFloatNaN);
    std::fill(dq_accum.begin(), dq_accum.end(), kFloatNaN);
    std::fill(sem.begin(), sem.end(), 0);
    ticket[0] = 0;
    run();
    if (dq.data != dq1 || dk.data != dk1 || dv.data != dv1) {
      std::printf("  deterministic mode: the second run differs\n");
      res.ok = false;
    }
  }
  return res;
}



std::vector<Case> fixed_cases() {
  std::vector<Case> out;
  Case c;
  c.head_dim = 64, c.len_q = {1}, c.len_k = {1};
  out.push_back(c);                                      // one query, one key
  c.len_q = {130}, c.len_k = {70}, c.window_right = 0;   // causal top-left, lq > lk
  out.push_back(c);
  c.bottom_right = true, c.deterministic = true;         // bottom-right: first rows see nothing
  out.push_back(c);
  c.len_q = {0}, c.len_k = {5};                           // no queries: dK = dV = 0
  out.push_back(c);
  c.len_q = {9}, c.len_k = {0}, c.window_right = -1;      // no keys: dQ = 0
  out.push_back(c);
  Case m;
  m.head_dim = 128, m.len_q = {33}, m.len_k = {77}, m.mask = MaskKind::kAdditive, m.mask_pad = 1,
  m.mask_offset = 1, m.bf16 = true;
  out.push_back(m);
  m.mask = MaskKind::kBool, m.mask_pad = 3, m.mask_offset = 3, m.softcap = 5;
  out.push_back(m);
  Case v;
  v.varlen = true, v.batch = 3, v.head_dim = 96, v.len_q = {5, 0, 140}, v.len_k = {70, 3, 1};
  v.hq = 4, v.hk = 2, v.window_left = 3, v.window_right = 0, v.bottom_right = true, v.deterministic = true;
  out.push_back(v);
  v.seqused = true, v.used_k = {33, 0, 1}, v.window_left = -1, v.window_right = -1;
  out.push_back(v);
  Case w;
  w.head_dim = 256, w.len_q = {70}, w.len_k = {130}, w.window_left = 0, w.window_right = 0;
  out.push_back(w);  // diagonal only
  w.head_dim = 32, w.batch = 2, w.hq = 6, w.hk = 1, w.grid_y = 5, w.softcap = 30, w.deterministic = true;
  w.len_q = {70, 70}, w.len_k = {130, 130};
  out.push_back(w);  // MQA, a y/z grid split with rounding
  Case l;  // long sequences: many trips through the Q/dO pipeline
  l.varlen = true, l.batch = 2, l.head_dim = 64, l.len_q = {300, 257}, l.len_k = {200, 129};
  l.window_right = 0, l.bottom_right = true, l.bf16 = true, l.deterministic = true;
  out.push_back(l);
  l.head_dim = 128, l.window_left = 100, l.softcap = 30, l.bf16 = false, l.hq = 2;
  out.push_back(l);
  l.dropout_p = 0.3f, l.seed = 12345, l.offset = 678;  // issue 17: dropout + ALiBi [b, h]
  l.slopes = {0.1f, 0.25f, 0.05f, 0.4f}, l.slopes_per_batch = true;
  out.push_back(l);
  Case da;  // dropout p = 0.9 and ALiBi [h], GQA, top-left causal, deterministic dQ
  da.head_dim = 96, da.batch = 2, da.hq = 4, da.hk = 2, da.len_q = {75, 75}, da.len_k = {140, 140};
  da.window_right = 0, da.dropout_p = 0.9f, da.seed = 0xdeadbeefcafe, da.offset = 1ull << 40;
  da.slopes = {0.5f, 0.0625f, 0.2f, 0.01f}, da.deterministic = true;
  out.push_back(da);
  da.dropout_p = 1.f, da.deterministic = false, da.head_dim = 32;  // every weight dropped
  out.push_back(da);
  da.dropout_p = 0.5f, da.head_dim = 256, da.bf16 = true;  // d = 256: warp 0 stages the keep bits
  da.mask = MaskKind::kBool, da.mask_pad = 2, da.mask_offset = 1;
  out.push_back(da);
  Case a;  // additive mask over several key blocks, odd row stride, misaligned base
  a.head_dim = 256, a.batch = 2, a.hq = 2, a.hk = 2, a.len_q = {70, 70}, a.len_k = {101, 101};
  a.mask = MaskKind::kAdditive, a.mask_pad = 5, a.mask_offset = 1, a.window_right = 0,
  a.bottom_right = true, a.deterministic = true;
  out.push_back(a);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 120;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1u;
  print_run_header("attention_bwd_emu_test", cases, seed);
  std::mt19937 rng(seed);
  const std::vector<Case> all = all_cases(fixed_cases, cases, rng, CaseLimits{150, 90, 1.0, 0.4});
  int failed = 0, deterministic = 0;
  double worst[2][3] = {{0, 0, 0}, {0, 0, 0}};
  for (size_t n = 0; n < all.size(); ++n) {
    const Case& c = all[n];
    emu::context() = "case " + std::to_string(n) + ": " + c.describe();
    AttentionBwdParams sel{};
    sel.head_dim = c.head_dim;
    const Result r = PFA_FP16_SWITCH(c.bf16, Element, [&] {
      return PFA_HEADDIM_SWITCH(sel.head_dim, kHeadDim, [&] { return run_case<Element, kHeadDim>(c, rng); });
    });
    for (int t = 0; t < 3; ++t) worst[c.bf16][t] = std::max(worst[c.bf16][t], r.max_rel[t]);
    deterministic += c.deterministic;
    if (!r.ok) {
      ++failed;
      std::printf("FAIL %s\n", emu::context().c_str());
    }
  }
  const emu::Stats& s = emu::rt().stats;
  std::printf("%zu cases (%d deterministic, run twice), %d failed\n", all.size(), deterministic, failed);
  std::printf("max err / max(1, max|ref|): fp16 dQ %.2e dK %.2e dV %.2e; bf16 dQ %.2e dK %.2e dV %.2e\n",
              worst[0][0], worst[0][1], worst[0][2], worst[1][0], worst[1][1], worst[1][2]);
  std::printf("CTAs %" PRIu64 ", mma %" PRIu64 ", red.add.f32 %" PRIu64 ", turn waits %" PRIu64
              "; bank conflicts (extra wavefronts): ldmatrix %" PRIu64 "/%" PRIu64 ", st.shared %" PRIu64
              "/%" PRIu64 ", ld.shared.v4 %" PRIu64 "/%" PRIu64 "\n",
              s.ctas, s.mma, s.red_f32, s.turn_waits, s.ldmatrix_extra_wavefronts, s.ldmatrix,
              s.sts_extra_wavefronts, s.sts, s.lds128_extra_wavefronts, s.lds128);
  if (s.ldmatrix_extra_wavefronts || s.sts_extra_wavefronts || s.lds128_extra_wavefronts) {
    std::printf("FAIL shared-memory bank conflicts in the kernel's ldmatrix / staging accesses\n");
    return 1;
  }
  return failed ? 1 : 0;
}
