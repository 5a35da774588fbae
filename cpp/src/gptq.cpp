// GPTQ: fixed-order quantization with lazy block updates through the Cholesky factor of H^-1.
#include "obc/gptq.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "internal/gptq_kernels.hpp"
#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace internal {

void check_gptq_options(const GptqOptions& opt) {
  OBC_CHECK(opt.block_size >= 1, "block_size: expected >= 1, got ", opt.block_size);
}

Eigen::VectorXd hessian_diagonal(const HessianRef& H) {
  return H.visit([](const auto& h) -> Eigen::VectorXd {
    return h.diagonal().template cast<double>();
  });
}

// The sweep compiled for the ISA the row kernels use (so OBC_SIMD=generic applies here too).
const GptqKernels& gptq_kernels() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (std::strcmp(kernels().isa, "generic") != 0) return gptq_kernels_avx2();
#endif
  return gptq_kernels_generic();
}

template <class Scalar>
void gptq_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& prep,
               const Eigen::VectorXd& hdiag, const QuantGrid<Scalar>& grid,
               const GptqOptions& gopt, const RunOptions& run, RowMatrix<Scalar>& out,
               Eigen::VectorXd* step_losses) {
  const Index rows = W.rows(), cols = W.cols();
  OBC_CHECK(prep.hinv.rows() == cols, "internal: gptq_into needs the float64 inverse");
  // order[k]: the original column quantized at step k. Dead inputs have diag 0 and go last.
  std::vector<Index> order(static_cast<size_t>(cols));
  std::iota(order.begin(), order.end(), Index(0));
  if (gopt.act_order)
    std::stable_sort(order.begin(), order.end(),
                     [&](Index a, Index b) { return hdiag[a] > hdiag[b]; });
  out.resize(rows, cols);
  if (step_losses != nullptr) step_losses->resize(rows);
  const GptqJob<Scalar> job{W.data(),         W.outerStride(),     rows,
                            cols,             order.data(),        prep.dead.data(),
                            prep.hinv.data(), grid.scale.data(),   grid.zero.data(),
                            grid.group_size,  grid.bits,           gopt.block_size,
                            out.data(),       step_losses != nullptr ? step_losses->data() : nullptr};
  bool factored;
  if constexpr (std::is_same_v<Scalar, float>)
    factored = gptq_kernels().sweep_f32(job, run);
  else
    factored = gptq_kernels().sweep_f64(job, run);
  if (!factored)
    throw NotPositiveDefinite(
        "the damped inverse Hessian has no Cholesky factor in float64 (H is too "
        "ill-conditioned); increase damp");
}

}  // namespace internal

template <class Scalar>
QuantResult<Scalar> quantize_gptq(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H, const QuantOptions& opt,
                                  const GptqOptions& gopt, const HessianOptions& hopt,
                                  const RunOptions& run) {
  internal::check_quant_options(opt, W.cols());
  internal::check_gptq_options(gopt);
  HessianOptions inverting = hopt;
  inverting.invert = true;
  PreparedHessian prep = prepare_hessian(H, inverting, run.num_threads, run.interrupt);
  internal::check_quant_inputs<Scalar>(W, prep.cols());
  internal::check_layer_scale<Scalar>(W, prep);
  QuantResult<Scalar> result;
  result.grid = make_grid<Scalar>(W, opt, run.num_threads);
  internal::gptq_into<Scalar>(W, prep, internal::hessian_diagonal(H), result.grid, gopt, run,
                              result.weight);
  check_finite_result(result.weight, "weights");
  result.pruned = internal::pruned_mask<Scalar>(W, prep.dead);
  // Measured with H, not taken from the sweep's step losses (which add up to the same in exact
  // arithmetic): quantize_select and the C API report these very numbers for the same weights,
  // and refinement's "never worse" is checked against them bit for bit.
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
  internal::fill_codes(result);
  result.row_losses_unrefined = result.row_losses;
  result.row_method.setConstant(
      W.rows(), static_cast<std::uint8_t>(gopt.act_order ? QuantMethod::Gptq
                                                         : QuantMethod::GptqNatural));
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

#define OBC_INSTANTIATE(S)                                                                         \
  template QuantResult<S> quantize_gptq<S>(const Eigen::Ref<const RowMatrix<S>>&,                  \
                                           const HessianRef&, const QuantOptions&,                 \
                                           const GptqOptions&, const HessianOptions&,              \
                                           const RunOptions&);                                     \
  template void internal::gptq_into<S>(const Eigen::Ref<const RowMatrix<S>>&,                      \
                                       const PreparedHessian&, const Eigen::VectorXd&,             \
                                       const QuantGrid<S>&, const GptqOptions&,                    \
                                       const RunOptions&, RowMatrix<S>&, Eigen::VectorXd*);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc
