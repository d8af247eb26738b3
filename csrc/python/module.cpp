// fastmoe._C: the Python extension. Linking it to libfastmoe_torch makes importing it run the TORCH_LIBRARY
// registrations, after which every op is reachable as torch.ops.fastmoe.<name>. It also reports how the library
// was built (with_cuda is true when the ops have CUDA kernels) and carries the deterministic-mode switch that the
// ops read (fastmoe.use_deterministic). Torch-free, so it compiles in a second.
#include <Python.h>

#include "fastmoe/debug.h"
#include "fastmoe/determinism.h"
#include "fastmoe/expert_seed.h"

namespace {

PyObject* set_deterministic(PyObject*, PyObject* flag) {
  const int enabled = PyObject_IsTrue(flag);
  if (enabled < 0) return nullptr;
  fastmoe::set_deterministic(enabled != 0);
  Py_RETURN_NONE;
}

PyObject* deterministic_flag(PyObject*, PyObject*) {
  return PyBool_FromLong(fastmoe::deterministic_flag() ? 1 : 0);
}

PyObject* deterministic(PyObject*, PyObject*) {
  return PyBool_FromLong(fastmoe::deterministic() ? 1 : 0);
}

PyObject* set_debug(PyObject*, PyObject* flag) {
  const int enabled = PyObject_IsTrue(flag);
  if (enabled < 0) return nullptr;
  fastmoe::set_debug(enabled != 0);
  Py_RETURN_NONE;
}

PyObject* expert_seed(PyObject*, PyObject* args) {
  unsigned long long base_seed = 0;
  long long global_expert = 0;
  if (!PyArg_ParseTuple(args, "KL:expert_seed", &base_seed, &global_expert)) return nullptr;
  return PyLong_FromUnsignedLongLong(fastmoe::expert_seed(base_seed, global_expert));
}

PyMethodDef methods[] = {
    {"set_deterministic", set_deterministic, METH_O, "Sets fastmoe's deterministic-mode switch."},
    {"deterministic_flag", deterministic_flag, METH_NOARGS, "fastmoe's own deterministic-mode switch."},
    {"deterministic", deterministic, METH_NOARGS,
     "True when fastmoe's switch or torch.use_deterministic_algorithms is on: what the ops read."},
    {"set_debug", set_debug, METH_O, "Sets the debug-mode switch of the C++ token path (fastmoe.set_debug)."},
    {"expert_seed", expert_seed, METH_VARARGS,
     "expert_seed(base_seed, global_expert): the seed of one global expert's initialisation stream."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "fastmoe._C",
                          "fastmoe's compiled library (ops are registered under torch.ops.fastmoe)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTMOE_WITH_CUDA_OPS
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddObject(module, "with_cuda", PyBool_FromLong(with_cuda)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
