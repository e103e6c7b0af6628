// The Python bindings of both extensions, written once: cpu.cpp and cuda_bindings.cpp each call
// bind_entry_points from their PYBIND11_MODULE with their own entry points. Host-only (pybind).
#pragma once

#include <torch/csrc/utils/pybind.h>

#include "common.h"

namespace marginfused {

// forward_partials and backward (signatures and meaning: common.h), keyword arguments only, run
// without the GIL.
inline void bind_entry_points(pybind11::module_& m, const char* doc, ForwardPartialsFn* forward_partials,
                              BackwardFn* backward) {
  namespace py = pybind11;
  m.doc() = doc;
  m.def("forward_partials", forward_partials, py::call_guard<py::gil_scoped_release>(),
        "Per-row partials (max, sumexp, logit_sum, best_cos, best_class) over the weight's classes, "
        "given each row's target logit, the negative-logit rule and the sub-centres per class",
        py::kw_only(), py::arg("x"), py::arg("w"), py::arg("y"), py::arg("target_logit"), py::arg("hard_threshold"),
        py::arg("hard_offset"), py::arg("hard_quadratic"), py::arg("class_start"), py::arg("subcenters"),
        py::arg("chunk"), py::arg("scale"), py::arg("ignore_index"), py::arg("out_max"), py::arg("out_sumexp"),
        py::arg("out_logit_sum"), py::arg("out_best_cos"), py::arg("out_best_class"));
  m.def("backward", backward, py::call_guard<py::gil_scoped_release>(),
        "Gradients w.r.t. x and the weight shard, given each row's target logit and its slope, the global lse "
        "and the per-row gradient grad_rows",
        py::kw_only(), py::arg("x"), py::arg("w"), py::arg("y"), py::arg("target_logit"), py::arg("target_slope"),
        py::arg("hard_threshold"), py::arg("hard_offset"), py::arg("hard_quadratic"), py::arg("lse"),
        py::arg("grad_rows"), py::arg("grad_lift"), py::arg("class_start"), py::arg("subcenters"), py::arg("num_classes"),
        py::arg("chunk"), py::arg("scale"), py::arg("label_smoothing"), py::arg("ignore_index"), py::arg("grad_x"),
        py::arg("grad_w"));
}

}  // namespace marginfused
