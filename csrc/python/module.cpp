// fastmoe._C: the Python extension. It holds no bindings: linking it to libfastmoe_torch makes importing it
// run the TORCH_LIBRARY registrations, after which every op is reachable as torch.ops.fastmoe.<name>.
// It also reports how the library was built: with_cuda is true when the ops have CUDA kernels. Torch-free, so it
// compiles in a second.
#include <Python.h>

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "fastmoe._C",
                          "fastmoe's compiled library (ops are registered under torch.ops.fastmoe)", -1, nullptr};

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
