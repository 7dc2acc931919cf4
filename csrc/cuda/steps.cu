// Device-resident step counters: steps[i] += 1 unless found_inf is set, with no host read, so the
// counters stay in sync with the AMP skip decision and the step can be captured in a CUDA graph.
// Runs before the update kernels on the same stream; they then read the incremented count.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "fused_step_cuda.h"
#include "launch_args.cuh"

namespace bregman_cuda {
namespace {

constexpr int kMaxStepPtrs = 448;  // 3.5 KiB of pointers per launch

struct StepPtrList {
  float* ptrs[kMaxStepPtrs];
  int n;
};

__global__ void increment_steps_kernel(const __grid_constant__ StepPtrList list, const float* found_inf) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < list.n && !skip_step(found_inf)) *list.ptrs[i] += 1.0f;
}

}  // namespace

void launch_increment_steps(at::TensorList steps, const at::Tensor* found_inf) {
  const float* flag = found_inf ? found_inf->data_ptr<float>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 128;
  for (size_t first = 0; first < steps.size(); first += kMaxStepPtrs) {
    StepPtrList list{};
    list.n = static_cast<int>(std::min<size_t>(kMaxStepPtrs, steps.size() - first));
    for (int k = 0; k < list.n; ++k) list.ptrs[k] = steps[first + k].data_ptr<float>();
    increment_steps_kernel<<<(list.n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(list, flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace bregman_cuda
