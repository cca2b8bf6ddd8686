// The lenet_ext._C extension module: how this binary was built, and the CPU
// and CUDA kernel choices. Loading it registers the operators: each file in ops/
// defines its operators' schemas (TORCH_LIBRARY_FRAGMENT), and the files in
// ops/cpu and ops/cuda register their kernels.
#define PY_SSIZE_T_CLEAN  // Py_ssize_t lengths for the "#" formats
#include <Python.h>
#include <c10/util/Exception.h>

#include "ops/cpu/simd/simd_kernels.h"
#include "ops/cuda_kernel_choice.h"
#ifdef LENET_EXT_WITH_CUDA
#include "ops/cuda/phase_clocks.h"
#endif

#ifndef LENET_EXT_TORCH_VERSION
#error "setup.py defines LENET_EXT_TORCH_VERSION"
#endif
#ifndef LENET_EXT_CUDA_ARCHS
#define LENET_EXT_CUDA_ARCHS ""
#endif

namespace {

// Runs f() and returns its result; a C++ exception becomes the Python one
// (ValueError for a bad value, RuntimeError otherwise) and nullptr.
template <typename F>
PyObject* python_errors(F&& f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// _C.cpu_kernel(): which CPU kernels float32 calls run on now.
PyObject* cpu_kernel(PyObject*, PyObject*) {
  return python_errors([] { return PyUnicode_FromString(lenet_ext::cpu::selected_kernel_name()); });
}

// Calls select(name) with the str argument of a _C.set_* function.
template <typename Select>
PyObject* select_by_name(PyObject* name, const char* function, Select&& select) {
  const char* utf8 = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : nullptr;
  if (utf8 == nullptr) {
    if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "%s: expected a str", function);
    return nullptr;
  }
  return python_errors([&] {
    select(utf8);
    Py_RETURN_NONE;
  });
}

// _C.set_cpu_kernel(name): runs later float32 calls on other CPU kernels
// (the names LENET_EXT_CPU_KERNEL takes); the tests use it to cover each one.
PyObject* set_cpu_kernel(PyObject*, PyObject* name) {
  return select_by_name(name, "set_cpu_kernel", lenet_ext::cpu::select_kernel);
}

// _C.set_cuda_kernel(name): "fused" (the default) or "reference", the names
// LENET_EXT_CUDA_KERNEL takes; the tests use it to run both.
PyObject* set_cuda_kernel(PyObject*, PyObject* name) {
  return select_by_name(name, "set_cuda_kernel", lenet_ext::select_cuda_kernel);
}

// _C.cuda_kernel(): which CUDA kernels the operators run.
PyObject* cuda_kernel(PyObject*, PyObject*) {
  return python_errors([] { return PyUnicode_FromString(lenet_ext::cuda_reference_selected() ? "reference" : "fused"); });
}

// _C.set_cuda_tile(tile): "auto" (the default) or a number of images per
// thread block for the tile programs, as LENET_EXT_CUDA_TILE takes it.
PyObject* set_cuda_tile(PyObject*, PyObject* tile) {
  return select_by_name(tile, "set_cuda_tile", lenet_ext::select_cuda_tile);
}

// _C.cuda_tile(): the images per block asked of the tile programs, or "auto".
PyObject* cuda_tile(PyObject*, PyObject*) {
  return python_errors([] {
    const int tile = lenet_ext::requested_cuda_tile();
    return tile == 0 ? PyUnicode_FromString("auto") : PyUnicode_FromFormat("%d", tile);
  });
}

#ifdef LENET_EXT_WITH_CUDA
// _C.record_phase_clocks(on): stamps the tile programs' later launches
// phase by phase (ops/cuda/phase_clocks.h), or stops.
PyObject* record_phase_clocks(PyObject*, PyObject* on) {
  const int truth = PyObject_IsTrue(on);
  if (truth < 0) return nullptr;
  lenet_ext::record_phase_clocks(truth == 1);
  Py_RETURN_NONE;
}

// _C.take_phase_clocks(): the launches stamped since the last call, in
// order, as (program, phase names, tiles, stamps): stamps is the bytes of a
// tiles x (phases + 1) int64 array of clock64() values.
PyObject* take_phase_clocks(PyObject*, PyObject*) {
  return python_errors([]() -> PyObject* {
    const std::vector<lenet_ext::PhaseClocks> taken = lenet_ext::take_phase_clocks();
    PyObject* launches = PyList_New(0);
    for (size_t k = 0; launches != nullptr && k < taken.size(); ++k) {
      const lenet_ext::PhaseClocks& launch = taken[k];
      PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(launch.phases.size()));
      for (size_t i = 0; names != nullptr && i < launch.phases.size(); ++i) {
        PyObject* name = PyUnicode_FromString(launch.phases[i].c_str());
        if (name == nullptr) Py_CLEAR(names);
        else PyTuple_SET_ITEM(names, static_cast<Py_ssize_t>(i), name);
      }
      PyObject* entry = names == nullptr ? nullptr
                        : Py_BuildValue("(sNLy#)", launch.program.c_str(), names, static_cast<long long>(launch.tiles),
                                        reinterpret_cast<const char*>(launch.stamps.data()),
                                        static_cast<Py_ssize_t>(launch.stamps.size() * sizeof(long long)));
      if (entry == nullptr || PyList_Append(launches, entry) < 0) Py_CLEAR(launches);
      Py_XDECREF(entry);
    }
    return launches;
  });
}
#endif

// _C.unchanged(types, entries, empty, absent): whether type(o) is t for each
// pair (o, t) of the flat tuple `types`, d.get(k) is v for each triple
// (d, k, v) of `entries` (d a dict), every dict of `empty` is empty, and k
// is not in d for each pair (d, k) of `absent`. LeNet.forward checks with it
// that nothing it decided its operator arguments from (the layers' types,
// configuration, parameters, hooks and forward methods) was replaced: a few
// dozen identity tests, several times cheaper here than in Python.
PyObject* unchanged(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1]) || !PyTuple_Check(args[2]) ||
      !PyTuple_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "unchanged: expected four tuples (types, entries, empty, absent)");
    return nullptr;
  }
  PyObject *types = args[0], *entries = args[1], *empty = args[2], *absent = args[3];
  if (PyTuple_GET_SIZE(types) % 2 != 0 || PyTuple_GET_SIZE(entries) % 3 != 0 || PyTuple_GET_SIZE(absent) % 2 != 0) {
    PyErr_SetString(PyExc_ValueError,
                    "unchanged: expected (object, type) pairs, (dict, key, value) triples and (dict, key) pairs");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i += 2) {
    if (reinterpret_cast<PyObject*>(Py_TYPE(PyTuple_GET_ITEM(types, i))) != PyTuple_GET_ITEM(types, i + 1))
      Py_RETURN_FALSE;
  }
  // The value under a key of a dict (borrowed; nullptr when absent), or an error set.
  const auto lookup = [](PyObject* dict, PyObject* key, const char* what, PyObject** value) {
    if (!PyDict_Check(dict)) {
      PyErr_Format(PyExc_TypeError, "unchanged: expected a dict in each %s", what);
      return false;
    }
    *value = PyDict_GetItemWithError(dict, key);
    return *value != nullptr || !PyErr_Occurred();
  };
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entries); i += 3) {
    PyObject* value = nullptr;
    if (!lookup(PyTuple_GET_ITEM(entries, i), PyTuple_GET_ITEM(entries, i + 1), "triple of entries", &value))
      return nullptr;
    if (value != PyTuple_GET_ITEM(entries, i + 2)) Py_RETURN_FALSE;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(empty); ++i) {
    PyObject* dict = PyTuple_GET_ITEM(empty, i);
    if (!PyDict_Check(dict) || PyDict_GET_SIZE(dict) != 0) Py_RETURN_FALSE;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(absent); i += 2) {
    PyObject* value = nullptr;
    if (!lookup(PyTuple_GET_ITEM(absent, i), PyTuple_GET_ITEM(absent, i + 1), "pair of absent", &value))
      return nullptr;
    if (value != nullptr) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

PyMethodDef module_methods[] = {
    {"cuda_kernel", cuda_kernel, METH_NOARGS, "The CUDA kernels the operators run: fused or reference."},
    {"set_cuda_kernel", set_cuda_kernel, METH_O, "Runs the operators' later CUDA calls on fused or reference kernels."},
    {"cuda_tile", cuda_tile, METH_NOARGS, "The images per thread block asked of the CUDA tile programs, or auto."},
    {"set_cuda_tile", set_cuda_tile, METH_O,
     "Asks the CUDA tile programs' later calls for this many images per thread block (a str), or auto."},
#ifdef LENET_EXT_WITH_CUDA
    {"record_phase_clocks", record_phase_clocks, METH_O,
     "Stamps the CUDA tile programs' later launches phase by phase (True), or stops (False)."},
    {"take_phase_clocks", take_phase_clocks, METH_NOARGS,
     "The launches stamped since the last call: (program, phase names, tiles, int64 stamps as bytes)."},
#endif
    {"cpu_kernel", cpu_kernel, METH_NOARGS, "The CPU kernels float32 calls run on now."},
    {"unchanged", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(unchanged)), METH_FASTCALL,
     "unchanged(types, entries, empty, absent): type(o) is t for each (o, t), d.get(k) is v for each (d, k, v), "
     "every dict of empty is empty, and k not in d for each (d, k) of absent."},
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
