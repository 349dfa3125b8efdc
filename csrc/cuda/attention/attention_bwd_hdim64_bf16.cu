// Attention backward main kernel, head dim 64, bf16. One variant per file so
// nvcc builds them in parallel; see attention_bwd_traits.h for its tile shape.
#include "attention_bwd_launch_template.h"

namespace pyfastattn {
namespace cuda {
namespace attention {

template struct AttentionBwdVariant<__nv_bfloat16, 64>;

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
