// Host check of the CTR-GC CUDA kernels' generic (SIMT) operand views
// (csrc/ctr_graph_conv_kernels.cu): the aggregation, dv and dtopo, run through
// views_check::host_gemm and compared with the op's math written as plain loops.
#include "ctr_graph_conv_kernels.cu"
#include "views_check.h"

using namespace bharnet;
using namespace bharnet::cuda;
using views_check::expect_close;
using views_check::host_gemm;

template <typename T>
void check(const CtrShape& s, double tol) {
  using acc_t = acc_of<T>;
  const int64_t CG = s.C / s.G, TB = s.dynamic ? s.B : 1, VV = s.V * s.V;
  const auto v64 = views_check::random_values(s.B * s.H * s.C * s.T * s.V, 5);
  const auto topo64 = views_check::random_values(TB * s.H * s.G * VV, 6);
  const auto dy64 = views_check::random_values(s.B * s.C * s.T * s.V, 7);
  const auto v = views_check::cast<T>(v64), dy = views_check::cast<T>(dy64);
  const auto topo = views_check::cast<acc_t>(topo64);

  std::vector<double> y_ref(s.B * s.C * s.T * s.V, 0.0), dv_ref(v64.size(), 0.0), dtopo_ref(s.B * s.H * s.G * VV, 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t t = 0; t < s.T; ++t)
          for (int64_t i = 0; i < s.V; ++i)
            for (int64_t j = 0; j < s.V; ++j) {
              const int64_t g = c / CG;
              const double a = topo64[(((s.dynamic ? b : 0) * s.H + h) * s.G + g) * VV + i * s.V + j];
              const int64_t vi = (((b * s.H + h) * s.C + c) * s.T + t) * s.V + j;
              const int64_t yi = ((b * s.C + c) * s.T + t) * s.V + i;
              y_ref[yi] += a * v64[vi];
              dv_ref[vi] += a * dy64[yi];
              dtopo_ref[((b * s.H + h) * s.G + g) * VV + i * s.V + j] += dy64[yi] * v64[vi];
            }

  std::vector<T> y(y_ref.size(), T(-1));
  host_gemm(ForwardProblem<T>{s, FastDivmod(s.V), v.data(), topo.data(), y.data()}, s.B * s.G);
  expect_close("forward", y, y_ref, tol);
  std::vector<T> dv(dv_ref.size(), T(-1));
  host_gemm(InputGradProblem<T>{s, dy.data(), topo.data(), dv.data()}, s.B * s.H * s.G);
  expect_close("dv", dv, dv_ref, tol);
  std::vector<acc_t> dtopo(dtopo_ref.size(), acc_t(-1));
  host_gemm(TopologyGradProblem<T>{s, dy.data(), v.data(), dtopo.data()}, s.B * s.H * s.G);
  expect_close("dtopo", dtopo, dtopo_ref, tol);
}

int main() {
  // B, H, C, T, V, R, G, dynamic
  const CtrShape shapes[] = {{2, 3, 8, 3, 5, 2, 4, true}, {3, 2, 6, 5, 7, 1, 1, false}, {1, 3, 12, 2, 25, 2, 3, true}};
  for (const CtrShape& s : shapes) {
    std::printf("case B%ld H%ld C%ld T%ld V%ld G%ld %s\n", (long)s.B, (long)s.H, (long)s.C, (long)s.T, (long)s.V,
                (long)s.G, s.dynamic ? "dynamic" : "static");
    check<double>(s, 1e-12);
    check<float>(s, 1e-4);
  }
  std::printf("all CTR-GC view checks passed\n");
  return 0;
}
