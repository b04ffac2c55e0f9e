// The schemas of every vit_fast CUDA op, and the Python module stub of vit_fast._C.
//
// Each schema is the one its op declares in Python (KernelOp.fwd_schema / bwd_schema in vit_fast/ops/<op>.py,
// checked equal by the tests), under the name vit_fast::<op>_{fwd,bwd}_cuda. Each op's CUDA kernels register in
// its own .cu (TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) at the bottom). The fakes and the autograd rules are
// registered from Python, in the module named by set_python_module before each group, shared with the Triton
// backend. Importing vit_fast._C only registers the ops: it touches no GPU.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vit_fast, m) {
  m.set_python_module("vit_fast.ops.attention");
  m.def("attention_fwd_cuda(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("attention_packed_fwd_cuda(Tensor qkv, float scale) -> (Tensor, Tensor)");
  m.def("attention_packed_bwd_cuda(Tensor dout, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor");

  m.set_python_module("vit_fast.ops.layer_norm");
  m.def("layer_norm_fwd_cuda(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd_cuda(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");

  m.set_python_module("vit_fast.ops.layernorm_mlp");
  m.def(
      "layernorm_mlp_fwd_cuda(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias, "
      "Tensor fc2_weight, Tensor fc2_bias, Tensor? residual, float eps, bool save_pre) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layernorm_mlp_bwd_cuda(Tensor dout, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, "
      "Tensor fc1_bias, Tensor fc2_weight, Tensor mean, Tensor rstd, Tensor pre, bool grad_ln, bool grad_fc1, "
      "bool grad_fc2) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  m.set_python_module("vit_fast.ops.patch_embed");
  m.def(
      "patch_embed_fwd_cuda(Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed) "
      "-> Tensor");
  m.def(
      "patch_embed_bwd_cuda(Tensor grad_out, Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, "
      "Tensor? pos_embed, bool images_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// An empty module: `import vit_fast._C` loads this library, whose static initializers run the registrations
// above. No pybind11: the ops are reached through torch.ops.vit_fast.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vit_fast CUDA ops, reached as torch.ops.vit_fast.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
