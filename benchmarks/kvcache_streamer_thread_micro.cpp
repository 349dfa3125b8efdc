// Issue 18, session 6: can one core feed the other through the shared L3?
// One compute thread runs the KV-cache kernel's pattern (the
// microbenchmark's variants, kvcache_overlap_micro.cpp) over all 32k keys
// while a second thread reads the next W chunks (K and V, address order, one
// vector load per line: the hardware prefetchers' best case) a few chunks
// ahead, so that the compute thread should find its lines in L3; against both
// threads computing (the kernel's structure). First, how fast a core reads 8
// MiB that the other core has just read, against its own re-read and a
// flushed read.
//
//   g++ -O3 -march=native -fopenmp -o /tmp/kvstream benchmarks/kvcache_streamer_thread_micro.cpp
//   /tmp/kvstream [rounds]   (wall ms, medians; run on a quiet box: it times 2 threads)
#define KV_MICRO_LIB
#include "kvcache_overlap_micro.cpp"

#include <atomic>

static long read_lines(const char* p, size_t n) {
  __m512i a = _mm512_setzero_si512();
  for (size_t i = 0; i < n; i += 64) a = _mm512_or_si512(a, _mm512_load_si512(p + i));
  return _mm512_reduce_add_epi32(a);
}

static void l3_sharing() {
  const size_t N = 8 << 20, BIG = 512 << 20;
  char* big = (char*)aligned_alloc(4096, BIG);
  memset(big, 1, BIG);
  char* buf = (char*)aligned_alloc(4096, N);
  memset(buf, 1, N);
  std::vector<double> own, other, dram;
  long s = 0;
  auto flush = [&] {
#pragma omp parallel num_threads(2) reduction(+ : s)
    { s += read_lines(big + omp_get_thread_num() * (BIG / 2), BIG / 2); }
  };
  for (int r = 0; r < 9; r++) {
    double t = 0;
    flush();
#pragma omp parallel num_threads(2) reduction(+ : s)
    {
      const int th = omp_get_thread_num();
      if (th == 1) s += read_lines(buf, N);
#pragma omp barrier
      if (th == 0) {
        const double a = tnow(CLOCK_MONOTONIC);
        s += read_lines(buf, N);
        t = tnow(CLOCK_MONOTONIC) - a;
      }
    }
    other.push_back(t * 1e3);
#pragma omp parallel num_threads(2) reduction(+ : s)
    {
      if (omp_get_thread_num() == 0) {
        s += read_lines(buf, N);
        const double a = tnow(CLOCK_MONOTONIC);
        s += read_lines(buf, N);
        t = tnow(CLOCK_MONOTONIC) - a;
      }
    }
    own.push_back(t * 1e3);
    flush();
#pragma omp parallel num_threads(2) reduction(+ : s)
    {
      if (omp_get_thread_num() == 0) {
        const double a = tnow(CLOCK_MONOTONIC);
        s += read_lines(buf, N);
        t = tnow(CLOCK_MONOTONIC) - a;
      }
    }
    dram.push_back(t * 1e3);
  }
  auto med = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x[x.size() / 2];
  };
  printf("8 MiB read by core 0: after core 1 read it %.3f ms (%.1f GB/s); its own re-read %.3f ms (%.1f GB/s); "
         "flushed %.3f ms (%.1f GB/s)%s\n",
         med(other), N / med(other) / 1e6, med(own), N / med(own) / 1e6, med(dram), N / med(dram) / 1e6,
         s == 42 ? " " : "");
  free(big);
  free(buf);
}

int main(int argc, char** argv) {
  l3_sharing();
  const int rounds = argc > 1 ? atoi(argv[1]) : 5;
  const int64_t keys = 32768, CH = 512;
  const size_t bytes = size_t(keys) * ROW_BYTES;
  bf* K = (bf*)aligned_alloc(4096, bytes);
  bf* V = (bf*)aligned_alloc(4096, bytes);
  for (size_t i = 0; i < bytes / 2; ++i) { K[i] = 0x3c00 + (i * 7 % 97); V[i] = 0x3c00 + (i * 13 % 89); }
  float* probe = (float*)aligned_alloc(4096, 2 * bytes);
  for (size_t i = 0; i < 2 * bytes / 4; ++i) probe[i] = 1.0f;
  static Work works[2];
  for (auto& w : works) for (int r = 0; r < ROWS; ++r) for (int x = 0; x < D; ++x) w.q[r][x] = 0x3c00 + (r * 3 + x) % 31;
  auto mk = [](const char* id) {
    Variant v; v.rowpf = kT0; v.far = 1; std::string s = id;
    if (s == "b") v.rowpf = kNone, v.far = 0;
    if (s == "t2") v.rowpf = kT2;
    return v;
  };
  std::vector<std::string> names; std::vector<std::vector<double>> wall;
  auto rec = [&](const std::string& n, double ms) {
    for (size_t i = 0; i < names.size(); ++i) if (names[i] == n) { wall[i].push_back(ms); return; }
    names.push_back(n); wall.push_back({ms});
  };
  for (int round = 0; round < rounds; ++round) {
    { double t0 = tnow(CLOCK_MONOTONIC), tot = 0;
#pragma omp parallel num_threads(2) reduction(+ : tot)
      { const int t = omp_get_thread_num(); const size_t n = 2 * bytes / 4 / 2; const float* p = probe + n * t;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t i = 0; i < n; i += 64) { a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i)); a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
          a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32)); a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48)); }
        tot += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))); }
      rec("probe 2thr", 1e3 * (tnow(CLOCK_MONOTONIC) - t0)); if (tot < 0) printf("x"); }
    for (const char* id : {"a", "b", "t2"}) {
      Variant v = mk(id);
      double t0 = tnow(CLOCK_MONOTONIC);
#pragma omp parallel num_threads(2)
      { const int t = omp_get_thread_num(); const int64_t per = keys / 2;
        for (int64_t c = 0; c < per; c += CH) run_range(works[t], K, V, t * per + c, t * per + c + CH, v); }
      rec(std::string("2 compute ") + id, 1e3 * (tnow(CLOCK_MONOTONIC) - t0));
      for (int W : {2, 4, 8}) {
        std::atomic<int64_t> done{0};
        t0 = tnow(CLOCK_MONOTONIC);
#pragma omp parallel num_threads(2)
        { const int t = omp_get_thread_num();
          if (t == 0) {
            for (int64_t c = 0; c < keys; c += CH) { run_range(works[0], K, V, c, c + CH, v); done.store(c / CH + 1, std::memory_order_release); }
          } else {
            __m512i acc = _mm512_setzero_si512();
            for (int64_t c = 0; c < keys / CH; ++c) {
              while (c - done.load(std::memory_order_acquire) >= W) _mm_pause();
              const char* kp = (const char*)(K + c * CH * ROW_ELEMS); const char* vp = (const char*)(V + c * CH * ROW_ELEMS);
              for (int64_t b = 0; b < CH * ROW_BYTES; b += 256) {
                acc = _mm512_or_si512(acc, _mm512_load_si512(kp + b)); acc = _mm512_or_si512(acc, _mm512_load_si512(kp + b + 64));
                acc = _mm512_or_si512(acc, _mm512_load_si512(kp + b + 128)); acc = _mm512_or_si512(acc, _mm512_load_si512(kp + b + 192));
                acc = _mm512_or_si512(acc, _mm512_load_si512(vp + b)); acc = _mm512_or_si512(acc, _mm512_load_si512(vp + b + 64));
                acc = _mm512_or_si512(acc, _mm512_load_si512(vp + b + 128)); acc = _mm512_or_si512(acc, _mm512_load_si512(vp + b + 192));
              }
            }
            if (_mm512_reduce_add_epi32(acc) == 12345) printf("x");
          } }
        rec(std::string("1 compute ") + id + " + streamer W" + std::to_string(W), 1e3 * (tnow(CLOCK_MONOTONIC) - t0));
      }
    }
    { Variant v = mk("a"); double t0 = tnow(CLOCK_MONOTONIC);
      for (int64_t c = 0; c < keys; c += CH) run_range(works[0], K, V, c, c + CH, v);
      rec("1 thread a alone", 1e3 * (tnow(CLOCK_MONOTONIC) - t0)); }
  }
  auto med = [](std::vector<double> x) { std::sort(x.begin(), x.end()); return x[x.size() / 2]; };
  auto mn = [](std::vector<double> x) { return *std::min_element(x.begin(), x.end()); };
  const double pm = med(wall[0]);
  for (size_t i = 0; i < names.size(); ++i)
    printf("%-34s median %6.2f ms  min %6.2f  (probe/median %.0f%%)\n", names[i].c_str(), med(wall[i]), mn(wall[i]), 100 * pm / med(wall[i]));
}
