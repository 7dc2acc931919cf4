// Instantiation of the CPU kernel for c10::Half parameters with grads of their own dtype (one translation
// unit per variant: parallel build).
#include "kernel.h"

namespace bregman::cpu {
template void run_fused_step<c10::Half, c10::Half>(const Work<opmath_t<c10::Half>>& w, int64_t* counts);
}  // namespace bregman::cpu
