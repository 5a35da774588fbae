// ExactOBS pruning: traces (unstructured and blocked), N:M, spreading and closed-form re-solve.
#include "obc/prune.hpp"

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "internal/prepared_view.hpp"
#include "internal/prune_result.hpp"
#include "internal/row_state.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

using internal::RowState;
using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

namespace {

void check_sparsity(double sparsity) {
  OBC_CHECK(std::isfinite(sparsity) && sparsity >= 0 && sparsity <= 1,
            "sparsity: expected a value in [0, 1], got ", sparsity);
}

// The row kernels over a layer. record_steps / recorded (optional, same length): weights kept
// when every row has taken record_steps[k] steps (see TraceJob).
template <class Scalar>
void run_rows(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& prep,
              Index block, const IndexVector* max_steps, const RunOptions& run, Trace* trace,
              RowMatrix<Scalar>* weights, const std::vector<Index>* record_steps = nullptr,
              std::vector<RowMatrix<Scalar>>* recorded = nullptr) {
  OBC_CHECK((std::is_same_v<Scalar, float> || prep.hinv.size() > 0), "W: float64 rows need the ",
            "float64 inverse, but the prepared Hessian was reduced by keep_float32_only()");
  const Index rows = W.rows(), cols = W.cols();
  const Index num_blocks = cols / block;
  IndexMatrix order_scratch;
  RowMatrixXd loss_scratch;
  IndexMatrix& order = trace ? trace->order : order_scratch;
  RowMatrixXd& losses = trace ? trace->step_losses : loss_scratch;
  order.resize(rows, num_blocks);
  losses.resize(rows, num_blocks);
  RowMatrix<Scalar> out_scratch;
  RowMatrix<Scalar>& out = weights ? *weights : out_scratch;
  out.resize(rows, cols);
  std::vector<Index> limits;
  if (max_steps) limits.assign(max_steps->data(), max_steps->data() + rows);
  internal::TraceJob<Scalar> job{W.data(), rows, internal::view_of(prep), block,
                                 max_steps ? limits.data() : nullptr, order.data(),
                                 losses.data(), out.data()};
  std::vector<Scalar*> record_out;
  if (record_steps && !record_steps->empty()) {
    recorded->resize(record_steps->size());
    for (RowMatrix<Scalar>& layer : *recorded) {
      layer.setZero(rows, cols);  // every row writes every layer; zeros only guard the contract
      record_out.push_back(layer.data());
    }
    job.record_steps = record_steps->data();
    job.num_records = static_cast<Index>(record_steps->size());
    job.record_out = record_out.data();
  }
  internal::row_kernels<Scalar>().trace(job, run);
  if (trace) trace->block = block;
  for (Index i = 0; i < order.size(); ++i)
    if (order.data()[i] >= 0 && !std::isfinite(losses.data()[i]))
      throw Overflow("step losses: the greedy produced NaN or Inf (values too large for the "
                     "precision, or H too ill-conditioned for it); rescale W or H, increase damp, "
                     "or pass float64 inputs");
  check_finite_result(out, "weights");
}

template <class Scalar>
MaskMatrix zero_mask(const RowMatrix<Scalar>& weight, const PreparedHessian& prep) {
  MaskMatrix pruned(weight.rows(), weight.cols());
  for (Index r = 0; r < weight.rows(); ++r)
    for (Index c = 0; c < weight.cols(); ++c)
      pruned(r, c) = (weight(r, c) == Scalar(0) || prep.dead[static_cast<size_t>(c)]) ? 1 : 0;
  return pruned;
}

// Runs solve(W) in W's precision; when a float32 elimination loses positive definiteness
// (PrecisionLost), redoes the whole layer in float64 and rounds the weights back to float32.
// The damping is never changed: only the precision. solve takes an Eigen::Ref of either type.
template <class Scalar, class Solve>
PruneResult<Scalar> with_float64_fallback(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                          const HessianRef& H, const RunOptions& run,
                                          Solve&& solve) {
  if constexpr (std::is_same_v<Scalar, double>) {
    return solve(W);
  } else {
    try {
      return solve(W);
    } catch (const PrecisionLost&) {
    }
    const RowMatrix<double> w64 = W.template cast<double>();
    PruneResult<double> r64 = solve(Eigen::Ref<const RowMatrix<double>>(w64));
    PruneResult<float> result;
    result.weight = r64.weight.template cast<float>();
    result.pruned = std::move(r64.pruned);
    result.row_losses = row_losses<float>(W, result.weight, H, run.num_threads, run.interrupt);
    result.damp = r64.damp;
    result.damp_absolute = r64.damp_absolute;
    result.float64_fallback = true;
    return result;
  }
}

}  // namespace

Index count_for_sparsity(double sparsity, Index steps) {
  check_sparsity(sparsity);
  // The small slack makes 0.3 * 10 count as 3, not 4, despite binary rounding.
  const double exact = sparsity * static_cast<double>(steps);
  Index count = static_cast<Index>(std::ceil(exact - 1e-9 * std::max(1.0, exact)));
  return std::clamp<Index>(count, 0, steps);
}

template <class Scalar>
Trace trace_rows(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& hessian,
                 Index block, const RunOptions& run) {
  std::vector<RowMatrix<Scalar>> none;
  return trace_rows<Scalar>(W, hessian, block, {}, none, run);
}

template <class Scalar>
Trace trace_rows(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& hessian,
                 Index block, const std::vector<Index>& record_steps,
                 std::vector<RowMatrix<Scalar>>& recorded, const RunOptions& run) {
  internal::check_layer_inputs<Scalar>(W, hessian.cols());
  OBC_CHECK(block >= 1 && W.cols() % block == 0, "block: expected a positive divisor of cols (",
            W.cols(), "), got ", block);
  for (Index steps : record_steps)
    OBC_CHECK(steps >= 0 && steps <= W.cols() / block, "record_steps: expected counts in [0, ",
              W.cols() / block, "], got ", steps);
  internal::check_layer_scale<Scalar>(W, hessian);
  resolve_num_threads(run.num_threads);  // throws for a count outside [0, kMaxThreads]
  Trace trace;
  run_rows<Scalar>(W, hessian, block, nullptr, run, &trace, nullptr, &record_steps, &recorded);
  for (const RowMatrix<Scalar>& layer : recorded) check_finite_result(layer, "recorded weights");
  return trace;
}

IndexVector steps_per_row(const Trace& trace, double sparsity, Spread spread) {
  const Index rows = trace.order.rows(), steps = trace.order.cols();
  IndexVector counts(rows);
  if (spread == Spread::Uniform) {
    counts.setConstant(count_for_sparsity(sparsity, steps));
    return counts;
  }
  const Index total = count_for_sparsity(sparsity, rows * steps);
  counts.setZero();
  if (total == 0) return counts;
  // The `total` smallest step losses of the layer, ties broken by (row, step).
  std::vector<Index> ids(static_cast<size_t>(rows * steps));
  std::iota(ids.begin(), ids.end(), Index(0));
  const double* loss = trace.step_losses.data();
  auto less = [loss](Index a, Index b) {
    return loss[a] < loss[b] || (loss[a] == loss[b] && a < b);
  };
  std::nth_element(ids.begin(), ids.begin() + (total - 1), ids.end(), less);
  for (Index i = 0; i < total; ++i) ++counts[ids[static_cast<size_t>(i)] / steps];
  return counts;
}

MaskMatrix mask_from_trace(const Trace& trace, Index cols,
                           const Eigen::Ref<const IndexVector>& counts) {
  const Index rows = trace.order.rows(), steps = trace.order.cols();
  OBC_CHECK(counts.size() == rows, "counts: expected ", rows, " entries, got ", counts.size());
  OBC_CHECK(steps * trace.block == cols, "cols: expected ", steps * trace.block, ", got ", cols);
  MaskMatrix pruned = MaskMatrix::Zero(rows, cols);
  for (Index r = 0; r < rows; ++r) {
    OBC_CHECK(counts[r] >= 0 && counts[r] <= steps, "counts[", r, "]: expected 0..", steps,
              ", got ", counts[r]);
    for (Index s = 0; s < counts[r]; ++s) {
      const Index b = trace.order(r, s);
      OBC_CHECK(b >= 0 && b < steps, "trace: row ", r, " step ", s, " is not recorded");
      for (Index c = b * trace.block; c < (b + 1) * trace.block; ++c) pruned(r, c) = 1;
    }
  }
  return pruned;
}

template <class Scalar>
PruneResult<Scalar> solve_masked(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const HessianRef& H,
                                 const PreparedHessian& prep, const MaskMatrix& pruned_in,
                                 const RunOptions& run) {
  internal::check_layer_inputs<Scalar>(W, prep.cols());
  OBC_CHECK(H.rows() == prep.cols() && H.cols() == prep.cols(), "H: expected ", prep.cols(), "x",
            prep.cols(), ", got ", H.rows(), "x", H.cols());
  OBC_CHECK(pruned_in.rows() == W.rows() && pruned_in.cols() == W.cols(), "mask: expected ",
            W.rows(), "x", W.cols(), ", got ", pruned_in.rows(), "x", pruned_in.cols());
  internal::check_layer_scale<Scalar>(W, prep);
  resolve_num_threads(run.num_threads);  // throws for a count outside [0, kMaxThreads]
  const Index rows = W.rows(), cols = W.cols();
  MaskMatrix pruned = pruned_in;
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      if (W(r, c) == Scalar(0) || prep.dead[static_cast<size_t>(c)]) pruned(r, c) = 1;
  for (Index r = 0; r < rows && prep.hinv.size() == 0; ++r)
    OBC_CHECK(2 * pruned.row(r).template cast<Index>().sum() >= cols,
              "solve_masked: row ", r, " keeps more weights than it prunes, which needs the ",
              "float64 inverse, but the prepared Hessian has none");
  RowMatrix<Scalar> weight(rows, cols);
  const internal::MaskedSolveJob<Scalar> job{W.data(), rows, cols, pruned.data(),
                                             prep.hinv.size() > 0 ? prep.hinv.data() : nullptr,
                                             prep.dead.data(), internal::input_of(H),
                                             prep.damp_absolute, weight.data()};
  internal::row_kernels<Scalar>().solve_masked(job, run);
  return internal::finish_result<Scalar>(W, H, prep, std::move(weight), std::move(pruned), run);
}

template <class Scalar>
PruneResult<Scalar> solve_masked(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const HessianRef& H, const MaskMatrix& pruned,
                                 const HessianOptions& hopt, const RunOptions& run) {
  OBC_CHECK(pruned.rows() == W.rows() && pruned.cols() == W.cols(), "mask: expected ", W.rows(),
            "x", W.cols(), ", got ", pruned.rows(), "x", pruned.cols());
  // Rows pruning at least half solve with H_FF (no inverse needed); count the others, with the
  // zeros that solve_masked adds (existing zeros; dead inputs only add more, never fewer).
  bool needs_inverse = false;
  for (Index r = 0; r < W.rows() && !needs_inverse; ++r) {
    Index np = 0;
    for (Index c = 0; c < W.cols(); ++c) np += (pruned(r, c) || W(r, c) == Scalar(0)) ? 1 : 0;
    needs_inverse = 2 * np < W.cols();
  }
  HessianOptions options = hopt;
  options.invert = needs_inverse;
  const PreparedHessian prep = prepare_hessian(H, options, run.num_threads, run.interrupt);
  return solve_masked<Scalar>(W, H, prep, pruned, run);
}

template <class Scalar>
static PruneResult<Scalar> prune_traced(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                        const HessianRef& H,
                                        double sparsity, Index block, Spread spread,
                                        const HessianOptions& hopt, const RunOptions& run) {
  check_sparsity(sparsity);
  PreparedHessian prep = prepare_hessian(H, hopt, run.num_threads, run.interrupt);
  internal::check_layer_inputs<Scalar>(W, prep.cols());
  OBC_CHECK(block >= 1 && W.cols() % block == 0, "block: expected a positive divisor of cols (",
            W.cols(), "), got ", block);
  internal::check_layer_scale<Scalar>(W, prep);
  const Index num_blocks = W.cols() / block;
  if (spread == Spread::Uniform) {
    // Every row stops at the same count: the greedy's own weights are optimal for its mask.
    if constexpr (std::is_same_v<Scalar, float>) prep.keep_float32_only();
    IndexVector counts = IndexVector::Constant(W.rows(), count_for_sparsity(sparsity, num_blocks));
    RowMatrix<Scalar> weight;
    Trace partial;
    run_rows<Scalar>(W, prep, block, &counts, run, &partial, &weight);
    MaskMatrix pruned = mask_from_trace(partial, W.cols(), counts);
    for (Index r = 0; r < W.rows(); ++r)
      for (Index c = 0; c < W.cols(); ++c)
        if (prep.dead[static_cast<size_t>(c)] || W(r, c) == Scalar(0)) pruned(r, c) = 1;
    return internal::finish_result<Scalar>(W, H, prep, std::move(weight), std::move(pruned), run);
  }
  Trace trace;
  run_rows<Scalar>(W, prep, block, nullptr, run, &trace, nullptr);
  const IndexVector counts = steps_per_row(trace, sparsity, Spread::Global);
  return solve_masked<Scalar>(W, H, prep, mask_from_trace(trace, W.cols(), counts), run);
}

template <class Scalar>
PruneResult<Scalar> prune_unstructured(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const HessianRef& H, double sparsity,
                                       Spread spread, const HessianOptions& hopt,
                                       const RunOptions& run) {
  return with_float64_fallback<Scalar>(W, H, run, [&](const auto& w) {
    using S = typename std::decay_t<decltype(w)>::Scalar;
    return prune_traced<S>(w, H, sparsity, 1, spread, hopt, run);
  });
}

template <class Scalar>
PruneResult<Scalar> prune_blocked(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H, double sparsity,
                                  Index block, Spread spread, const HessianOptions& hopt,
                                  const RunOptions& run) {
  return with_float64_fallback<Scalar>(W, H, run, [&](const auto& w) {
    using S = typename std::decay_t<decltype(w)>::Scalar;
    return prune_traced<S>(w, H, sparsity, block, spread, hopt, run);
  });
}

template <class Scalar>
static PruneResult<Scalar> prune_nm_in(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const HessianRef& H, Index n, Index m,
                                       const HessianOptions& hopt, const RunOptions& run) {
  OBC_CHECK(m >= 2 && n >= 1 && n < m, "n, m: expected 0 < n < m, got n = ", n, ", m = ", m);
  OBC_CHECK(W.cols() % m == 0, "m: expected a divisor of cols (", W.cols(), ") so that every ",
            "input belongs to a group of m, got m = ", m);
  PreparedHessian prep = prepare_hessian(H, hopt, run.num_threads, run.interrupt);
  internal::check_layer_inputs<Scalar>(W, prep.cols());
  internal::check_layer_scale<Scalar>(W, prep);
  if constexpr (std::is_same_v<Scalar, float>) prep.keep_float32_only();
  const Index rows = W.rows(), cols = W.cols();
  RowMatrix<Scalar> weight(rows, cols);
  const internal::NmJob<Scalar> job{W.data(), rows, internal::view_of(prep), n, m, weight.data()};
  internal::row_kernels<Scalar>().nm(job, run);
  MaskMatrix pruned = zero_mask(weight, prep);
  return internal::finish_result<Scalar>(W, H, prep, std::move(weight), std::move(pruned), run);
}

template <class Scalar>
PruneResult<Scalar> prune_nm(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                             const HessianRef& H, Index n, Index m,
                             const HessianOptions& hopt, const RunOptions& run) {
  return with_float64_fallback<Scalar>(W, H, run, [&](const auto& w) {
    using S = typename std::decay_t<decltype(w)>::Scalar;
    return prune_nm_in<S>(w, H, n, m, hopt, run);
  });
}

#define OBC_INSTANTIATE(S)                                                                         \
  template Trace trace_rows<S>(const Eigen::Ref<const RowMatrix<S>>&, const PreparedHessian&,      \
                               Index, const RunOptions&);                                          \
  template Trace trace_rows<S>(const Eigen::Ref<const RowMatrix<S>>&, const PreparedHessian&,      \
                               Index, const std::vector<Index>&, std::vector<RowMatrix<S>>&,       \
                               const RunOptions&);                                                 \
  template PruneResult<S> solve_masked<S>(const Eigen::Ref<const RowMatrix<S>>&,                   \
                                          const HessianRef&,                                       \
                                          const PreparedHessian&, const MaskMatrix&,               \
                                          const RunOptions&);                                      \
  template PruneResult<S> solve_masked<S>(const Eigen::Ref<const RowMatrix<S>>&,                   \
                                          const HessianRef&, const MaskMatrix&,                    \
                                          const HessianOptions&, const RunOptions&);               \
  template PruneResult<S> prune_unstructured<S>(const Eigen::Ref<const RowMatrix<S>>&,             \
                                                const HessianRef&, double,                         \
                                                Spread, const HessianOptions&,                     \
                                                const RunOptions&);                                \
  template PruneResult<S> prune_blocked<S>(const Eigen::Ref<const RowMatrix<S>>&,                  \
                                           const HessianRef&, double,                              \
                                           Index, Spread, const HessianOptions&,                   \
                                           const RunOptions&);                                     \
  template PruneResult<S> prune_nm<S>(const Eigen::Ref<const RowMatrix<S>>&,                       \
                                      const HessianRef&, Index, Index,                             \
                                      const HessianOptions&, const RunOptions&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc
