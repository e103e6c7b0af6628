// Python bindings of the `cuda` backend (kernels and host code in cuda.cu). The entry points have
// the signatures of the `cpu` backend's (cpu.cpp), so marginfused/chunked.py drives both alike.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

namespace marginfused {
namespace cuda {

void forward_partials(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, int64_t class_start,
                      int64_t chunk, int64_t kind, int64_t fallback, double p1, double p2, double p3, double scale,
                      int64_t ignore_index, const at::Tensor& out_max, const at::Tensor& out_sumexp,
                      const at::Tensor& out_target, const at::Tensor& out_logit_sum, const at::Tensor& out_best_cos,
                      const at::Tensor& out_best_class);

void backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const at::Tensor& lse,
              const at::Tensor& grad_rows, int64_t class_start, int64_t num_classes, int64_t chunk, int64_t kind,
              int64_t fallback, double p1, double p2, double p3, double scale, bool exact_grad,
              double label_smoothing, int64_t ignore_index, const std::optional<at::Tensor>& grad_x,
              const std::optional<at::Tensor>& grad_w);

}  // namespace cuda
}  // namespace marginfused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "marginfused cuda backend: chunked margin softmax loss (cuBLAS GEMMs via ATen + CUDA kernels)";
  m.def("forward_partials", &marginfused::cuda::forward_partials, py::call_guard<py::gil_scoped_release>(),
        "Per-row partials (max, sumexp, target, logit_sum, best_cos, best_class) over the weight's classes",
        py::arg("x"), py::arg("w"), py::arg("y"), py::arg("class_start"), py::arg("chunk"), py::arg("kind"),
        py::arg("fallback"), py::arg("p1"), py::arg("p2"), py::arg("p3"), py::arg("scale"), py::arg("ignore_index"),
        py::arg("out_max"), py::arg("out_sumexp"), py::arg("out_target"), py::arg("out_logit_sum"),
        py::arg("out_best_cos"), py::arg("out_best_class"));
  m.def("backward", &marginfused::cuda::backward, py::call_guard<py::gil_scoped_release>(),
        "Gradients w.r.t. x and the weight shard, given the global lse and the per-row upstream gradient",
        py::arg("x"), py::arg("w"), py::arg("y"), py::arg("lse"), py::arg("grad_rows"), py::arg("class_start"),
        py::arg("num_classes"), py::arg("chunk"), py::arg("kind"), py::arg("fallback"), py::arg("p1"),
        py::arg("p2"), py::arg("p3"), py::arg("scale"), py::arg("exact_grad"), py::arg("label_smoothing"),
        py::arg("ignore_index"), py::arg("grad_x"), py::arg("grad_w"));
}
