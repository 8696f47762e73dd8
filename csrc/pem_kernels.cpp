// The pem_kernels operator library: every op schema lives in this one block, so the ops exist (and
// can be faked, traced and error-checked) in every build, CPU-only or CUDA. Device kernels register
// themselves from csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd are registered from
// Python (pem_kernels/ops/).

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing pem_kernels._C only needs to run the static registrations below; the module itself
// exposes nothing, since every entry point is a dispatcher op under torch.ops.pem_kernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pem_kernels, m) {
  // keys [B, HW, C], queries [B, N, C], mask [B, N, HW] bool (True = may be selected) or None.
  // Returns prototypes [B, N, C] (keys dtype) and indices [B, num_heads, N] int64.
  m.def(
      "prototype_select(Tensor keys, Tensor queries, Tensor? mask, int num_heads, "
      "bool official_empty, bool normalize_keys) -> (Tensor, Tensor)");
  // Gradient of prototype_select w.r.t. keys: grad_prototypes [B, N, C], indices [B, heads, N].
  m.def(
      "_prototype_select_backward(Tensor grad_prototypes, Tensor keys, Tensor indices, "
      "bool normalize_keys) -> Tensor");
  // out = residual + out_weight @ (alpha * l2norm(proj_weight @ (prototypes * queries) + proj_bias)
  //       + prototypes) + out_bias; l2norm over the query axis (official PEM) or channels (paper).
  // prototypes, queries [B, N, C]; residual [B, N, C]; weights [C, C]; biases [C]; alpha [C].
  m.def(
      "prototype_attention(Tensor prototypes, Tensor queries, Tensor residual, Tensor proj_weight, "
      "Tensor proj_bias, Tensor alpha, Tensor out_weight, Tensor out_bias, "
      "bool normalize_over_queries) -> Tensor");
  // PEM-CA's feature projection for inference: keys [B, H*W, C_out] = out_weight @
  // dwconv3x3(BN(memory + pos), zero padding 1) + out_bias, per pixel, with BN in eval mode:
  // (x - bn_mean) / sqrt(bn_var + bn_eps) * bn_weight + bn_bias, computed by the kernels in acc_t
  // (no launches for the affine, nothing cached between calls). memory and pos [B, C, H, W];
  // bn_mean, bn_var, bn_weight, bn_bias (the last two optional: BatchNorm without affine) [C];
  // dw_weight [C, 1, 3, 3], dw_bias [C]; out_weight [C_out, C], out_bias [C_out]; every
  // parameter in memory's dtype. With normalize, every pixel's row is divided by
  // max(||row||_2, 1e-12) (F.normalize), the norm taken before rounding to the output dtype. No
  // autograd.
  m.def(
      "local_representation(Tensor memory, Tensor? pos, Tensor bn_mean, Tensor bn_var, "
      "Tensor? bn_weight, Tensor? bn_bias, float bn_eps, Tensor dw_weight, Tensor dw_bias, "
      "Tensor out_weight, Tensor out_bias, bool normalize=False) -> Tensor");
  // PEM-CA's query projection for inference: queries [B, Q, C_out] = F.normalize(weight @
  // LayerNorm(tgt + query_pos) + bias) per (query, image) row, from tgt and query_pos [Q, B, C];
  // ln_weight, ln_bias [C] and ln_eps the LayerNorm; weight [C_out, C], bias [C_out]; at most 1024
  // channels in and out. Accumulation in fp32 (fp64 for fp64), rounded once. No autograd.
  m.def(
      "query_projection(Tensor tgt, Tensor? query_pos, Tensor ln_weight, Tensor ln_bias, "
      "float ln_eps, Tensor weight, Tensor bias) -> Tensor");
  // Modulated deformable convolution with torchvision.ops.deform_conv2d's semantics.
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int groups, int offset_groups) -> Tensor");
  // Gradients of deform_conv2d w.r.t. all of its tensors, given grad_output [B, C_out, out_h,
  // out_w]. grad_mask is an empty tensor when mask is None; grad_bias is always [C_out].
  m.def(
      "_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor offset, "
      "Tensor? mask, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, "
      "int dilation_w, int groups, int offset_groups) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_offset, Tensor grad_mask, Tensor grad_bias)");
}
