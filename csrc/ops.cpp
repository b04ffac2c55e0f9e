// The Python module stub of vit_fast._C.
//
// The extension defines no schema: every op's schema is written once, in Python (the Contract in
// vit_fast/ops/<op>.py, defined as vit_fast::<op>_{fwd,bwd}_cuda by vit_fast.ops.spec.register_backend), with its
// fakes and autograd rule. Each op's CUDA kernels register for those names in its own .cu
// (TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) at the bottom); the dispatcher accepts a kernel before its schema, and
// checks the kernel's C++ signature against the schema when Python defines it at import. Importing vit_fast._C
// only registers the kernels: it touches no GPU.

#include <Python.h>

// An empty module: `import vit_fast._C` loads this library, whose static initializers run the registrations in
// the .cu files. No pybind11: the ops are reached through torch.ops.vit_fast.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vit_fast CUDA ops, reached as torch.ops.vit_fast.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
