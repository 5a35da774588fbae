// The C API (obc/obc.h): argument checks, a catch-all guard per call, thread-local error text.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <string>
#include <type_traits>

#include "obc/accumulator.hpp"
#include "obc/errors.hpp"
#include "obc/hessian_io.hpp"
#include "obc/parallel.hpp"
#include "obc/obc.h"
#include "obc/prune.hpp"
#include "obc/quant.hpp"
#include "obc/quant_select.hpp"
#include "obc/sparsegpt.hpp"

struct obc_accumulator {
  obc::HessianAccumulator state;
};

static_assert(OBC_MAX_THREADS == obc::kMaxThreads, "the C API and the core cap num_threads alike");

namespace {

using obc::Index;
using obc::InvalidArgument;

thread_local std::string t_last_error;
// Whether this thread's last call was redone in float64 (obc_last_float64_fallback); every
// guarded call clears it first.
thread_local bool t_last_float64_fallback = false;

void set_error(const char* message) noexcept {
  try {
    t_last_error = message;
  } catch (...) {
    t_last_error.clear();  // no memory for the message; the status code still tells
  }
}

// Runs `body`, mapping every exception to a status code and this thread's message. Nothing
// escapes: the C boundary must never see a C++ exception.
template <class Body>
obc_status guard(Body&& body) noexcept {
  t_last_float64_fallback = false;
  try {
    body();
    t_last_error.clear();
    return OBC_OK;
  } catch (const obc::FormatError& e) {
    set_error(e.what());
    return OBC_ERR_FORMAT;
  } catch (const std::invalid_argument& e) {  // obc::InvalidArgument and its kin
    set_error(e.what());
    return OBC_ERR_INVALID_ARGUMENT;
  } catch (const obc::NotPositiveDefinite& e) {
    set_error(e.what());
    return OBC_ERR_NOT_POSITIVE_DEFINITE;
  } catch (const obc::Interrupted& e) {
    set_error(e.what());
    return OBC_ERR_INTERRUPTED;
  } catch (const obc::IoError& e) {
    set_error(e.what());
    return OBC_ERR_IO;
  } catch (const std::bad_alloc&) {
    set_error("obc_native: out of memory");
    return OBC_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_error(e.what());
    return OBC_ERR_INTERNAL;
  } catch (...) {
    set_error("obc_native: unknown internal error");
    return OBC_ERR_INTERNAL;
  }
}

template <class T>
void require_pointer(const T* pointer, const char* name) {
  OBC_CHECK(pointer != nullptr, name, ": expected a non-null pointer, got NULL");
}

// A positive size that fits Eigen's signed index.
Index to_index(std::size_t value, const char* name) {
  OBC_CHECK(value > 0, name, ": expected a positive size, got 0");
  OBC_CHECK(value <= static_cast<std::size_t>(std::numeric_limits<Index>::max()), name, ": size ",
            value, " is too large");
  return static_cast<Index>(value);
}

// rows * cols elements, rejecting products that overflow.
Index elements(Index rows, Index cols, const char* name) {
  OBC_CHECK(rows <= std::numeric_limits<Index>::max() / cols, name, ": ", rows, " x ", cols,
            " elements overflow");
  return rows * cols;
}

class CallbackInterrupt : public obc::InterruptHook {
 public:
  CallbackInterrupt(obc_interrupt_fn fn, void* user_data) : fn_(fn), user_data_(user_data) {}
  bool should_stop() override { return fn_ != nullptr && fn_(user_data_) != 0; }

 private:
  obc_interrupt_fn fn_;
  void* user_data_;
};

// The solver settings of an obc_options (NULL = defaults).
struct Settings {
  obc::HessianOptions hessian;
  obc::RunOptions run;
  obc::Spread spread = obc::Spread::Global;
  bool sparsegpt = false;  // options.prune_method == OBC_PRUNE_SPARSEGPT
  Index lazy_block = obc::SparseGptOptions{}.lazy_block;
  CallbackInterrupt hook{nullptr, nullptr};
};

// obc_options before `prune_method` was added: its size then.
constexpr std::size_t kOptionsV1Size = offsetof(obc_options, prune_method);

void resolve(const obc_options* options, Settings& settings) {
  obc_options defaults;
  obc_options_init(&defaults);
  if (options == nullptr) options = &defaults;
  const bool v1 = options->struct_size == kOptionsV1Size;
  OBC_CHECK(options->struct_size == sizeof(obc_options) || v1, "options: struct_size is ",
            options->struct_size, ", expected ", sizeof(obc_options),
            " (initialize the struct with obc_options_init)");
  if (!v1) {  // a v1 struct ends before these fields: never read them
    OBC_CHECK(options->prune_method == OBC_PRUNE_EXACT ||
                  options->prune_method == OBC_PRUNE_SPARSEGPT,
              "options.prune_method: expected OBC_PRUNE_EXACT (0) or OBC_PRUNE_SPARSEGPT (1), got ",
              options->prune_method);
    settings.sparsegpt = options->prune_method == OBC_PRUNE_SPARSEGPT;
    settings.lazy_block = to_index(options->lazy_block, "options.lazy_block");
  }
  OBC_CHECK(std::isfinite(options->damp) && options->damp >= 0,
            "options.damp: expected a finite value >= 0, got ", options->damp);
  OBC_CHECK(options->num_threads >= 0 && options->num_threads <= OBC_MAX_THREADS,
            "options.num_threads: expected an integer in [0, ", OBC_MAX_THREADS,
            "] (0 = default), got ", options->num_threads);
  switch (options->spread) {
    case OBC_SPREAD_GLOBAL:
      settings.spread = obc::Spread::Global;
      break;
    case OBC_SPREAD_UNIFORM:
      settings.spread = obc::Spread::Uniform;
      break;
    default:
      throw InvalidArgument(obc::detail::concat(
          "options.spread: expected OBC_SPREAD_GLOBAL (0) or OBC_SPREAD_UNIFORM (1), got ",
          options->spread));
  }
  settings.hessian.damp = options->damp;
  settings.run.num_threads = options->num_threads;
  settings.hook = CallbackInterrupt(options->interrupt, options->interrupt_user_data);
  settings.run.interrupt = options->interrupt != nullptr ? &settings.hook : nullptr;
}

// The checked shape of a layer; the solvers take Eigen::Map views built from it.
struct Shape {
  Index rows = 0;
  Index cols = 0;
};

template <class S>
Shape check_layer(const S* weight, std::size_t rows, std::size_t cols, const double* hessian,
                  std::size_t hessian_dim, const S* weight_out) {
  require_pointer(weight, "weight");
  require_pointer(hessian, "hessian");
  require_pointer(weight_out, "weight_out");
  Shape shape;
  shape.rows = to_index(rows, "rows");
  shape.cols = to_index(cols, "cols");
  elements(shape.rows, shape.cols, "weight");
  OBC_CHECK(hessian_dim == cols, "hessian_dim: expected ", cols, " (cols of the weight), got ",
            hessian_dim);
  elements(shape.cols, shape.cols, "hessian");
  return shape;
}

template <class S>
Eigen::Map<const obc::RowMatrix<S>> weight_view(const S* weight, const Shape& shape) {
  return Eigen::Map<const obc::RowMatrix<S>>(weight, shape.rows, shape.cols);
}

Eigen::Map<const Eigen::MatrixXd> hessian_view(const double* hessian, const Shape& shape) {
  return Eigen::Map<const Eigen::MatrixXd>(hessian, shape.cols, shape.cols);
}

template <class S>
void copy_matrix(const obc::RowMatrix<S>& m, S* out) {
  std::memcpy(out, m.data(), sizeof(S) * static_cast<std::size_t>(m.size()));
}

void copy_losses(const Eigen::VectorXd& losses, double* row_losses_out, double* loss_out) {
  if (row_losses_out != nullptr) {
    std::memcpy(row_losses_out, losses.data(),
                sizeof(double) * static_cast<std::size_t>(losses.size()));
  }
  if (loss_out != nullptr) *loss_out = losses.sum();
}

void copy_kept(const obc::MaskMatrix& pruned, std::uint8_t* kept_out) {
  if (kept_out == nullptr) return;
  for (Index i = 0; i < pruned.size(); ++i) kept_out[i] = pruned.data()[i] == 0 ? 1 : 0;
}

template <class S>
void write_prune(const obc::PruneResult<S>& r, S* weight_out, std::uint8_t* kept_out,
                 double* row_losses_out, double* loss_out) {
  copy_matrix(r.weight, weight_out);
  copy_kept(r.pruned, kept_out);
  copy_losses(r.row_losses, row_losses_out, loss_out);
  t_last_float64_fallback = r.float64_fallback;
}

// SparseGPT options for a pattern; sparsity, block, n, m are checked by the core.
obc::SparseGptOptions sparsegpt_options(const Settings& s, obc::SparsePattern pattern) {
  obc::SparseGptOptions opt;
  opt.pattern = pattern;
  opt.spread = s.spread;
  opt.lazy_block = s.lazy_block;
  return opt;
}

Index to_param(std::size_t value, const char* name) {
  OBC_CHECK(value <= static_cast<std::size_t>(std::numeric_limits<Index>::max()), name, ": value ",
            value, " is too large");
  return static_cast<Index>(value);
}

template <class S>
obc_status prune_unstructured(const S* weight, std::size_t rows, std::size_t cols,
                              const double* hessian, std::size_t hessian_dim, double sparsity,
                              const obc_options* options, S* weight_out, std::uint8_t* kept_out,
                              double* row_losses_out, double* loss_out) {
  return guard([&] {
    const Shape shape = check_layer(weight, rows, cols, hessian, hessian_dim, weight_out);
    Settings s;
    resolve(options, s);
    if (s.sparsegpt) {
      obc::SparseGptOptions opt = sparsegpt_options(s, obc::SparsePattern::Unstructured);
      opt.sparsity = sparsity;
      write_prune(obc::prune_sparsegpt<S>(weight_view(weight, shape), hessian_view(hessian, shape),
                                          opt, s.hessian, s.run),
                  weight_out, kept_out, row_losses_out, loss_out);
      return;
    }
    const auto r =
        obc::prune_unstructured<S>(weight_view(weight, shape), hessian_view(hessian, shape),
                                   sparsity, s.spread, s.hessian, s.run);
    write_prune(r, weight_out, kept_out, row_losses_out, loss_out);
  });
}

template <class S>
obc_status prune_nm(const S* weight, std::size_t rows, std::size_t cols, const double* hessian,
                    std::size_t hessian_dim, std::size_t n, std::size_t m,
                    const obc_options* options, S* weight_out, std::uint8_t* kept_out,
                    double* row_losses_out, double* loss_out) {
  return guard([&] {
    const Shape shape = check_layer(weight, rows, cols, hessian, hessian_dim, weight_out);
    Settings s;
    resolve(options, s);
    if (s.sparsegpt) {
      obc::SparseGptOptions opt = sparsegpt_options(s, obc::SparsePattern::NM);
      opt.n = to_param(n, "n");
      opt.m = to_param(m, "m");
      write_prune(obc::prune_sparsegpt<S>(weight_view(weight, shape), hessian_view(hessian, shape),
                                          opt, s.hessian, s.run),
                  weight_out, kept_out, row_losses_out, loss_out);
      return;
    }
    const auto r = obc::prune_nm<S>(weight_view(weight, shape), hessian_view(hessian, shape),
                                    to_param(n, "n"), to_param(m, "m"), s.hessian, s.run);
    write_prune(r, weight_out, kept_out, row_losses_out, loss_out);
  });
}

template <class S>
obc_status prune_blocked(const S* weight, std::size_t rows, std::size_t cols, const double* hessian,
                         std::size_t hessian_dim, double sparsity, std::size_t block,
                         const obc_options* options, S* weight_out, std::uint8_t* kept_out,
                         double* row_losses_out, double* loss_out) {
  return guard([&] {
    const Shape shape = check_layer(weight, rows, cols, hessian, hessian_dim, weight_out);
    Settings s;
    resolve(options, s);
    if (s.sparsegpt) {
      obc::SparseGptOptions opt = sparsegpt_options(s, obc::SparsePattern::Blocked);
      opt.sparsity = sparsity;
      opt.block = to_param(block, "block");
      write_prune(obc::prune_sparsegpt<S>(weight_view(weight, shape), hessian_view(hessian, shape),
                                          opt, s.hessian, s.run),
                  weight_out, kept_out, row_losses_out, loss_out);
      return;
    }
    const auto r =
        obc::prune_blocked<S>(weight_view(weight, shape), hessian_view(hessian, shape), sparsity,
                              to_param(block, "block"), s.spread, s.hessian, s.run);
    write_prune(r, weight_out, kept_out, row_losses_out, loss_out);
  });
}

template <class S>
obc_status prune_structured(const S* weight, std::size_t rows, std::size_t cols,
                            const double* hessian, std::size_t hessian_dim, double sparsity,
                            std::size_t group, const obc_options* options, S* weight_out,
                            std::uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return guard([&] {
    const Shape shape = check_layer(weight, rows, cols, hessian, hessian_dim, weight_out);
    Settings s;
    resolve(options, s);
    OBC_CHECK(!s.sparsegpt,
              "options.prune_method: OBC_PRUNE_SPARSEGPT is not available for structured pruning "
              "(use OBC_PRUNE_EXACT)");
    const auto r =
        obc::prune_structured<S>(weight_view(weight, shape), hessian_view(hessian, shape), sparsity,
                                 to_param(group, "group"), s.hessian, s.run);
    write_prune(r, weight_out, kept_out, row_losses_out, loss_out);
  });
}

// scales_out / zeros_out, when given, must hold rows * groups elements.
void check_grid_outputs(const Shape& shape, const obc::QuantOptions& opt, const void* scales_out,
                        const void* zeros_out, std::size_t grid_size) {
  const Index c = shape.cols;
  OBC_CHECK(opt.group_size == 0 || c % opt.group_size == 0,
            "quant.group_size: expected 0 or a divisor of cols (", c, "), got ", opt.group_size);
  if (scales_out == nullptr && zeros_out == nullptr) return;
  const Index groups = opt.group_size == 0 ? 1 : c / opt.group_size;
  const auto expected = static_cast<std::size_t>(shape.rows * groups);
  OBC_CHECK(grid_size == expected, "grid_size: expected rows * groups = ", shape.rows, " * ",
            groups, " = ", expected, " elements in scales_out / zeros_out, got ", grid_size);
}

template <class S>
void write_quant(const obc::QuantResult<S>& r, S* weight_out, std::uint8_t* codes_out,
                 S* scales_out, std::uint8_t* zeros_out, double* row_losses_out, double* loss_out) {
  copy_matrix(r.weight, weight_out);
  if (codes_out != nullptr) copy_matrix(r.codes, codes_out);
  if (scales_out != nullptr) copy_matrix(r.grid.scale, scales_out);
  if (zeros_out != nullptr) copy_matrix(r.grid.zero, zeros_out);
  copy_losses(r.row_losses, row_losses_out, loss_out);
  t_last_float64_fallback = r.float64_fallback;
}

// obc_quant_options before `method` was added: its size then.
constexpr std::size_t kQuantOptionsV1Size = offsetof(obc_quant_options, method);

// cols: the layer's inputs, which decide the candidates of OBC_QUANT_AUTO.
obc::QuantOptions resolve_quant(const obc_quant_options* quant, Index cols,
                                obc::QuantSelectOptions* select) {
  obc_quant_options defaults;
  obc_quant_options_init(&defaults);
  if (quant == nullptr) quant = &defaults;
  const bool v1 = quant->struct_size == kQuantOptionsV1Size;
  OBC_CHECK(quant->struct_size == sizeof(obc_quant_options) || v1, "quant: struct_size is ",
            quant->struct_size, ", expected ", sizeof(obc_quant_options),
            " (initialize the struct with obc_quant_options_init)");
  select->methods = {obc::QuantMethod::Obq};
  select->refine.max_passes = 0;
  select->refit_rounds = 0;  // a v1 struct reproduces the quantizer of its time
  if (!v1) {
    switch (quant->method) {
      case OBC_QUANT_AUTO: select->methods = obc::auto_quant_methods(cols); break;
      case OBC_QUANT_OBQ: select->methods = {obc::QuantMethod::Obq}; break;
      case OBC_QUANT_GPTQ: select->methods = {obc::QuantMethod::Gptq}; break;
      case OBC_QUANT_GPTQ_NATURAL: select->methods = {obc::QuantMethod::GptqNatural}; break;
      case OBC_QUANT_RTN: select->methods = {obc::QuantMethod::Rtn}; break;
      default:
        throw InvalidArgument(obc::detail::concat(
            "quant.method: expected an obc_quant_method (0..4), got ", quant->method));
    }
    OBC_CHECK(quant->refine_passes >= 0, "quant.refine_passes: expected >= 0, got ",
              quant->refine_passes);
    OBC_CHECK(std::isfinite(quant->refine_tol) && quant->refine_tol >= 0,
              "quant.refine_tol: expected a finite value >= 0, got ", quant->refine_tol);
    select->refine.max_passes = quant->refine_passes;
    select->refine.rel_tol = quant->refine_tol;
    // as the Python quantize(): the scale refit comes with the refinement
    select->refit_rounds = quant->refine_passes > 0 ? obc::QuantSelectOptions{}.refit_rounds : 0;
  }
  OBC_CHECK(quant->bits >= 2 && quant->bits <= 8, "quant.bits: expected 2..8, got ", quant->bits);
  obc::QuantOptions opt;
  opt.bits = quant->bits;
  opt.sym = quant->sym != 0;
  opt.group_size = to_param(quant->group_size, "quant.group_size");
  switch (quant->grid) {
    case OBC_GRID_MSE:
      opt.grid = obc::GridSearch::Mse;
      break;
    case OBC_GRID_MINMAX:
      opt.grid = obc::GridSearch::MinMax;
      break;
    default:
      throw InvalidArgument(obc::detail::concat(
          "quant.grid: expected OBC_GRID_MSE (0) or OBC_GRID_MINMAX (1), got ", quant->grid));
  }
  return opt;
}

template <class S>
obc_status quantize(const S* weight, std::size_t rows, std::size_t cols, const double* hessian,
                    std::size_t hessian_dim, const obc_quant_options* quant,
                    const obc_options* options, S* weight_out, std::uint8_t* codes_out,
                    S* scales_out, std::uint8_t* zeros_out, std::size_t grid_size,
                    double* row_losses_out, double* loss_out) {
  return guard([&] {
    const Shape shape = check_layer(weight, rows, cols, hessian, hessian_dim, weight_out);
    obc::QuantSelectOptions select;
    const obc::QuantOptions opt = resolve_quant(quant, shape.cols, &select);
    Settings s;
    resolve(options, s);
    check_grid_outputs(shape, opt, scales_out, zeros_out, grid_size);
    const auto r = obc::quantize_select<S>(weight_view(weight, shape), hessian_view(hessian, shape),
                                           opt, select, s.hessian, s.run);
    write_quant(r, weight_out, codes_out, scales_out, zeros_out, row_losses_out, loss_out);
  });
}

template <class S>
obc_status prune_quantize_sparsegpt(const S* weight, std::size_t rows, std::size_t cols,
                                    const double* hessian, std::size_t hessian_dim,
                                    double sparsity, std::size_t block, std::size_t n,
                                    std::size_t m, const obc_quant_options* quant,
                                    const obc_options* options, S* weight_out,
                                    std::uint8_t* codes_out, S* scales_out, std::uint8_t* zeros_out,
                                    std::size_t grid_size, std::uint8_t* kept_out,
                                    double* row_losses_out, double* loss_out) {
  return guard([&] {
    const Shape shape = check_layer(weight, rows, cols, hessian, hessian_dim, weight_out);
    obc::QuantSelectOptions unused_select;  // the sweep is the quantizer
    const obc::QuantOptions opt = resolve_quant(quant, shape.cols, &unused_select);
    Settings s;
    resolve(options, s);
    check_grid_outputs(shape, opt, scales_out, zeros_out, grid_size);
    OBC_CHECK((n == 0) == (m == 0),
              "n, m: expected both 0 (a sparsity) or both set (N:M), got n = ", n, ", m = ", m);
    obc::SparseGptOptions sparse = sparsegpt_options(s, obc::SparsePattern::Unstructured);
    if (n != 0) {
      OBC_CHECK(sparsity == 0.0 && block == 1,
                "sparsity, block: expected 0 and 1 with N:M (n, m set), got sparsity = ", sparsity,
                ", block = ", block);
      sparse.pattern = obc::SparsePattern::NM;
      sparse.n = to_param(n, "n");
      sparse.m = to_param(m, "m");
    } else {
      sparse.sparsity = sparsity;
      sparse.block = to_param(block, "block");
      if (sparse.block != 1) sparse.pattern = obc::SparsePattern::Blocked;
    }
    const auto r = obc::quantize_sparsegpt<S>(weight_view(weight, shape),
                                              hessian_view(hessian, shape), sparse, opt, s.hessian,
                                              s.run);
    write_quant(r, weight_out, codes_out, scales_out, zeros_out, row_losses_out, loss_out);
    copy_kept(r.pruned, kept_out);
  });
}

obc::HessianAccumulator& state_of(obc_accumulator* accumulator) {
  require_pointer(accumulator, "accumulator");
  return accumulator->state;
}

const obc::HessianAccumulator& state_of(const obc_accumulator* accumulator) {
  require_pointer(accumulator, "accumulator");
  return accumulator->state;
}

template <class S>
obc_status accumulator_add(obc_accumulator* accumulator, const S* x, std::size_t rows,
                           std::size_t cols) {
  return guard([&] {
    obc::HessianAccumulator& acc = state_of(accumulator);
    OBC_CHECK(cols == static_cast<std::size_t>(acc.cols()), "cols: expected ", acc.cols(),
              " (the accumulator's width), got ", cols);
    if (rows == 0) return;
    require_pointer(x, "x");
    const Index r = to_index(rows, "rows");
    elements(r, acc.cols(), "x");
    acc.add(x, r, acc.cols());
  });
}

template <class Out>
void require_out(Out** out) {
  require_pointer(out, "out");
  *out = nullptr;
}

}  // namespace

extern "C" {

const char* obc_last_error(void) { return t_last_error.c_str(); }

int obc_last_float64_fallback(void) { return t_last_float64_fallback ? 1 : 0; }

const char* obc_status_name(obc_status status) {
  switch (status) {
    case OBC_OK:
      return "OBC_OK";
    case OBC_ERR_INVALID_ARGUMENT:
      return "OBC_ERR_INVALID_ARGUMENT";
    case OBC_ERR_NOT_POSITIVE_DEFINITE:
      return "OBC_ERR_NOT_POSITIVE_DEFINITE";
    case OBC_ERR_INTERRUPTED:
      return "OBC_ERR_INTERRUPTED";
    case OBC_ERR_IO:
      return "OBC_ERR_IO";
    case OBC_ERR_FORMAT:
      return "OBC_ERR_FORMAT";
    case OBC_ERR_OUT_OF_MEMORY:
      return "OBC_ERR_OUT_OF_MEMORY";
    case OBC_ERR_INTERNAL:
      return "OBC_ERR_INTERNAL";
  }
  return "OBC_ERR_UNKNOWN_STATUS";
}

const char* obc_version(void) { return OBC_VERSION; }

void obc_options_init(obc_options* options) {
  if (options == nullptr) return;
  *options = obc_options{};
  options->struct_size = sizeof(obc_options);
  options->damp = obc::HessianOptions{}.damp;
  options->spread = OBC_SPREAD_GLOBAL;
  options->num_threads = 0;
  options->interrupt = nullptr;
  options->interrupt_user_data = nullptr;
  options->prune_method = OBC_PRUNE_EXACT;
  options->lazy_block = static_cast<std::size_t>(obc::SparseGptOptions{}.lazy_block);
}

void obc_quant_options_init(obc_quant_options* options) {
  if (options == nullptr) return;
  const obc::QuantOptions defaults;
  *options = obc_quant_options{};
  options->struct_size = sizeof(obc_quant_options);
  options->bits = defaults.bits;
  options->sym = defaults.sym ? 1 : 0;
  options->group_size = static_cast<std::size_t>(defaults.group_size);
  options->grid = defaults.grid == obc::GridSearch::Mse ? OBC_GRID_MSE : OBC_GRID_MINMAX;
  const obc::RefineOptions refine;
  options->method = OBC_QUANT_AUTO;
  options->refine_passes = refine.max_passes;
  options->refine_tol = refine.rel_tol;
}

obc_status obc_accumulator_create(size_t cols, obc_accumulator** out) {
  return guard([&] {
    require_out(out);
    const Index c = to_index(cols, "cols");
    elements(c, c, "cols");
    *out = new obc_accumulator{obc::HessianAccumulator(c)};
  });
}

void obc_accumulator_free(obc_accumulator* accumulator) { delete accumulator; }

obc_status obc_accumulator_set_num_threads(obc_accumulator* accumulator, int num_threads) {
  return guard([&] {
    obc::AccumulatorOptions options;
    options.num_threads = num_threads;
    state_of(accumulator).set_options(options);
  });
}

obc_status obc_accumulator_add_f32(obc_accumulator* accumulator, const float* x, size_t rows,
                                   size_t cols) {
  return accumulator_add(accumulator, x, rows, cols);
}

obc_status obc_accumulator_add_f64(obc_accumulator* accumulator, const double* x, size_t rows,
                                   size_t cols) {
  return accumulator_add(accumulator, x, rows, cols);
}

obc_status obc_accumulator_merge(obc_accumulator* into, const obc_accumulator* other) {
  return guard([&] {
    require_pointer(into, "into");
    require_pointer(other, "other");
    into->state.merge(other->state);
  });
}

obc_status obc_accumulator_cols(const obc_accumulator* accumulator, size_t* cols) {
  return guard([&] {
    require_pointer(cols, "cols");
    *cols = static_cast<std::size_t>(state_of(accumulator).cols());
  });
}

obc_status obc_accumulator_count(const obc_accumulator* accumulator, uint64_t* count) {
  return guard([&] {
    require_pointer(count, "count");
    *count = state_of(accumulator).count();
  });
}

obc_status obc_accumulator_hessian(const obc_accumulator* accumulator, double* hessian_out,
                                   size_t hessian_size) {
  return guard([&] {
    const obc::HessianAccumulator& acc = state_of(accumulator);
    require_pointer(hessian_out, "hessian_out");
    const auto expected = static_cast<std::size_t>(acc.cols() * acc.cols());
    OBC_CHECK(hessian_size == expected, "hessian_size: expected cols * cols = ", expected, ", got ",
              hessian_size);
    const Eigen::MatrixXd h = acc.hessian();
    std::memcpy(hessian_out, h.data(), sizeof(double) * expected);
  });
}

obc_status obc_accumulator_sum(const obc_accumulator* accumulator, double* sum_out,
                               size_t sum_size) {
  return guard([&] {
    const obc::HessianAccumulator& acc = state_of(accumulator);
    require_pointer(sum_out, "sum_out");
    const auto expected = static_cast<std::size_t>(acc.cols() * acc.cols());
    OBC_CHECK(sum_size == expected, "sum_size: expected cols * cols = ", expected, ", got ",
              sum_size);
    std::memcpy(sum_out, acc.sum().data(), sizeof(double) * expected);
  });
}

obc_status obc_accumulator_save(const obc_accumulator* accumulator, const char* path) {
  return guard([&] {
    const obc::HessianAccumulator& acc = state_of(accumulator);
    require_pointer(path, "path");
    obc::save_hessian(path, acc);
  });
}

obc_status obc_accumulator_load(const char* path, obc_accumulator** out) {
  return guard([&] {
    require_out(out);
    require_pointer(path, "path");
    *out = new obc_accumulator{obc::load_hessian(path)};
  });
}

obc_status obc_prune_unstructured_f32(const float* weight, size_t rows, size_t cols,
                                      const double* hessian, size_t hessian_dim, double sparsity,
                                      const obc_options* options, float* weight_out,
                                      uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return prune_unstructured(weight, rows, cols, hessian, hessian_dim, sparsity, options, weight_out,
                            kept_out, row_losses_out, loss_out);
}

obc_status obc_prune_unstructured_f64(const double* weight, size_t rows, size_t cols,
                                      const double* hessian, size_t hessian_dim, double sparsity,
                                      const obc_options* options, double* weight_out,
                                      uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return prune_unstructured(weight, rows, cols, hessian, hessian_dim, sparsity, options, weight_out,
                            kept_out, row_losses_out, loss_out);
}

obc_status obc_prune_nm_f32(const float* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, size_t n, size_t m, const obc_options* options,
                            float* weight_out, uint8_t* kept_out, double* row_losses_out,
                            double* loss_out) {
  return prune_nm(weight, rows, cols, hessian, hessian_dim, n, m, options, weight_out, kept_out,
                  row_losses_out, loss_out);
}

obc_status obc_prune_nm_f64(const double* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, size_t n, size_t m, const obc_options* options,
                            double* weight_out, uint8_t* kept_out, double* row_losses_out,
                            double* loss_out) {
  return prune_nm(weight, rows, cols, hessian, hessian_dim, n, m, options, weight_out, kept_out,
                  row_losses_out, loss_out);
}

obc_status obc_prune_blocked_f32(const float* weight, size_t rows, size_t cols,
                                 const double* hessian, size_t hessian_dim, double sparsity,
                                 size_t block, const obc_options* options, float* weight_out,
                                 uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return prune_blocked(weight, rows, cols, hessian, hessian_dim, sparsity, block, options,
                       weight_out, kept_out, row_losses_out, loss_out);
}

obc_status obc_prune_blocked_f64(const double* weight, size_t rows, size_t cols,
                                 const double* hessian, size_t hessian_dim, double sparsity,
                                 size_t block, const obc_options* options, double* weight_out,
                                 uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return prune_blocked(weight, rows, cols, hessian, hessian_dim, sparsity, block, options,
                       weight_out, kept_out, row_losses_out, loss_out);
}

obc_status obc_prune_structured_f32(const float* weight, size_t rows, size_t cols,
                                    const double* hessian, size_t hessian_dim, double sparsity,
                                    size_t group, const obc_options* options, float* weight_out,
                                    uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return prune_structured(weight, rows, cols, hessian, hessian_dim, sparsity, group, options,
                          weight_out, kept_out, row_losses_out, loss_out);
}

obc_status obc_prune_structured_f64(const double* weight, size_t rows, size_t cols,
                                    const double* hessian, size_t hessian_dim, double sparsity,
                                    size_t group, const obc_options* options, double* weight_out,
                                    uint8_t* kept_out, double* row_losses_out, double* loss_out) {
  return prune_structured(weight, rows, cols, hessian, hessian_dim, sparsity, group, options,
                          weight_out, kept_out, row_losses_out, loss_out);
}

obc_status obc_quantize_f32(const float* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, const obc_quant_options* quant,
                            const obc_options* options, float* weight_out, uint8_t* codes_out,
                            float* scales_out, uint8_t* zeros_out, size_t grid_size,
                            double* row_losses_out, double* loss_out) {
  return quantize(weight, rows, cols, hessian, hessian_dim, quant, options, weight_out, codes_out,
                  scales_out, zeros_out, grid_size, row_losses_out, loss_out);
}

obc_status obc_quantize_f64(const double* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, const obc_quant_options* quant,
                            const obc_options* options, double* weight_out, uint8_t* codes_out,
                            double* scales_out, uint8_t* zeros_out, size_t grid_size,
                            double* row_losses_out, double* loss_out) {
  return quantize(weight, rows, cols, hessian, hessian_dim, quant, options, weight_out, codes_out,
                  scales_out, zeros_out, grid_size, row_losses_out, loss_out);
}

obc_status obc_prune_quantize_sparsegpt_f32(const float* weight, size_t rows, size_t cols,
                                            const double* hessian, size_t hessian_dim,
                                            double sparsity, size_t block, size_t n, size_t m,
                                            const obc_quant_options* quant,
                                            const obc_options* options, float* weight_out,
                                            uint8_t* codes_out, float* scales_out,
                                            uint8_t* zeros_out, size_t grid_size, uint8_t* kept_out,
                                            double* row_losses_out, double* loss_out) {
  return prune_quantize_sparsegpt(weight, rows, cols, hessian, hessian_dim, sparsity, block, n, m,
                                  quant, options, weight_out, codes_out, scales_out, zeros_out,
                                  grid_size, kept_out, row_losses_out, loss_out);
}

obc_status obc_prune_quantize_sparsegpt_f64(const double* weight, size_t rows, size_t cols,
                                            const double* hessian, size_t hessian_dim,
                                            double sparsity, size_t block, size_t n, size_t m,
                                            const obc_quant_options* quant,
                                            const obc_options* options, double* weight_out,
                                            uint8_t* codes_out, double* scales_out,
                                            uint8_t* zeros_out, size_t grid_size, uint8_t* kept_out,
                                            double* row_losses_out, double* loss_out) {
  return prune_quantize_sparsegpt(weight, rows, cols, hessian, hessian_dim, sparsity, block, n, m,
                                  quant, options, weight_out, codes_out, scales_out, zeros_out,
                                  grid_size, kept_out, row_losses_out, loss_out);
}

}  // extern "C"
