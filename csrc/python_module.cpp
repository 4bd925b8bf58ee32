// The Python module seer_kernels._C. It has no functions: importing it runs the static
// TORCH_LIBRARY registrations of the kernels linked into it, which then appear as
// torch.ops.seer_C.<op>. Keeping pybind out of the build saves most of its compile time.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "Native kernels of seer_kernels (registered as torch.ops.seer_C).",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
}
