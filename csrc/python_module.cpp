// The Python module `layerskip_ext._C`: empty. Importing it loads the shared library, whose static
// initialisers register the ops (torch_bindings.cpp) and kernels. Kept apart so that the CMake build
// of the same sources never links libpython.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
