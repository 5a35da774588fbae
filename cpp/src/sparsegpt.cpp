// SparseGPT: options, Hessian preparation, results; the sweep is in kernels/sparsegpt_sweep.cpp.
#include "obc/sparsegpt.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "internal/prune_result.hpp"
#include "internal/quant_entry.hpp"
#include "internal/sparsegpt_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

static_assert(static_cast<int>(SparsePattern::Unstructured) == 0 &&
                  static_cast<int>(SparsePattern::Blocked) == 1 &&
                  static_cast<int>(SparsePattern::NM) == 2,
              "SparseGptJob::pattern uses these values");

namespace {

// Weights per selection unit: 1 (unstructured), the block, or the N:M group.
Index check_options(const SparseGptOptions& opt, Index cols) {
  OBC_CHECK(opt.lazy_block >= 1, "lazy_block: expected a column count >= 1, got ",
            opt.lazy_block);
  switch (opt.pattern) {
    case SparsePattern::Unstructured:
      (void)count_for_sparsity(opt.sparsity, 1);  // validates the fraction
      return 1;
    case SparsePattern::Blocked:
      (void)count_for_sparsity(opt.sparsity, 1);
      OBC_CHECK(opt.block >= 1 && cols % opt.block == 0,
                "block: expected a positive divisor of cols (", cols, "), got ", opt.block);
      return opt.block;
    case SparsePattern::NM:
      OBC_CHECK(opt.m >= 2 && opt.n >= 1 && opt.n < opt.m, "n, m: expected 0 < n < m, got n = ",
                opt.n, ", m = ", opt.m);
      OBC_CHECK(cols % opt.m == 0, "m: expected a divisor of cols (", cols,
                ") so that every input belongs to a group of m, got m = ", opt.m);
      return opt.m;
  }
  throw InvalidArgument("pattern: unknown SparsePattern value");
}

// Columns per lazy block: a multiple of the unit, at least one unit, at most the layer. A wider
// request means the same single block, but sized the rows x lazy_block error buffer by the
// request (lazy_block = 1e9 asked for gigabytes for a 16-column layer).
Index lazy_columns(Index lazy_block, Index unit, Index cols) {
  const Index width = std::min(lazy_block, cols);  // cols is a multiple of unit
  return std::max(unit, width - width % unit);
}

// Runs the sweep; returns the weights and the mask, and the damping used through `prep`.
template <class Scalar>
std::pair<RowMatrix<Scalar>, MaskMatrix> run_sweep(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                                   const HessianRef& H,
                                                   const SparseGptOptions& options,
                                                   const QuantGrid<Scalar>* grid,
                                                   const HessianOptions& hopt,
                                                   const RunOptions& run, PreparedHessian& prep) {
  const Index unit = check_options(options, W.cols());
  (void)resolve_num_threads(run.num_threads);  // validates the count before the O(cols^3) work
  HessianOptions prepare = hopt;
  prepare.invert = true;
  prep = prepare_hessian(H, prepare, run.num_threads, run.interrupt);
  internal::check_layer_inputs<Scalar>(W, prep.cols());
  internal::check_layer_scale<Scalar>(W, prep);  // the sweep runs in W's precision
  RowMatrix<Scalar> weight = W;
  MaskMatrix pruned(W.rows(), W.cols());
  for (Index r = 0; r < W.rows(); ++r)
    for (Index c = 0; c < W.cols(); ++c)
      pruned(r, c) = (W(r, c) == Scalar(0) || prep.dead[static_cast<size_t>(c)]) ? 1 : 0;
  internal::SparseGptJob<Scalar> job{weight.data(), pruned.data(), prep.hinv.data(),
                                     W.rows(), W.cols(), static_cast<int>(options.pattern),
                                     options.spread == Spread::Uniform, options.sparsity, unit,
                                     options.n, options.m,
                                     lazy_columns(options.lazy_block, unit, W.cols())};
  if (grid != nullptr) {
    job.scale = grid->scale.data();
    job.zero = grid->zero.data();
    job.group_size = grid->group_size;
    job.bits = grid->bits;
  }
  bool factored;
  if constexpr (std::is_same_v<Scalar, float>)
    factored = internal::sparsegpt_kernels().sweep_f32(job, run);
  else
    factored = internal::sparsegpt_kernels().sweep_f64(job, run);
  prep.hinv = Eigen::MatrixXd();  // it held the factor; free it before the row losses
  if (!factored)
    throw NotPositiveDefinite(detail::concat(
        "H^-1 has no Cholesky factor in float64 (H is numerically singular after damping with ",
        "damp = ", prep.damp, ", lambda = ", prep.damp_absolute,
        "). Increase damp (e.g. 0.01 or 0.1) or collect more calibration samples."));
  return {std::move(weight), std::move(pruned)};
}

}  // namespace

namespace internal {

// The sweep compiled for the ISA the row kernels use (so OBC_SIMD=generic applies here too).
const SparseGptKernels& sparsegpt_kernels() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (std::strcmp(kernels().isa, "generic") != 0) return sparsegpt_kernels_avx2();
#endif
  return sparsegpt_kernels_generic();
}

}  // namespace internal

template <class Scalar>
PruneResult<Scalar> prune_sparsegpt(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                    const HessianRef& H, const SparseGptOptions& options,
                                    const HessianOptions& hopt, const RunOptions& run) {
  PreparedHessian prep;
  auto [weight, pruned] = run_sweep<Scalar>(W, H, options, nullptr, hopt, run, prep);
  return internal::finish_result<Scalar>(W, H, prep, std::move(weight), std::move(pruned), run);
}

template <class Scalar>
QuantResult<Scalar> quantize_sparsegpt(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const HessianRef& H, const SparseGptOptions& options,
                                       const QuantOptions& quant, const HessianOptions& hopt,
                                       const RunOptions& run) {
  QuantResult<Scalar> result;
  result.grid = make_grid<Scalar>(W, quant, run.num_threads, run.interrupt);  // validates the options first
  PreparedHessian prep;
  auto [weight, pruned] = run_sweep<Scalar>(W, H, options, &result.grid, hopt, run, prep);
  result.weight = std::move(weight);
  result.pruned = std::move(pruned);
  check_finite_result(result.weight, "weights");
  Eigen::VectorXd losses = row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
  // The joint sweep quantizes the kept weights in natural column order: GPTQ's natural order.
  internal::finish_one_method(result, std::move(losses), QuantMethod::GptqNatural, prep,
                              run.num_threads);
  return result;
}

#define OBC_INSTANTIATE(S)                                                                         \
  template PruneResult<S> prune_sparsegpt<S>(const Eigen::Ref<const RowMatrix<S>>&,                \
                                             const HessianRef&, const SparseGptOptions&,           \
                                             const HessianOptions&, const RunOptions&);            \
  template QuantResult<S> quantize_sparsegpt<S>(const Eigen::Ref<const RowMatrix<S>>&,             \
                                                const HessianRef&, const SparseGptOptions&,        \
                                                const QuantOptions&, const HessianOptions&,        \
                                                const RunOptions&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc
