// Attention forward, head dim 256, bf16. One variant per file so nvcc builds
// them in parallel; see attention_fwd_traits.h for its tile shape.
#include "attention_fwd_launch_template.h"

namespace pyfastattn {
namespace cuda {
namespace attention {

template struct AttentionFwdVariant<__nv_bfloat16, 256>;

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
