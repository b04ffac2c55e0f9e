// The schemas of every vit_fast CUDA op, and the Python module stub of vit_fast._C.
//
// Each op's CUDA kernels register in its own .cu (TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) at the bottom). The
// fake (meta) implementations and the autograd rules are registered from Python, in the module named by
// set_python_module before each group, shared with the Triton backend (same signatures as its
// vit_fast::<op>_fwd_triton / _bwd_triton ops). Importing vit_fast._C only registers the ops: it touches no GPU.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vit_fast, m) {
  m.set_python_module("vit_fast.ops.attention");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
      "-> (Tensor, Tensor, Tensor)");

  m.set_python_module("vit_fast.ops.layer_norm");
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");

  m.set_python_module("vit_fast.ops.layernorm_mlp");
  m.def(
      "layernorm_mlp_fwd(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias, "
      "Tensor fc2_weight, Tensor fc2_bias, Tensor? residual, float eps, bool save_pre) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layernorm_mlp_bwd(Tensor dout, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, "
      "Tensor fc1_bias, Tensor fc2_weight, Tensor mean, Tensor rstd, Tensor pre, bool grad_ln, bool grad_fc1, "
      "bool grad_fc2) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  m.set_python_module("vit_fast.ops.patch_embed");
  m.def(
      "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed) "
      "-> Tensor");
  m.def(
      "patch_embed_bwd(Tensor grad_out, Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, "
      "Tensor? pos_embed, bool images_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// An empty module: `import vit_fast._C` loads this library, whose static initializers run the registrations
// above. No pybind11: the ops are reached through torch.ops.vit_fast.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vit_fast CUDA ops, reached as torch.ops.vit_fast.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
