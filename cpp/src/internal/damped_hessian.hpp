// The damped Hessian that the solvers factor, as one function for both users: prepare_hessian
// writes it into the buffer that becomes H^-1, GPTQ (gptq.cpp) into the buffer whose permuted
// copy becomes the factor of its inverse. Both must see the very same values.
#pragma once

#include "obc/errors.hpp"
#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"

namespace obc::internal {

/// Writes the damped, exactly symmetric Hessian D = (H + H^T) / 2 + prep.damp_absolute on the
/// live diagonal, with a unit row and column at each dead input (decoupled: such weights are
/// zeroed, never updated), into `out` (cols x cols, column-major): the entries (i, j) with
/// i >= j, and their mirrors (j, i) too when `full`. prep: from prepare_hessian on the same H.
/// On num_threads threads from 512 inputs up; the values do not depend on the count. Polls
/// `interrupt` (may be null) between column tiles: writing a fresh buffer faults in its pages,
/// which on some machines takes seconds at LLM widths.
void write_damped_hessian(const HessianRef& H, const PreparedHessian& prep, double* out, bool full,
                          int num_threads, InterruptHook* interrupt);

/// The same D in full, computed in float64 and rounded once to T (float or double), with its
/// columns moved: column j of D goes to column column_of[j] of `out` (cols x cols,
/// column-major; column_of: a permutation of 0..cols-1, cols entries). GPTQ writes its permuted
/// factor's input this way straight into the factor's own buffer: moving columns costs nothing
/// here (each column is written contiguously either way), and no float64 copy of D is needed.
template <class T>
void write_damped_hessian_moved(const HessianRef& H, const PreparedHessian& prep, T* out,
                                const Index* column_of, int num_threads, InterruptHook* interrupt);

/// What prepare_hessian throws when the damped Hessian has no Cholesky factor (or a pivot below
/// its tolerance): names the damping tried and the number of live inputs.
NotPositiveDefinite not_positive_definite(const PreparedHessian& prep);

/// The relative pivot tolerance of prepare_hessian's factor (see there).
constexpr double kPivotTolerance = 1e-13;

}  // namespace obc::internal
