// Attention over a KV cache, fp16: the head dims 64, 128 and 256 (a smaller
// head dim runs in the next one up). One file per dtype keeps the build to
// two small translation units (see PERF_NOTES for their compile time).
#include "kvcache_fwd_launch_template.h"

namespace pyfastattn {
namespace cuda {
namespace kvcache {

template struct KvCacheVariant<__half, 64>;
template struct KvCacheVariant<__half, 128>;
template struct KvCacheVariant<__half, 256>;

}  // namespace kvcache
}  // namespace cuda
}  // namespace pyfastattn
