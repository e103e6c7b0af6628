// Python bindings of the `cuda` backend (kernels and host code in cuda.cu): the entry points of
// common.h, bound by bindings.h exactly as the `cpu` backend's, so marginfused drives both alike.
#include "bindings.h"
#include "common.h"

namespace marginfused {
namespace cuda {

// Defined in cuda.cu.
ForwardPartialsFn forward_partials;
BackwardFn backward;

}  // namespace cuda
}  // namespace marginfused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  marginfused::bind_entry_points(m, "marginfused cuda backend: chunked softmax loss partials and gradients, "
                                    "margin-agnostic (cuBLAS GEMMs via ATen + CUDA kernels)",
                                 &marginfused::cuda::forward_partials, &marginfused::cuda::backward);
}
