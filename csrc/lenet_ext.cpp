// The lenet_ext._C extension module: operator schemas and build facts.
// Kernels register themselves per device in ops/cpu and ops/cuda.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "ops/cpu/simd_kernels.h"

#ifndef LENET_EXT_TORCH_VERSION
#error "setup.py defines LENET_EXT_TORCH_VERSION"
#endif
#ifndef LENET_EXT_CUDA_ARCHS
#define LENET_EXT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(lenet_ext, m) {
  // register_fake and register_autograd for these live in lenet_ext/ops.py.
  m.set_python_module("lenet_ext.ops");
  m.def(
      "conv_sigmoid_avgpool2d(Tensor x, Tensor weight, Tensor? bias=None, int padding=0, "
      "int pool=2) -> Tensor");
  // Gradients for (x, weight, bias); an entry whose output_mask is false, or
  // the bias entry when bias is None, comes back undefined (None).
  m.def(
      "conv_sigmoid_avgpool2d_backward(Tensor grad_out, Tensor x, Tensor weight, "
      "Tensor? bias, int padding, int pool, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // LeNet's parameters, as the three whole-network operators take them.
#define LENET_PARAMS_SCHEMA                                                                 \
  "Tensor conv1_weight, Tensor? conv1_bias, int conv1_padding, int pool1, "                 \
  "Tensor conv2_weight, Tensor? conv2_bias, int conv2_padding, int pool2, "                 \
  "Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "              \
  "Tensor fc3_weight, Tensor? fc3_bias"
  // LeNet's whole forward (two conv blocks, then Linear-Sigmoid-Linear-Sigmoid-
  // Linear) in one call, for inference; see ops/lenet.cpp.
  m.def("lenet_forward(Tensor x, " LENET_PARAMS_SCHEMA ") -> Tensor");
  // The same forward for training: the logits, then the activations
  // lenet_backward reads (block2 flattened to (N, features)).
  m.def(
      "lenet_train_forward(Tensor x, " LENET_PARAMS_SCHEMA
      ") -> (Tensor logits, Tensor block1, Tensor block2, Tensor fc1, Tensor fc2)");
  // Gradients for x and the ten parameters, in argument order; an entry whose
  // output_mask is false, or whose argument is None, comes back undefined.
  m.def(
      "lenet_backward(Tensor grad_logits, Tensor x, Tensor block1, Tensor block2, Tensor fc1, "
      "Tensor fc2, " LENET_PARAMS_SCHEMA
      ", bool[11] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
#undef LENET_PARAMS_SCHEMA
}

namespace {

// _C.cpu_kernel(): which CPU kernels float32 calls run on now.
PyObject* cpu_kernel(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(lenet_ext::cpu::selected_kernel_name());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// _C.set_cpu_kernel(name): runs later float32 calls on other CPU kernels
// (the names LENET_EXT_CPU_KERNEL takes); the tests use it to cover each one.
PyObject* set_cpu_kernel(PyObject*, PyObject* name) {
  const char* utf8 = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : nullptr;
  if (utf8 == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "set_cpu_kernel: expected a str");
    return nullptr;
  }
  try {
    lenet_ext::cpu::select_kernel(utf8);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"cpu_kernel", cpu_kernel, METH_NOARGS, "The CPU kernels float32 calls run on now."},
    {"set_cpu_kernel", set_cpu_kernel, METH_O,
     "Runs later float32 calls on the named CPU kernels (generic, baseline, avx2, avx512, auto)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "Compiled kernels of lenet_ext; use lenet_ext.ops.", -1, module_methods};

}  // namespace

// A plain module: the operators are reached through torch.ops.lenet_ext, and
// the attributes below record how this binary was built.
PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef LENET_EXT_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddStringConstant(module, "torch_version", LENET_EXT_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", LENET_EXT_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
