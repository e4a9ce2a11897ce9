// Bone features: y = x - x[parents] along one dimension (CPU, ATen parallel_for).
//
// For x viewed as (outer, V, inner) around dimension `dim`:
//   y[o, v, i] = x[o, v, i] - x[o, parents[v], i]
// A root joint is its own parent, so its bone is zero.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace bharnet {

template <typename scalar_t>
void bone_kernel(const scalar_t* x, const int64_t* parents, scalar_t* y,
                 int64_t outer, int64_t nodes, int64_t inner) {
  at::parallel_for(0, outer * nodes, 1024 / std::max<int64_t>(inner, 1) + 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row / nodes, v = row % nodes;
      const scalar_t* self = x + row * inner;
      const scalar_t* parent = x + (o * nodes + parents[v]) * inner;
      scalar_t* out = y + row * inner;
      for (int64_t i = 0; i < inner; ++i) out[i] = self[i] - parent[i];
    }
  });
}

at::Tensor bone_cpu(const at::Tensor& x, const at::Tensor& parents, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu() && parents.device().is_cpu(), "bharnet::bone: CPU tensors expected");
  TORCH_CHECK(parents.dim() == 1 && parents.scalar_type() == at::kLong,
              "bharnet::bone: parents must be a 1-D int64 tensor");
  TORCH_CHECK(dim >= 0 && dim < x.dim(), "bharnet::bone: dim out of range");
  const int64_t nodes = x.size(dim);
  TORCH_CHECK(parents.size(0) == nodes, "bharnet::bone: parents must have one entry per node");
  auto parents_c = parents.contiguous();
  const int64_t* p = parents_c.data_ptr<int64_t>();
  for (int64_t v = 0; v < nodes; ++v) {
    TORCH_CHECK(p[v] >= 0 && p[v] < nodes, "bharnet::bone: parent index out of range");
  }
  auto xc = x.contiguous();  // a size-1 dimension may keep any stride: index by sizes, not strides
  auto y = at::empty(xc.sizes(), xc.options());
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= xc.size(i);
  for (int64_t i = dim + 1; i < xc.dim(); ++i) inner *= xc.size(i);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "bharnet::bone", [&] {
    bone_kernel<scalar_t>(xc.data_ptr<scalar_t>(), p, y.data_ptr<scalar_t>(), outer, nodes, inner);
  });
  return y;
}

}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("bone(Tensor x, Tensor parents, int dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("bone", &bharnet::bone_cpu);
}
