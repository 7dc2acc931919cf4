// Instantiation of the CPU kernel for float parameters (one translation unit per dtype: parallel build).
#include "kernel.h"

namespace bregman::cpu {
template void run_fused_step<float>(const Work<opmath_t<float>>& w, int64_t* counts);
}  // namespace bregman::cpu
