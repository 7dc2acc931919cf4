// Instantiation of the CPU kernel for double parameters with grads of their own dtype (one translation
// unit per variant: parallel build).
#include "kernel.h"

namespace bregman::cpu {
template void run_fused_step<double, double>(const Work<opmath_t<double>>& w, int64_t* counts);
}  // namespace bregman::cpu
