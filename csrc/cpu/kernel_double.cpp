// Instantiation of the CPU kernel for double parameters (one translation unit per dtype: parallel build).
#include "kernel.h"

namespace bregman::cpu {
template void run_fused_step<double>(const Work<opmath_t<double>>& w, int64_t* counts);
}  // namespace bregman::cpu
