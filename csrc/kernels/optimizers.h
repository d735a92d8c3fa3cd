// Fused optimizer updates over flat float32 buffers (parameters, gradients, state).
//
// Why these exist when torch has fused=True: torch's fused CPU step already runs at the
// memory-bandwidth floor, so an update only gets cheaper by doing *more* in the same pass
// over memory. Each kernel here folds into its one pass over (param, grad, state):
//   * a gradient multiplier `grad_scale` = (1/world_size averaging) x (1/loss scale)
//     x (clipping coefficient), with `maximize` folded in as its sign;
//   * the optimizer's own arithmetic, in the same order of operations as torch.optim's
//     single-tensor implementation so results agree within float32 rounding;
//   * all cores: the buffer is split across a private thread pool (kernels/parallel.h).
//
// Inf/NaN policy (two passes in total): an update must never be half applied, and a
// non-finite value can sit at the very end of the buffer, so the check cannot ride along
// in the update pass (by the time it is seen, earlier elements are already written and
// Adam/Adagrad updates cannot be undone exactly). Instead grad_sq_norm_and_finite() reads
// the gradients once -- the same read gives the global norm that clipping needs -- and the
// update pass runs only when it reports finite. That first pass reads 4 bytes/element
// against 20-28 for the update, and its data are still in the large L3 when the update
// starts. Callers that already know the gradient is finite (e.g. the loss scaler checked
// it while unscaling) skip it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pbm {

struct GradStats {
  double sq_norm;  // sum of (grad * scale)^2 in float64 (Inf/NaN if any element is)
  bool finite;     // every grad * scale is finite in float32
};

// One read of grad: the squared L2 norm of grad*scale and whether all of it is finite.
GradStats grad_sq_norm_and_finite(const float* grad, size_t count, float scale, int num_threads);

// grad *= scale in place; returns true when every result is finite. (The loss scaler's
// unscale-and-check for gradients the optimizer reads itself, e.g. torch.optim.)
bool unscale_and_check(float* grad, size_t count, float scale, int num_threads);
bool unscale_and_check(double* grad, size_t count, double scale, int num_threads);

// Hyperparameters arrive as Python floats (double) and are rounded to float32 where torch
// rounds them: when a scalar meets a float32 tensor. Derived scalars (bias corrections,
// 1 - beta) are computed in double first, as torch computes them in Python.
struct SgdParams {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool momentum_initialized;  // false on the first step: buffer = grad, as torch does
  float grad_scale;           // includes the sign for maximize
};

// torch.optim.SGD; momentum_buffer may be null when momentum == 0.
void sgd_step(float* param, const float* grad, float* momentum_buffer, size_t count,
              const SgdParams& p, int num_threads);

struct AdamParams {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay;  // AdamW
  bool amsgrad;
  double step;                  // the step count after incrementing (>= 1)
  float grad_scale;             // includes the sign for maximize
};

// torch.optim.Adam / AdamW; max_exp_avg_sq may be null unless amsgrad.
// Adam's per-element state, in torch.optim's names (max_exp_avg_sq: amsgrad only, else null).
struct AdamMoments {
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;
};

void adam_step(float* param, const float* grad, const AdamMoments& moments, size_t count, const AdamParams& p,
               int num_threads);

struct AdagradParams {
  double lr, lr_decay, weight_decay, eps;
  double step;                  // the step count after incrementing (>= 1)
  float grad_scale;             // includes the sign for maximize
};

// torch.optim.Adagrad.
void adagrad_step(float* param, const float* grad, float* state_sum, size_t count,
                  const AdagradParams& p, int num_threads);

}  // namespace pbm
