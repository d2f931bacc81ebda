// Activation functions and their gradients, elementwise, as torch defines them (F.relu, F.silu,
// F.gelu with approximate='none' and 'tanh'). Every floating dtype computes in fp32 and rounds once
// into its own dtype (activation_math.h has the formulas, shared by both paths):
//   forward:  out = f(x)
//   backward: dx  = dy · f'(x)          (relu: dy where x > 0 or x is NaN, else 0, as torch)
// All tensors contiguous, one shape, one dtype (f32, bf16 or f16), one device; `out` may be `x`
// (and `dx` may be `dy`): each element is read before it is written.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

enum class Activation : int { Relu = 0, Silu = 1, Gelu = 2, GeluTanh = 3 };

// The public op's name for error messages ("relu", "silu", "gelu", "gelu" with approximate 'tanh').
const char* activation_name(Activation kind);
const char* activation_backward_name(Activation kind);

void activation(Activation kind, const Tensor& x, const Tensor& out);
void activation_backward(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx);

void activation_cpu(Activation kind, const Tensor& x, const Tensor& out);
void activation_backward_cpu(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx);
void activation_cuda(Activation kind, const Tensor& x, const Tensor& out, void* stream);
void activation_backward_cuda(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx, void* stream);

}  // namespace moe::ops
