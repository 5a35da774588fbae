// Plain (Eigen-free) interface of the refinement's products (quant_refine.cpp, quant_refit.cpp),
// so that they are compiled once per SIMD level like the row kernels (see
// kernels/refine_product.cpp) and picked at run time: the refinement's gradient updates are
// GEMMs, which run several times faster with AVX2+FMA or AVX-512 than with the baseline SSE2.
#pragma once

#include <cstdint>
#include <vector>

#include "internal/row_kernels.hpp"

namespace obc::internal {

/// The GPTQ over the columns [s0, s0 + ns) of a block move's proposals (the block's columns
/// [b0, b0 + nb) of the layer; quant_refine.cpp's block_proposals), for n rows: proposal row j
/// belongs to layer row rows[j]. Per row and per column k in order: q = the code of x[k] on the
/// row's grid (0 where pruned), codes[k] = q, changes[k] = q - weight[k], errors[k - s0] =
/// (x[k] - q) / upper[k, k], x[t] -= errors[k - s0] upper[k, t] for t in (k, s0 + ns);
/// changed[j] = 1 where some changes[k] != 0 (else left as it is). x, codes, changes: n x nb
/// row-major (row stride nb), errors: n x ld_errors; upper: nb x nb row-major; weight, pruned:
/// layer rows (stride cols) from column 0; scale / zero: the rows' grids (stride groups, groups
/// of group_size columns). ns <= kMaxProposeSub. Rows are independent: a row's floats do not
/// depend on n or on the other rows.
constexpr KIndex kMaxProposeSub = 16;
template <class S>
struct ProposeRows {
  double* x;
  const double* upper;
  KIndex nb, b0, s0, ns;
  KIndex n;
  const KIndex* rows;
  const S* weight;
  const std::uint8_t* pruned;
  KIndex cols;
  const S* scale;
  const std::uint8_t* zero;
  KIndex groups, group_size;
  int maxq;
  S* codes;
  double* changes;
  double* errors;
  KIndex ld_errors;
  char* changed;
};

/// One row's single-code moves over the columns [c0, c0 + nb) (quant_refine.cpp's code_sweep):
/// g (nb entries) the row's gradient on those columns, updated after each move; weight,
/// pruned, hdiag (the diagonal of hd): the whole row / cols entries; hd: cols x cols symmetric,
/// column c at hd + c * ld. Accepted moves change weight, add their loss change to *objective
/// and are listed in moved (column - c0) and deltas (new - old), at most nb of them.
template <class S>
struct SweepRow {
  double* g;
  const double* hd;
  KIndex ld;
  const double* hdiag;
  KIndex c0, nb;
  S* weight;
  const std::uint8_t* pruned;
  const S* scale;
  const std::uint8_t* zero;
  KIndex group_size;
  int maxq;
  double* objective;
  KIndex* moved;
  double* deltas;
};

struct RefineKernels {
  /// c = a b^T in float64: c (m x n, row i at c + i * ldc), a (m x k, row i at a + i * lda),
  /// b (n x k column-major: column u at b + u * ldb, so b(j, u) = b[u * ldb + j]). c does not
  /// alias a or b. The summation order depends on (m, n, k) and the ISA only.
  void (*product)(const double* a, KIndex lda, const double* b, KIndex ldb, KIndex m, KIndex n,
                  KIndex k, double* c, KIndex ldc);
  /// y[0, n) += sum_u delta[u] * b[index[u] * ldb + t] over t in [0, n), u in [0, count): a few
  /// scaled columns of a column-major matrix added to one vector, in u order (pairs of columns
  /// per pass over y).
  void (*add_columns)(double* y, KIndex n, const double* b, KIndex ldb, const KIndex* index,
                      const double* delta, KIndex count);
  /// ProposeRows' GPTQ. Every copy gives the same bits (no fused a b + c).
  void (*propose_codes_f32)(const ProposeRows<float>&);
  void (*propose_codes_f64)(const ProposeRows<double>&);
  /// SweepRow's moves; returns their count. Every copy gives the same bits (no fused a b + c).
  KIndex (*sweep_codes_f32)(const SweepRow<float>&);
  KIndex (*sweep_codes_f64)(const SweepRow<double>&);
};

/// Rows per chunk of the refinement and of the scale refit (quant_refine.cpp, quant_refit.cpp):
/// a chunk's rows run their passes together. Fixed, so the floats do not depend on the thread
/// count.
constexpr KIndex kRefineChunk = 64;

/// The work items of a loop over `chunks` chunks of kRefineChunk rows: item i is the chunks
/// [starts[i], starts[i + 1]) (starts has items + 1 entries, the last = chunks). An item's rows
/// share one product with hd (the refinement's initial gradients, the refit's per-group
/// products), so that Eigen packs hd (cols x cols, streamed from memory) once per item instead
/// of once per chunk (Eigen's packing fell from 19% to 10% of a default quantize() at 4096 x
/// 4096, benchmarks/README.md). A row's floats are the same in any such product: Eigen
/// blocks the depth by the depth and the cache sizes only, and every item starts at a whole
/// chunk (whole register panels); a last chunk of fewer rows, which Eigen may treat otherwise,
/// is an item of its own. Items of several chunks come first, then 2 single chunks per
/// thread, so that the dynamic hand-out ends on small items and the threads finish together.
/// row_bytes: the item's workspace per row (it stays under 64 MiB).
std::vector<KIndex> refine_items(KIndex chunks, KIndex row_bytes, int num_threads);

/// The copy for this CPU: AVX-512 where use_avx512_kernels() says so, else the ISA of the row
/// kernels' table (kernels(), so OBC_SIMD=generic applies too).
const RefineKernels& refine_kernels();
const RefineKernels& refine_kernels_generic();
const RefineKernels& refine_kernels_avx2();
const RefineKernels& refine_kernels_avx512();

}  // namespace obc::internal
