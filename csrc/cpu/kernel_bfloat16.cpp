// Instantiation of the CPU kernel for c10::BFloat16 parameters with grads of their own dtype (one translation
// unit per variant: parallel build).
#include "kernel.h"

namespace bregman::cpu {
template void run_fused_step<c10::BFloat16, c10::BFloat16>(const Work<opmath_t<c10::BFloat16>>& w, int64_t* counts);
}  // namespace bregman::cpu
