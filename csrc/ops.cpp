// The schema of every kd_kernels op, in one place. Device kernels register their
// implementations with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// implementations and autograd formulas are registered from Python (kd_kernels/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(kd_kernels, m) {
  // Fused temperature-softmax KD loss. student (N, C), teacher (K, N, C) (K-teacher ensemble),
  // labels (N,) int64, mask (N,) bool. Returns row_loss (N,) fp32 and d row_loss / d student
  // (N, C) in the student's dtype (an empty tensor when need_grad is false).
  m.def(
      "kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? mask, "
      "float temperature, str kind, float soft_weight, float hard_weight, float beta, "
      "bool scale_t2, int ignore_index, bool need_grad) -> (Tensor, Tensor)");
  // Same, writing the gradient into `grad` (which may share storage with student).
  m.def(
      "kd_loss_forward_out(Tensor student, Tensor teacher, Tensor? labels, Tensor? mask, "
      "float temperature, str kind, float soft_weight, float hard_weight, float beta, "
      "bool scale_t2, int ignore_index, Tensor(a!) grad) -> Tensor");
  // Fused masked MSE of matched layers (TinyBERT attention maps and hidden states), every layer
  // in one launch. student[l], teacher[l]: (B, H, R, C) with a unit last-dim stride; mask (B, R)
  // bool; entries <= threshold become 0; mask_columns also masks column c by mask[b, c].
  // Forward returns the per-row sums of squared differences of all layers end to end, fp32
  // (fp64 for fp64); backward returns d (grad_rows . sums) / d student per layer, contiguous,
  // in the student's dtype, recomputed from student and teacher. Semantics in csrc/layer_mse.h.
  m.def(
      "layer_mse_forward(Tensor[] student, Tensor[] teacher, Tensor? mask, float? threshold, "
      "bool mask_columns) -> Tensor");
  m.def(
      "layer_mse_backward(Tensor grad_rows, Tensor[] student, Tensor[] teacher, Tensor? mask, "
      "float? threshold, bool mask_columns) -> Tensor[]");
  // In-batch InfoNCE, one direction (query -> key), O(N + M) statistics: query (N, D), key
  // (M, D), labels (N,) int64 in [0, M), temperature a 0-dim float32 tensor (float64 for
  // float64 inputs) on the inputs' device, cosine: rows L2-normalized inside. Returns the
  // per-query loss (N,) and the per-query log-sum-exp (N,) that backward reuses, fp32 (fp64
  // for fp64). Semantics in csrc/info_nce.h.
  m.def(
      "info_nce_forward(Tensor query, Tensor key, Tensor labels, Tensor temperature, "
      "bool cosine) -> (Tensor, Tensor)");
  // Gradients of sum_i grad_loss_i * loss_i: (d query, d key) in the inputs' dtype and
  // d temperature (0-dim, in the temperature's dtype), recomputing the similarities block by
  // block.
  m.def(
      "info_nce_backward(Tensor grad_loss, Tensor query, Tensor key, Tensor labels, "
      "Tensor temperature, Tensor lse, bool cosine) -> (Tensor, Tensor, Tensor)");
  // Loss and gradient in one walk when the row weights of the objective are known in forward
  // (reduction mean or sum): returns the per-query loss (N,) and the gradients of
  // sum_i row_weight_i loss_i as info_nce_backward gives them. symmetric (labels arange(N),
  // M >= N) adds the column direction of the same similarities: loss_i = (fwd_i + rev_i) / 2.
  m.def(
      "info_nce_fused(Tensor query, Tensor key, Tensor labels, Tensor temperature, bool cosine, "
      "Tensor row_weight, bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)");
}

// kd_kernels._C is imported as a Python module only to load this library (and its
// TORCH_LIBRARY registrations); it defines no Python functions of its own.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
