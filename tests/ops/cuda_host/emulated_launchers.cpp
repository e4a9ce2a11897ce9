// C entry points to the CUDA launchers (csrc/cuda_launchers.h) for tests/ops/test_cuda_emulated.py,
// which loads them with ctypes from a library of the .cu files built for cuda_emulation.h. Sizes
// come as int64 arrays in the order of the shape structs; dtype is cuda::DType's code. Each
// returns the launcher's cudaError_t.
#include "cuda_emulation.h"
#include "cuda_launchers.h"

using namespace bharnet::cuda;

namespace {
DType dtype_of(int code) { return static_cast<DType>(code); }
AttnShape attn_shape(const int64_t* s) { return {s[0], s[1], s[2], s[3], s[4], s[5]}; }
DetShape det_shape(const int64_t* s) { return {s[0], s[1], s[2], s[3], s[4], s[5], s[6]}; }
CtrShape ctr_shape(const int64_t* s) { return {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7] != 0}; }
}  // namespace

extern "C" {
// Between barriers, run the threads of a block from the last to the first (reverse != 0).
void emu_set_reverse(int reverse) { bharnet::emu::state().reverse = reverse != 0; }
// The warps-ahead schedule (warps_ahead != 0) or thread by thread (cuda_emulation.h).
void emu_set_warps_ahead(int warps_ahead) { bharnet::emu::state().warps_ahead = warps_ahead != 0; }
// The compute capability's major version the emulated device reports (9 unless set).
void emu_set_compute_major(int major) { bharnet::emu::state().compute_major = major; }

int emu_attn_mma_usable(int dtype, const int64_t* shape) { return attn_mma_usable(dtype_of(dtype), attn_shape(shape)); }
int emu_attn_forward(int dtype, const int64_t* shape, const void* q, const void* kv, const bool* mask, void* o,
                     void* lse) {
  return attn_forward(dtype_of(dtype), attn_shape(shape), q, kv, mask, o, lse, nullptr);
}
int emu_attn_backward(int dtype, const int64_t* shape, const void* grad_o, const void* q, const void* kv,
                      const void* lse, const bool* mask, void* delta, void* dq, void* dkv) {
  return attn_backward(dtype_of(dtype), attn_shape(shape), grad_o, q, kv, lse, mask, delta, dq, dkv, nullptr);
}
int emu_det_tables(int dtype, const int64_t* shape, int64_t stride, const void* offsets, int offsets_fp64,
                   int bounds_pass_grad, int32_t* p0, int32_t* p1, void* w, void* inside, int32_t* row_start,
                   int32_t* src, void* coef) {
  return det_tables(dtype_of(dtype), det_shape(shape), stride, offsets, offsets_fp64 != 0, bounds_pass_grad != 0, p0,
                    p1, w, inside, row_start, src, coef, nullptr);
}
int emu_det_finish_param_grad(int dtype, const int64_t* shape, int64_t splits, const void* part, const void* weight,
                              void* dweight, void* dtau) {
  return det_finish_param_grad(dtype_of(dtype), det_shape(shape), splits, part, weight, dweight, dtau, nullptr);
}
int emu_det_forward(int dtype, const int64_t* shape, const void* x, const int32_t* p0, const int32_t* p1,
                    const void* w, const void* weight, const void* bias, void* y) {
  return det_forward(dtype_of(dtype), det_shape(shape), x, p0, p1, w, weight, bias, y, nullptr);
}
int emu_det_param_grad(int dtype, const int64_t* shape, const void* dy, const void* x, const int32_t* p0,
                       const int32_t* p1, const void* w, const void* inside, int64_t splits, void* out) {
  return det_param_grad(dtype_of(dtype), det_shape(shape), dy, x, p0, p1, w, inside, splits, out, nullptr);
}
int emu_det_input_grad(int dtype, const int64_t* shape, const void* dy, const void* weight, const int32_t* row_start,
                       const int32_t* src, const void* coef, void* dx) {
  return det_input_grad(dtype_of(dtype), det_shape(shape), dy, weight, row_start, src, coef, dx, nullptr);
}
int emu_ctr_mma_usable(int dtype, const int64_t* shape) { return ctr_mma_usable(dtype_of(dtype), ctr_shape(shape)); }
int emu_ctr_topology(int dtype, const int64_t* shape, const void* A, const void* q, const void* k, const void* weight,
                     const void* bias, const void* alpha, void* topo) {
  return ctr_topology(dtype_of(dtype), ctr_shape(shape), A, q, k, weight, bias, alpha, topo, nullptr);
}
int emu_ctr_refinement_grad(int dtype, const int64_t* shape, const void* dtopo, const void* q, const void* k,
                            const void* weight, const void* bias, const void* alpha, void* dA, void* dq, void* dk,
                            void* dweight, void* dbias, void* dalpha, void* scratch) {
  return ctr_refinement_grad(dtype_of(dtype), ctr_shape(shape), dtopo, q, k, weight, bias, alpha, dA, dq, dk, dweight,
                             dbias, dalpha, scratch, nullptr);
}
int emu_ctr_forward(int dtype, const int64_t* shape, const void* v, const void* topo, void* y) {
  return ctr_forward(dtype_of(dtype), ctr_shape(shape), v, topo, y, nullptr);
}
int emu_ctr_backward(int dtype, const int64_t* shape, const void* dy, const void* v, const void* topo, void* dv,
                     void* dtopo) {
  return ctr_backward(dtype_of(dtype), ctr_shape(shape), dy, v, topo, dv, dtopo, nullptr);
}
}
