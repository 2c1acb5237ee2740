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
  // Returns the per-row sums of squared differences of all layers end to end, fp32 (fp64 for
  // fp64), and per layer (1/2) d sum / d student, contiguous, in the student's dtype (an empty
  // list when need_grad is false). Semantics in csrc/layer_mse.h.
  m.def(
      "layer_mse_forward(Tensor[] student, Tensor[] teacher, Tensor? mask, float? threshold, "
      "bool mask_columns, bool need_grad) -> (Tensor, Tensor[])");
}

// kd_kernels._C is imported as a Python module only to load this library (and its
// TORCH_LIBRARY registrations); it defines no Python functions of its own.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
