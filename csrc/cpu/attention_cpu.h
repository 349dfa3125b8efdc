// CPU attention kernels over the shared params struct.
#pragma once

#include "../attention/params.h"

namespace pyfastattn {
namespace cpu {

// Writes p.o and p.lse. Parallel over batch x heads x query blocks with
// at::parallel_for, so it follows torch.set_num_threads.
void attention_fwd(const AttentionFwdParams& p);

// Reads dout, o, lse; writes dq, dk, dv (fully overwritten, never accumulated
// into). Deterministic for any thread count.
void attention_bwd(const AttentionBwdParams& p);

}  // namespace cpu
}  // namespace pyfastattn
