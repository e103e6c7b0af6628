// The Python bindings of both extensions, written once: cpu.cpp and cuda_bindings.cpp each call
// bind_entry_points from their PYBIND11_MODULE with their own entry points. Host-only (pybind).
#pragma once

#include <torch/csrc/utils/pybind.h>

#include "common.h"

namespace marginfused {

// A Call from keyword arguments, each set through its field's binding (an unknown name is an
// AttributeError, a value of the wrong type a TypeError); fields not given keep their defaults.
inline Call call_from_keywords(const pybind11::kwargs& fields) {
  Call call;
  const pybind11::object view = pybind11::cast(&call, pybind11::return_value_policy::reference);
  for (const auto& [name, value] : fields) pybind11::setattr(view, name, value);
  return call;
}

// The Call class (common.h), one field each, and forward_partials and backward taking one; the
// entry points run without the GIL.
inline void bind_entry_points(pybind11::module_& m, const char* doc, ForwardPartialsFn* forward_partials,
                              BackwardFn* backward) {
  namespace py = pybind11;
  m.doc() = doc;
  py::class_<Call>(m, "Call", "Every argument of forward_partials and backward, by name (csrc/common.h)")
      .def(py::init(&call_from_keywords))
      .def_readwrite("x", &Call::x)
      .def_readwrite("w", &Call::w)
      .def_readwrite("y", &Call::y)
      .def_readwrite("target_logit", &Call::target_logit)
      .def_readwrite("rule_threshold", &Call::rule_threshold)
      .def_readwrite("rule_offset", &Call::rule_offset)
      .def_readwrite("target_slope", &Call::target_slope)
      .def_readwrite("row_max", &Call::row_max)
      .def_readwrite("log_sumexp", &Call::log_sumexp)
      .def_readwrite("upstream", &Call::upstream)
      .def_readwrite("lift", &Call::lift)
      .def_readwrite("inv_x", &Call::inv_x)
      .def_readwrite("inv_w", &Call::inv_w)
      .def_readwrite("scale", &Call::scale)
      .def_readwrite("ignore_index", &Call::ignore_index)
      .def_readwrite("label_smoothing", &Call::label_smoothing)
      .def_readwrite("rule_quadratic", &Call::rule_quadratic)
      .def_readwrite("subcenters", &Call::subcenters)
      .def_readwrite("num_classes", &Call::num_classes)
      .def_readwrite("class_start", &Call::class_start)
      .def_readwrite("chunk", &Call::chunk)
      .def_readwrite("dx_splits", &Call::dx_splits);
  m.def("forward_partials", forward_partials, py::call_guard<py::gil_scoped_release>(),
        "The per-row partials (max, sumexp, logit_sum, best_cos, best_class) over the call's classes, each "
        "(splits, B), one row per split in class order, unmerged; then the inverse norms inv_x (B,) and inv_w (rows of w,) "
        "float32 that it computed, for the backward's call",
        py::arg("call"));
  m.def("backward", backward, py::call_guard<py::gil_scoped_release>(),
        "The gradients (grad_x, grad_w) of sum_i upstream_i * loss_i w.r.t. x and w, each None where not needed",
        py::arg("call"), py::kw_only(), py::arg("need_x"), py::arg("need_w"));
}

}  // namespace marginfused
