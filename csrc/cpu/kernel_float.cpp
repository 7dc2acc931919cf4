// Instantiation of the CPU kernel for float parameters with grads of their own dtype (one translation
// unit per variant: parallel build).
#include "kernel.h"

namespace bregman::cpu {
template void run_fused_step<float, float>(const Work<opmath_t<float>>& w, int64_t* counts);
}  // namespace bregman::cpu
