// Refinement of quantized rows: exact coordinate descent over the integer codes.
#include "obc/quant_refine.hpp"

#include <Eigen/Cholesky>
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "internal/refine_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace {

// Rows refined together (their passes run block by block as one batch): refine_items' chunk.
constexpr Index kRowChunk = internal::kRefineChunk;

using MatrixD = Eigen::MatrixXd;
using RowMatrixD = RowMatrix<double>;

}  // namespace

namespace {

// One block of columns for the block moves of the refinement: the inverse of its (damped)
// Hessian block and that inverse's upper Cholesky factor (GPTQ inside the block).
struct RefineBlock {
  Index begin = 0, len = 0;
  bool usable = false;
  MatrixD inverse;  // (H_BB + lambda I)^-1
  RowMatrixD upper;  // inverse = upper^T upper (row-major: GPTQ reads its rows)
};

std::vector<RefineBlock> refine_blocks(const MatrixD& hd, Index block_size, double proposal_damp) {
  std::vector<RefineBlock> blocks;
  if (block_size <= 1) return blocks;
  const Index cols = hd.rows();
  for (Index b0 = 0; b0 < cols; b0 += block_size) {
    RefineBlock blk;
    blk.begin = b0;
    blk.len = std::min(block_size, cols - b0);
    MatrixD h = hd.block(b0, b0, blk.len, blk.len);
    h.diagonal().array() += proposal_damp;
    Eigen::LLT<MatrixD> llt(h);
    if (llt.info() == Eigen::Success) {
      blk.inverse = llt.solve(MatrixD::Identity(blk.len, blk.len));
      blk.inverse = 0.5 * (blk.inverse + blk.inverse.transpose()).eval();
      Eigen::LLT<MatrixD, Eigen::Upper> factor(blk.inverse);
      if (factor.info() == Eigen::Success &&
          (factor.matrixLLT().diagonal().array() > 0.0).all()) {
        blk.upper = factor.matrixU();
        blk.usable = true;
      }
    }
    blocks.push_back(std::move(blk));
  }
  return blocks;
}

// Columns per block of the single-code sweep: a block's moves update g on its own columns at
// once and on the others at the block's end, in one product for all rows of the chunk.
constexpr Index kSweepBlock = 128;
// Columns per lazy update of the GPTQ inside a block move's proposal.
constexpr Index kGptqSub = 16;
static_assert(kGptqSub <= internal::kMaxProposeSub, "propose_codes runs sub-blocks of at most 16");

// Below this fraction of non-zero changes among the changed rows and columns of a block, the
// deferred gradient update is made by column additions (work: the non-zeros) rather than by one
// GEMM (work: all of them, but several times faster per element).
constexpr double kDenseFraction = 0.25;

// c = a b^T, b (c.cols() x a.cols()) column-major at b with column stride ldb: the dispatched
// GEMM (AVX2 / AVX-512 where the CPU has them).
void product(const double* a, Index m, Index k, const double* b, Index ldb, double* c, Index n) {
  internal::refine_kernels().product(a, k, b, ldb, m, n, k, c, n);
}
void product(const RowMatrixD& a, const double* b, Index ldb, RowMatrixD& c) {
  product(a.data(), a.rows(), a.cols(), b, ldb, c.data(), c.cols());
}

// The per-code kernels of the weights' precision.
void propose_codes(const internal::RefineKernels& k, const internal::ProposeRows<float>& job) {
  k.propose_codes_f32(job);
}
void propose_codes(const internal::RefineKernels& k, const internal::ProposeRows<double>& job) {
  k.propose_codes_f64(job);
}
Index sweep_codes(const internal::RefineKernels& k, const internal::SweepRow<float>& job) {
  return k.sweep_codes_f32(job);
}
Index sweep_codes(const internal::RefineKernels& k, const internal::SweepRow<double>& job) {
  return k.sweep_codes_f64(job);
}

// Code changes of one block of columns, for the rows of a chunk, not yet added to the chunk's
// gradients g (len x cols): flush() adds D hd[B, :] for the rows and columns that changed, one
// (changed rows x changed columns) by (changed columns x cols) product. hd symmetric.
class LazyGradient {
 public:
  // Workspaces at their largest (len rows, blocks of at most max_block columns) from the start:
  // sizes that change per block would reallocate (and, above malloc's mmap threshold, have the
  // kernel clear fresh pages) at every block.
  LazyGradient(Index len, Index cols, Index max_block)
      : delta_(len, max_block),
        packed_(static_cast<size_t>(len * max_block)),
        update_(static_cast<size_t>(len * cols)),
        columns_(static_cast<size_t>(cols * max_block)),
        cols_(cols) {}

  void begin_block(Index b0, Index nb) {
    b0_ = b0;
    nb_ = nb;
    assert(nb <= delta_.cols());
    rows_.clear();
  }
  // Row i's block change d (nb), its first record in this block.
  template <class Row>
  void record(Index i, const Row& d) {
    delta_.row(i).head(nb_) = d.transpose();
    rows_.push_back(i);
  }
  // Row i's change at the block's column k; rows may record several.
  void record_one(Index i, Index k, double delta) {
    if (rows_.empty() || rows_.back() != i) {
      delta_.row(i).head(nb_).setZero();
      rows_.push_back(i);
    }
    delta_(i, k) += delta;
  }
  // g[rows, :] += D hd[B, :] (skip_block: all columns but the block's own, which the caller
  // kept exact).
  void flush(RowMatrixD& g, const MatrixD& hd, bool skip_block) {
    if (rows_.empty()) return;
    const Index nr = static_cast<Index>(rows_.size());
    used_.clear();
    Index nnz = 0;
    for (Index k = 0; k < nb_; ++k) {
      Index in_column = 0;
      for (const Index i : rows_) in_column += delta_(i, k) != 0.0;
      if (in_column > 0) used_.push_back(k);
      nnz += in_column;
    }
    const Index nk = static_cast<Index>(used_.size());
    if (nk == 0) return;
    const internal::RefineKernels& kern = internal::refine_kernels();
    const Index tail = cols_ - b0_ - nb_;
    if (static_cast<double>(nnz) < kDenseFraction * static_cast<double>(nr * nk)) {
      // Few changes: each row adds its own changed columns of hd (in cache: the block's).
      for (const Index i : rows_) {
        index_.clear();
        values_.clear();
        for (Index k = 0; k < nb_; ++k)
          if (delta_(i, k) != 0.0) {
            index_.push_back(b0_ + k);
            values_.push_back(delta_(i, k));
          }
        const Index count = static_cast<Index>(index_.size());
        double* g_row = g.row(i).data();
        if (skip_block) {
          kern.add_columns(g_row, b0_, hd.data(), cols_, index_.data(), values_.data(), count);
          kern.add_columns(g_row + b0_ + nb_, tail, hd.data() + b0_ + nb_, cols_, index_.data(),
                           values_.data(), count);
        } else {
          kern.add_columns(g_row, cols_, hd.data(), cols_, index_.data(), values_.data(), count);
        }
      }
      return;
    }
    Eigen::Map<RowMatrixD> packed(packed_.data(), nr, nk), update(update_.data(), nr, cols_);
    for (Index j = 0; j < nr; ++j)
      for (Index u = 0; u < nk; ++u)
        packed(j, u) = delta_(rows_[static_cast<size_t>(j)], used_[static_cast<size_t>(u)]);
    const double* columns = hd.data() + b0_ * cols_;
    if (nk < nb_) {  // the changed columns of hd's block, gathered
      for (Index u = 0; u < nk; ++u)
        std::copy_n(hd.col(b0_ + used_[static_cast<size_t>(u)]).data(), cols_,
                    columns_.data() + u * cols_);
      columns = columns_.data();
    }
    product(packed_.data(), nr, nk, columns, cols_, update_.data(), cols_);
    for (Index j = 0; j < nr; ++j) {
      auto g_row = g.row(rows_[static_cast<size_t>(j)]);
      if (skip_block) {
        g_row.head(b0_) += update.row(j).head(b0_);
        g_row.tail(tail) += update.row(j).tail(tail);
      } else {
        g_row += update.row(j);
      }
    }
  }

 private:
  RowMatrixD delta_;      // len x (at least nb): the block's changes, rows in rows_ valid
  std::vector<Index> rows_, used_, index_;
  std::vector<double> values_;
  std::vector<double> packed_, update_, columns_;  // see flush()
  Index cols_, b0_ = 0, nb_ = 0;
};

}  // namespace

namespace internal {

const RefineKernels& refine_kernels() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (use_avx512_kernels()) return refine_kernels_avx512();
  if (std::strcmp(kernels().isa, "generic") != 0) return refine_kernels_avx2();
#endif
  return refine_kernels_generic();
}

std::vector<Index> refine_items(Index chunks, Index row_bytes, int num_threads) {
  // Up to 4 chunks per item (256 rows: Eigen's packing of hd is then a small part of the
  // product), within 64 MiB of item memory.
  constexpr Index kMaxChunksPerItem = 4;
  constexpr Index kMaxItemBytes = Index(64) << 20;
  const Index threads = resolve_num_threads(num_threads);
  const Index singles = std::min(chunks, 2 * threads);
  const Index grouped = chunks - singles;
  const Index by_memory = kMaxItemBytes / (kRefineChunk * std::max<Index>(row_bytes, 1));
  const Index per_item =
      std::max<Index>(1, std::min({kMaxChunksPerItem, grouped / (2 * threads), by_memory}));
  std::vector<Index> starts;
  for (Index c = 0; c < grouped; c += per_item) starts.push_back(c);
  for (Index c = grouped; c < chunks; ++c) starts.push_back(c);
  starts.push_back(chunks);
  return starts;
}

void check_refine_options(const RefineOptions& opt) {
  OBC_CHECK(opt.max_passes >= 0, "refine_passes: expected >= 0, got ", opt.max_passes);
  OBC_CHECK(std::isfinite(opt.rel_tol) && opt.rel_tol >= 0, "refine_tol: expected >= 0, got ",
            opt.rel_tol);
  OBC_CHECK(opt.block_size >= 0, "refine_block_size: expected >= 0, got ", opt.block_size);
}

Eigen::MatrixXd refine_hessian(const HessianRef& H, const PreparedHessian& prep, bool damped) {
  const Index cols = prep.cols();
  MatrixD hd = H.visit([](const auto& h) -> MatrixD {
    return 0.5 * (h.template cast<double>() + h.transpose().template cast<double>());
  });
  for (Index c = 0; c < cols; ++c)
    if (prep.dead[static_cast<size_t>(c)])
      hd(c, c) = 1.0;
    else if (damped)
      hd(c, c) += prep.damp_absolute;
  return hd;
}

template <class Scalar>
int refine_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const Eigen::MatrixXd& hd,
                double damp_absolute, const QuantGrid<Scalar>& grid, const MaskMatrix& pruned,
                const RefineOptions& ropt, const RunOptions& run, RowMatrix<Scalar>& weight) {
  const Index rows = W.rows(), cols = W.cols();
  if (ropt.max_passes == 0) return 0;
  const int maxq = (1 << grid.bits) - 1;
  // Block proposals solve with hd's diagonal blocks. With the undamped objective they add a tenth
  // of the layer's damping, enough for blocks of a rank-deficient H, small enough that the
  // proposal is close to the objective's own block optimum (on a 384 x 1536 layer with outlier
  // features, the full damping made the block moves gain 6% over GPTQ, a tenth of it 12%, none
  // 12%). Blocks that are singular even so are skipped. Proposals are only kept where the exact
  // objective drops, so this choice never makes the result worse than the single-code moves'.
  const double proposal_damp = ropt.damped ? 0.0 : 0.1 * damp_absolute;
  const std::vector<RefineBlock> blocks = refine_blocks(hd, ropt.block_size, proposal_damp);
  const Eigen::VectorXd hdiag = hd.diagonal();  // read per code by the sweep: contiguous
  const internal::RefineKernels& kern = internal::refine_kernels();
  const Index chunks = (rows + kRowChunk - 1) / kRowChunk;
  std::vector<int> passes_of_chunk(static_cast<size_t>(chunks), 0);
  // Items of several chunks: their initial gradients are one product (refine_items).
  const std::vector<Index> item_starts =
      refine_items(chunks, cols * Index(2 * sizeof(double)), run.num_threads);
  const Index items = static_cast<Index>(item_starts.size()) - 1;
  parallel_for(items, run.num_threads, run.interrupt, [&](Index item, int) {
    const Index first_chunk = item_starts[static_cast<size_t>(item)];
    const Index last_chunk = item_starts[static_cast<size_t>(item) + 1];
    const Index item_r0 = first_chunk * kRowChunk;
    const Index item_rows = std::min(rows, last_chunk * kRowChunk) - item_r0;
    // The gradients G = E hd of the residuals E = Q - W over the free (not pruned) inputs (0
    // elsewhere), one row per row of the item, and the objectives 1/2 e g^T.
    RowMatrixD item_g(item_rows, cols);
    Eigen::VectorXd item_objective(item_rows);
    {
      RowMatrixD e(item_rows, cols);
      for (Index i = 0; i < item_rows; ++i)
        for (Index c = 0; c < cols; ++c)
          e(i, c) = pruned(item_r0 + i, c) ? 0.0
                                           : static_cast<double>(weight(item_r0 + i, c)) -
                                                 static_cast<double>(W(item_r0 + i, c));
      // e hd^T = e hd: the whole chunks in one product, a last chunk of fewer rows on its own.
      const Index whole = item_rows - item_rows % kRowChunk;
      if (whole > 0) product(e.data(), whole, cols, hd.data(), cols, item_g.data(), cols);
      if (whole < item_rows)
        product(e.data() + whole * cols, item_rows - whole, cols, hd.data(), cols,
                item_g.data() + whole * cols, cols);
      for (Index i = 0; i < item_rows; ++i)
        item_objective[i] = 0.5 * e.row(i).dot(item_g.row(i));
    }
    for (Index chunk = first_chunk; chunk < last_chunk; ++chunk) {
      const Index r0 = chunk * kRowChunk, len = std::min(kRowChunk, rows - r0);
      RowMatrixD g = item_g.middleRows(r0 - item_r0, len);
      Eigen::VectorXd objective = item_objective.segment(r0 - item_r0, len), start(len);
      std::vector<char> active(static_cast<size_t>(len), 1);
      std::vector<int> passes(static_cast<size_t>(len), 0);
      std::vector<Index> live;  // rows of the chunk still running passes
      // Blocks are at most cols wide (refine_blocks clips; a huge block_size must not size these).
      LazyGradient lazy(len, cols, std::min(cols, std::max(kSweepBlock, ropt.block_size)));
      // Block moves of the live rows: proposals (continuous optima, -g_B inverse, then the GPTQ
      // state), proposed_codes / changes (their codes, d = new - old), moved (rows of them whose
      // codes change), moved_changes (their d), block_rhs (products).
      RowMatrixD proposals, changes, moved_changes, block_rhs, errors, lazy_rhs;
      std::vector<char> changed;
      RowMatrix<Scalar> proposed_codes;
      std::vector<Index> moved, live_rows;
      // The single-code sweep's accepted moves of one row and block (columns - c0, changes).
      std::vector<Index> moved_columns(static_cast<size_t>(kSweepBlock));
      std::vector<double> moved_deltas(static_cast<size_t>(kSweepBlock));

      // Block move, first half: re-quantize the block's codes of the live rows by GPTQ inside the
      // block, from the block's continuous optima x given all other codes (proposals: in,
      // overwritten). GPTQ's lazy updates: within a sub-block of kGptqSub columns the errors are
      // propagated at once, to the block's later columns once per sub-block as one product. The
      // proposed codes go to proposed_codes, their changes to changes; changed[j]: row j's codes
      // change.
      auto block_proposals = [&](const RefineBlock& blk, Index n_live) {
        const Index b0 = blk.begin, nb = blk.len;
        for (Index j = 0; j < n_live; ++j) {
          const Index r = r0 + live[static_cast<size_t>(j)];
          for (Index k = 0; k < nb; ++k) proposals(j, k) += static_cast<double>(weight(r, b0 + k));
        }
        changed.assign(static_cast<size_t>(n_live), 0);
        live_rows.resize(static_cast<size_t>(n_live));
        for (Index j = 0; j < n_live; ++j)
          live_rows[static_cast<size_t>(j)] = r0 + live[static_cast<size_t>(j)];
        errors.resize(n_live, kGptqSub);
        for (Index s0 = 0; s0 < nb; s0 += kGptqSub) {
          const Index ns = std::min(kGptqSub, nb - s0);
          const internal::ProposeRows<Scalar> job{proposals.data(),
                                                  blk.upper.data(),
                                                  nb,
                                                  b0,
                                                  s0,
                                                  ns,
                                                  n_live,
                                                  live_rows.data(),
                                                  weight.data(),
                                                  pruned.data(),
                                                  cols,
                                                  grid.scale.data(),
                                                  grid.zero.data(),
                                                  grid.scale.cols(),
                                                  grid.group_size,
                                                  maxq,
                                                  proposed_codes.data(),
                                                  changes.data(),
                                                  errors.data(),
                                                  errors.cols(),
                                                  changed.data()};
          propose_codes(kern, job);
          const Index rest = nb - s0 - ns;
          if (rest == 0) continue;
          // x[:, rest] -= errors upper[sub, rest]: b(t, u) = upper(s0 + u, s0 + ns + t), column u
          // of b a row of the row-major upper.
          lazy_rhs.resize(n_live, rest);
          internal::refine_kernels().product(errors.data(), kGptqSub,
                                             blk.upper.data() + s0 * nb + s0 + ns, nb, n_live, rest,
                                             ns, lazy_rhs.data(), rest);
          proposals.middleCols(s0 + ns, rest) -= lazy_rhs;
        }
      };

      // Single-code moves over the columns [c0, c0 + nb) of row i: the 1-D quadratic's
      // minimizer, clamped, the two codes around it compared exactly. Each accepted move updates
      // g on the block's own columns at once (all a later move of this block reads) and is
      // recorded for the other columns, which get the block's moves at its end.
      auto code_sweep = [&](Index i, Index c0, Index nb) {
        const Index r = r0 + i;
        const internal::SweepRow<Scalar> job{g.row(i).data() + c0,
                                             hd.data(),
                                             cols,
                                             hdiag.data(),
                                             c0,
                                             nb,
                                             weight.row(r).data(),
                                             pruned.row(r).data(),
                                             grid.scale.row(r).data(),
                                             grid.zero.row(r).data(),
                                             grid.group_size,
                                             maxq,
                                             &objective[i],
                                             moved_columns.data(),
                                             moved_deltas.data()};
        const Index moves = sweep_codes(kern, job);
        for (Index m = 0; m < moves; ++m)
          lazy.record_one(i, moved_columns[static_cast<size_t>(m)],
                          moved_deltas[static_cast<size_t>(m)]);
      };

      // Passes run over all live rows of the chunk together, block by block, so that the deferred
      // gradient updates of a block are one product for all rows (hd read once per chunk, not once
      // per row). Rows are independent: each row sees the same sequence of its own moves as when
      // the rows ran one after the other.
      for (int pass = 1; pass <= ropt.max_passes; ++pass) {
        live.clear();
        for (Index i = 0; i < len; ++i)
          if (active[static_cast<size_t>(i)]) live.push_back(i);
        if (live.empty()) break;
        const Index n_live = static_cast<Index>(live.size());
        for (const Index i : live) start[i] = objective[i];
        for (const RefineBlock& blk : blocks) {
          if (!blk.usable) continue;
          const Index b0 = blk.begin, nb = blk.len;
          // The block's continuous optima of all live rows as one product: -g_B (H_BB + damp)^-1.
          proposals.resize(n_live, nb);
          for (Index j = 0; j < n_live; ++j)
            proposals.row(j) = g.row(live[static_cast<size_t>(j)]).segment(b0, nb);
          block_rhs.resize(n_live, nb);
          product(proposals, blk.inverse.data(), nb, block_rhs);  // inverse symmetric
          proposals = -block_rhs;
          proposed_codes.resize(n_live, nb);
          changes.resize(n_live, nb);
          moved.clear();
          block_proposals(blk, n_live);
          for (Index j = 0; j < n_live; ++j)
            if (changed[static_cast<size_t>(j)]) moved.push_back(j);
          if (moved.empty()) continue;
          // Second half: the exact change of the objective, d g_B + 1/2 d H_BB d^T, the products
          // d H_BB of all moved rows at once; kept where it drops. g is exact on the block's
          // columns here; the kept changes reach g at the block's end (lazy).
          const Index n_moved = static_cast<Index>(moved.size());
          moved_changes.resize(n_moved, nb);
          for (Index m = 0; m < n_moved; ++m)
            moved_changes.row(m) = changes.row(moved[static_cast<size_t>(m)]);
          block_rhs.resize(n_moved, nb);
          product(moved_changes, hd.data() + b0 * cols + b0, cols, block_rhs);  // d H_BB, symmetric
          lazy.begin_block(b0, nb);
          for (Index m = 0; m < n_moved; ++m) {
            const Index j = moved[static_cast<size_t>(m)], i = live[static_cast<size_t>(j)];
            const Index r = r0 + i;
            const auto d = moved_changes.row(m);
            const double change = d.dot(g.row(i).segment(b0, nb)) + 0.5 * d.dot(block_rhs.row(m));
            if (!(change < 0.0)) continue;
            for (Index k = 0; k < nb; ++k)
              if (d[k] != 0.0) weight(r, b0 + k) = proposed_codes(j, k);
            lazy.record(i, d);
            objective[i] += change;
          }
          lazy.flush(g, hd, /*skip_block=*/false);
        }
        for (Index c0 = 0; c0 < cols; c0 += kSweepBlock) {
          const Index nb = std::min(kSweepBlock, cols - c0);
          lazy.begin_block(c0, nb);
          for (const Index i : live) code_sweep(i, c0, nb);
          lazy.flush(g, hd, /*skip_block=*/true);
        }
        for (const Index i : live) {
          passes[static_cast<size_t>(i)] = pass;
          if (!(start[i] - objective[i] > ropt.rel_tol * start[i]))
            active[static_cast<size_t>(i)] = 0;
        }
      }
      passes_of_chunk[static_cast<size_t>(chunk)] =
          *std::max_element(passes.begin(), passes.end());
    }
  });
  return *std::max_element(passes_of_chunk.begin(), passes_of_chunk.end());
}

}  // namespace internal

template <class Scalar>
void refine_quantized(const Eigen::Ref<const RowMatrix<Scalar>>& W, const HessianRef& H,
                      QuantResult<Scalar>& result, const RefineOptions& ropt,
                      const HessianOptions& hopt, const RunOptions& run) {
  internal::check_refine_options(ropt);
  HessianOptions no_inverse = hopt;
  no_inverse.invert = false;
  const PreparedHessian prep = prepare_hessian(H, no_inverse, run.num_threads, run.interrupt);
  internal::check_layer_inputs<Scalar>(W, prep.cols());
  internal::check_layer_scale<Scalar>(W, prep);
  const Index rows = W.rows(), cols = W.cols();
  const QuantGrid<Scalar>& grid = result.grid;
  OBC_CHECK(result.weight.rows() == rows && result.weight.cols() == cols,
            "result.weight: expected ", rows, "x", cols, ", got ", result.weight.rows(), "x",
            result.weight.cols());
  OBC_CHECK(grid.bits >= 2 && grid.bits <= 8 && grid.group_size >= 1 &&
                cols % grid.group_size == 0 && grid.scale.rows() == rows &&
                grid.scale.cols() == cols / grid.group_size &&
                grid.zero.rows() == rows && grid.zero.cols() == grid.scale.cols(),
            "result.grid: expected a grid of W's shape");
  const MaskMatrix pruned = internal::pruned_mask<Scalar>(W, prep.dead);
  const Eigen::VectorXd before = row_losses<Scalar>(W, result.weight, H, run.num_threads,
                                                    run.interrupt);
  result.refine_passes = internal::refine_into<Scalar>(
      W, internal::refine_hessian(H, prep, ropt.damped), prep.damp_absolute,
      grid, pruned, ropt, run, result.weight);
  check_finite_result(result.weight, "weights");
  internal::fill_codes(result);
  result.row_losses_unrefined = before;
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
}

#define OBC_INSTANTIATE(S)                                                                         \
  template void refine_quantized<S>(const Eigen::Ref<const RowMatrix<S>>&, const HessianRef&,      \
                                    QuantResult<S>&, const RefineOptions&, const HessianOptions&, \
                                    const RunOptions&);                                            \
  template int internal::refine_into<S>(const Eigen::Ref<const RowMatrix<S>>&,                     \
                                        const Eigen::MatrixXd&, double, const QuantGrid<S>&,       \
                                        const MaskMatrix&, const RefineOptions&,                   \
                                        const RunOptions&, RowMatrix<S>&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc
