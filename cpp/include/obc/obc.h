/* obc_native C API: Hessian accumulation, Hessian files, ExactOBS and SparseGPT pruning,
 * quantization (OBQ, GPTQ, refinement) and joint SparseGPT pruning + quantization.
 *
 * Pure C (C99) header for hosts without C++ (or across a language boundary). Everything is
 * plain buffers with explicit sizes and opaque handles; no C++ exception crosses the boundary.
 *
 * Conventions
 *  - Every function returning obc_status returns OBC_OK on success. On failure it returns an
 *    error code, writes nothing to caller outputs except where stated, and sets a message for
 *    obc_last_error(). Every such call (success too) replaces this thread's message.
 *  - Weights W are rows x cols (outputs x inputs), row-major, float32 or float64 (the _f32 / _f64
 *    suffix). Results have W's type. The Hessian H is cols x cols float64 (symmetric, so row- or
 *    column-major alike), H = 2/n sum_x x x^T over calibration inputs x (see obc_accumulator).
 *  - Output buffers are caller-allocated with the sizes stated; weight_out may alias weight.
 *    Outputs documented "may be NULL" are skipped when NULL.
 *  - Loss: 1/2 sum_rows dw H dw^T with the undamped H, which equals ||(W - W_hat) X||_F^2 / n.
 *  - Results do not depend on num_threads.
 *  - Linking: the library is C++ (and OpenMP when built with it); link with the C++ compiler
 *    driver or through CMake's find_package(obc_native) target obc_native::core.
 */
#ifndef OBC_OBC_H
#define OBC_OBC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The most worker threads a call may ask for (num_threads fields and arguments). Far above any
 * core count; a larger request returns OBC_ERR_INVALID_ARGUMENT instead of letting OpenMP abort
 * the process while trying to start the threads. */
#define OBC_MAX_THREADS 1024

/* ---- status and errors ------------------------------------------------------------------- */

typedef enum obc_status {
  OBC_OK = 0,
  OBC_ERR_INVALID_ARGUMENT = 1,      /* null pointer, wrong size, value out of range, NaN/Inf,
                                        values too large for the precision (rescale) */
  OBC_ERR_NOT_POSITIVE_DEFINITE = 2, /* H not positive definite after damping: raise damp.
                                        (A _f32 call whose float32 elimination loses definiteness
                                        is redone in float64 first, same damping; see
                                        obc_last_float64_fallback.) */
  OBC_ERR_INTERRUPTED = 3,           /* the interrupt callback asked to stop; no result */
  OBC_ERR_IO = 4,                    /* a file could not be opened, read or written */
  OBC_ERR_FORMAT = 5,                /* a file is not a valid Hessian file (magic, version, size,
                                        checksum, contents) */
  OBC_ERR_OUT_OF_MEMORY = 6,         /* an allocation failed */
  OBC_ERR_INTERNAL = 7               /* anything else (a bug: please report the message) */
} obc_status;

/* Message of this thread's last call ("" after a success). Valid until the next call of this
 * library on the same thread. Never NULL. */
const char* obc_last_error(void);

/* 1 when this thread's last call was a successful _f32 solver call whose float32 elimination
 * lost positive definiteness (an ill-conditioned H), so that the layer was redone in float64 with
 * the same damping and its result rounded to float32 (the Python results' precision "float64");
 * 0 after any other call. Structured pruning and SparseGPT never fall back (structured pruning
 * eliminates in float64 in every precision; SparseGPT factors H^-1 in float64). */
int obc_last_float64_fallback(void);

/* Static name of a status code, e.g. "OBC_ERR_FORMAT". Never NULL. */
const char* obc_status_name(obc_status status);

/* Library version, e.g. "0.1.0". Never NULL. */
const char* obc_version(void);

/* ---- options ----------------------------------------------------------------------------- */

typedef enum obc_spread {
  OBC_SPREAD_GLOBAL = 0, /* the ceil(s * rows * steps) smallest step losses of the whole layer */
  OBC_SPREAD_UNIFORM = 1 /* every row gets ceil(s * steps) steps */
} obc_spread;

/* The algorithm of obc_prune_unstructured_* / _nm_* / _blocked_* (obc_options.prune_method). */
typedef enum obc_prune_method {
  OBC_PRUNE_EXACT = 0,    /* ExactOBS: a greedy per row with exact OBS updates; about
                             rows * cols^3 flops, the lowest loss */
  OBC_PRUNE_SPARSEGPT = 1 /* SparseGPT (Frantar & Alistarh 2023): one sweep over the columns with
                             lazy blocks and an adaptive mask; about cols^3 + 2 rows cols^2
                             flops, for wide layers, at a higher loss. Not for structured
                             pruning (OBC_ERR_INVALID_ARGUMENT) */
} obc_prune_method;

/* Polled from the calling thread between rows; return non-zero to stop the computation, which
 * then returns OBC_ERR_INTERRUPTED (e.g. a timeout or a user cancel). Must not call back into
 * this library. */
typedef int (*obc_interrupt_fn)(void* user_data);

/* Options of every solver. Initialize with obc_options_init(), then change fields.
 * A struct from before `prune_method` (struct_size without the last two fields) is accepted and
 * means OBC_PRUNE_EXACT, the behaviour it was written against. */
typedef struct obc_options {
  uint32_t struct_size;       /* sizeof(obc_options), set by obc_options_init */
  double damp;                /* relative damping, >= 0: damp * mean(diag H) is added to
                                 diag H. Default 0.01 */
  int spread;                 /* an obc_spread: how a layer sparsity is spread over rows.
                                 Default OBC_SPREAD_GLOBAL */
  int num_threads;            /* worker threads, 0..OBC_MAX_THREADS; 0 = OpenMP default.
                                 Default 0. More is rejected (OBC_ERR_INVALID_ARGUMENT) */
  obc_interrupt_fn interrupt; /* may be NULL (never interrupted). Default NULL */
  void* interrupt_user_data;  /* passed to interrupt */
  int prune_method;           /* an obc_prune_method for the unstructured, N:M and blocked
                                 pruning calls; other calls ignore it. Default OBC_PRUNE_EXACT */
  size_t lazy_block;          /* SparseGPT's columns per lazy block (the paper's B), >= 1; rounded
                                 down to a multiple of the block (or of m for N:M), at least one;
                                 wider than cols means cols (one block). Unused by ExactOBS.
                                 Default 128 */
} obc_options;

/* Fills the defaults. Does nothing when options is NULL. */
void obc_options_init(obc_options* options);

typedef enum obc_grid {
  OBC_GRID_MSE = 0,   /* range shrink search minimizing sum |q(w) - w|^2.4 */
  OBC_GRID_MINMAX = 1 /* range [min(w, 0), max(w, 0)] */
} obc_grid;

/* The quantizer of obc_quantize_*: every method uses the same grids (fitted on the weights as
 * passed in), so the choice is made per row. */
typedef enum obc_quant_method {
  OBC_QUANT_AUTO = 0,         /* OBQ and GPTQ, each refined; every row keeps the lower loss.
                                 Above 1024 inputs GPTQ alone (refined): OBQ's cost grows as
                                 cols^3 and it wins few rows of wide layers */
  OBC_QUANT_OBQ = 1,          /* greedy OBQ (the paper) */
  OBC_QUANT_GPTQ = 2,         /* fixed order by descending diag(H) ("act-order"), lazy blocks */
  OBC_QUANT_GPTQ_NATURAL = 3, /* fixed order 0, 1, ... */
  OBC_QUANT_RTN = 4           /* round to nearest */
} obc_quant_method;

/* Quantization grid and method. Initialize with obc_quant_options_init(), then change fields.
 * A struct from before `method` (struct_size without the last three fields) is accepted and
 * means OBC_QUANT_OBQ without refinement, the behaviour it was written against. */
typedef struct obc_quant_options {
  uint32_t struct_size; /* sizeof(obc_quant_options), set by obc_quant_options_init */
  int bits;             /* 2..8. Default 4 */
  int sym;              /* non-zero: symmetric grid (zero point 2^(bits-1)). Default 1 */
  size_t group_size;    /* inputs sharing one grid; 0 = one grid per row, else divides cols.
                           Default 0 */
  int grid;             /* an obc_grid. Default OBC_GRID_MSE */
  int method;           /* an obc_quant_method. Default OBC_QUANT_AUTO */
  int refine_passes;    /* >= 0: passes of exact descent over the codes after each quantizer
                           (block moves over 128 inputs, then single-code moves; objective:
                           the reported loss, which never increases), then 2 rounds of scale
                           refit given the codes (least squares) + refinement, kept per row
                           where the loss drops; 0 = none of either. Default 20 */
  double refine_tol;    /* >= 0: a row stops after a pass that gains less than this, relative.
                           Default 1e-6 */
} obc_quant_options;

/* Fills the defaults. Does nothing when options is NULL. */
void obc_quant_options_init(obc_quant_options* options);

/* ---- Hessian accumulator ------------------------------------------------------------------ */

/* Accumulates S = sum_x x x^T (float64) and the sample count n over batches of activation rows.
 * Not thread-safe: do not use one accumulator from two threads at once. */
typedef struct obc_accumulator obc_accumulator;

/* A new empty accumulator for inputs of width cols (> 0). *out is set to NULL on failure. */
obc_status obc_accumulator_create(size_t cols, obc_accumulator** out);

/* Frees an accumulator; NULL is allowed. */
void obc_accumulator_free(obc_accumulator* accumulator);

/* Threads for the Gram products (0..OBC_MAX_THREADS; 0 = OpenMP default). Results do not depend
 * on it. */
obc_status obc_accumulator_set_num_threads(obc_accumulator* accumulator, int num_threads);

/* Adds rows x cols activations x (row-major; rows inputs of width cols, e.g. unfolded conv
 * patches). cols must equal the accumulator's width; rows may be 0 (x may then be NULL).
 * NaN/Inf, and values so large that the float64 sum would pass DBL_MAX / 4 (so that the
 * Hessian 2/n S stays finite), are rejected and leave the accumulator unchanged. */
obc_status obc_accumulator_add_f32(obc_accumulator* accumulator, const float* x, size_t rows,
                                   size_t cols);
obc_status obc_accumulator_add_f64(obc_accumulator* accumulator, const double* x, size_t rows,
                                   size_t cols);

/* into += other (sums and counts); other may equal into. Widths must match. */
obc_status obc_accumulator_merge(obc_accumulator* into, const obc_accumulator* other);

/* Width (cols) and sample count n. */
obc_status obc_accumulator_cols(const obc_accumulator* accumulator, size_t* cols);
obc_status obc_accumulator_count(const obc_accumulator* accumulator, uint64_t* count);

/* H = 2/n S into hessian_out, which holds hessian_size = cols * cols doubles. Fails when n == 0. */
obc_status obc_accumulator_hessian(const obc_accumulator* accumulator, double* hessian_out,
                                   size_t hessian_size);

/* S (the raw sum, cols * cols doubles) into sum_out. */
obc_status obc_accumulator_sum(const obc_accumulator* accumulator, double* sum_out,
                               size_t sum_size);

/* Hessian files (docs/hessian_format.md): save writes through a temporary file renamed into
 * place and replaces only a missing path, an empty file or a Hessian file (OBC_ERR_IO otherwise);
 * load reads regular files only and creates a new accumulator (*out NULL on failure;
 * OBC_ERR_IO / OBC_ERR_FORMAT). */
obc_status obc_accumulator_save(const obc_accumulator* accumulator, const char* path);
obc_status obc_accumulator_load(const char* path, obc_accumulator** out);

/* ---- pruning (ExactOBS, or SparseGPT by options->prune_method) ----------------------------- *
 * Common arguments:
 *   weight          rows x cols, row-major; rows, cols > 0; finite
 *   hessian         hessian_dim x hessian_dim float64; hessian_dim must equal cols
 *   options         may be NULL (defaults)
 *   weight_out      rows x cols, required; may alias weight
 *   kept_out        rows x cols bytes, 1 where the weight is kept, 0 where pruned; may be NULL
 *   row_losses_out  rows doubles; may be NULL
 *   loss_out        one double, the sum of the row losses; may be NULL
 */

/* Unstructured: ceil(sparsity * rows * cols) weights (GLOBAL) or ceil(sparsity * cols) per row
 * (UNIFORM) are pruned, sparsity in [0, 1]. Existing zeros and dead inputs count. */
obc_status obc_prune_unstructured_f32(const float* weight, size_t rows, size_t cols,
                                      const double* hessian, size_t hessian_dim, double sparsity,
                                      const obc_options* options, float* weight_out,
                                      uint8_t* kept_out, double* row_losses_out, double* loss_out);
obc_status obc_prune_unstructured_f64(const double* weight, size_t rows, size_t cols,
                                      const double* hessian, size_t hessian_dim, double sparsity,
                                      const obc_options* options, double* weight_out,
                                      uint8_t* kept_out, double* row_losses_out, double* loss_out);

/* N:M: n of every m consecutive inputs of a row are pruned; 0 < n < m, cols % m == 0. */
obc_status obc_prune_nm_f32(const float* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, size_t n, size_t m, const obc_options* options,
                            float* weight_out, uint8_t* kept_out, double* row_losses_out,
                            double* loss_out);
obc_status obc_prune_nm_f64(const double* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, size_t n, size_t m, const obc_options* options,
                            double* weight_out, uint8_t* kept_out, double* row_losses_out,
                            double* loss_out);

/* Blocked: blocks of `block` consecutive weights of a row pruned together; cols % block == 0;
 * sparsity is the fraction of blocks (spread as unstructured). */
obc_status obc_prune_blocked_f32(const float* weight, size_t rows, size_t cols,
                                 const double* hessian, size_t hessian_dim, double sparsity,
                                 size_t block, const obc_options* options, float* weight_out,
                                 uint8_t* kept_out, double* row_losses_out, double* loss_out);
obc_status obc_prune_blocked_f64(const double* weight, size_t rows, size_t cols,
                                 const double* hessian, size_t hessian_dim, double sparsity,
                                 size_t block, const obc_options* options, double* weight_out,
                                 uint8_t* kept_out, double* row_losses_out, double* loss_out);

/* Structured: whole groups of `group` consecutive input columns removed from every row;
 * cols % group == 0; ceil(sparsity * cols / group) groups removed. options->spread is unused. */
obc_status obc_prune_structured_f32(const float* weight, size_t rows, size_t cols,
                                    const double* hessian, size_t hessian_dim, double sparsity,
                                    size_t group, const obc_options* options, float* weight_out,
                                    uint8_t* kept_out, double* row_losses_out, double* loss_out);
obc_status obc_prune_structured_f64(const double* weight, size_t rows, size_t cols,
                                    const double* hessian, size_t hessian_dim, double sparsity,
                                    size_t group, const obc_options* options, double* weight_out,
                                    uint8_t* kept_out, double* row_losses_out, double* loss_out);

/* ---- joint pruning + quantization (SparseGPT) ---------------------------------------------- *
 * One SparseGPT sweep that prunes and quantizes: pruned weights become exactly 0, kept ones their
 * value on the grid, each column's error fed forward (the paper's joint mode). The grids are
 * obc_quantize's (fitted on the weights as passed in, before the sweep); 0 is on every grid, so a
 * pruned weight has the zero point's code. The pattern is given as:
 *   n == 0 and m == 0  sparsity in [0, 1] of the weights (block == 1) or of blocks of `block`
 *                      consecutive weights of a row (cols % block == 0), spread by
 *                      options->spread, counted as obc_prune_unstructured / _blocked;
 *   0 < n < m          N:M (cols % m == 0); sparsity must then be 0 and block 1.
 * quant: bits, sym, group_size and grid as obc_quantize (may be NULL: defaults); its method and
 * refine fields are unused (the sweep is the quantizer). options->prune_method is unused (this
 * call is SparseGPT); options->lazy_block is used. Outputs as obc_quantize, plus kept_out
 * (rows x cols bytes, 0 at the pruned weights, including zeros on entry and dead inputs; a kept
 * weight may still round to 0; may be NULL).
 */
obc_status obc_prune_quantize_sparsegpt_f32(const float* weight, size_t rows, size_t cols,
                                            const double* hessian, size_t hessian_dim,
                                            double sparsity, size_t block, size_t n, size_t m,
                                            const obc_quant_options* quant,
                                            const obc_options* options, float* weight_out,
                                            uint8_t* codes_out, float* scales_out,
                                            uint8_t* zeros_out, size_t grid_size, uint8_t* kept_out,
                                            double* row_losses_out, double* loss_out);
obc_status obc_prune_quantize_sparsegpt_f64(const double* weight, size_t rows, size_t cols,
                                            const double* hessian, size_t hessian_dim,
                                            double sparsity, size_t block, size_t n, size_t m,
                                            const obc_quant_options* quant,
                                            const obc_options* options, double* weight_out,
                                            uint8_t* codes_out, double* scales_out,
                                            uint8_t* zeros_out, size_t grid_size, uint8_t* kept_out,
                                            double* row_losses_out, double* loss_out);

/* ---- quantization (OBQ, GPTQ, refinement) ---------------------------------------------------- *
 * Weights that are zero on entry stay exactly zero (joint pruning + quantization). With
 * groups = cols / group_size (1 when group_size == 0), outputs are:
 *   weight_out      rows x cols dequantized weights, exactly scale * (code - zero); required
 *   codes_out       rows x cols integer codes in [0, 2^bits - 1]; may be NULL
 *   scales_out      rows x groups grid steps (W's type), row-major; may be NULL
 *   zeros_out       rows x groups zero points; may be NULL
 *   grid_size       elements in scales_out / zeros_out: must be rows * groups when either is set
 *   row_losses_out, loss_out as for pruning.
 * quant may be NULL (defaults: 4 bits, symmetric, per row, MSE grid, OBC_QUANT_AUTO with
 * refinement).
 */
obc_status obc_quantize_f32(const float* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, const obc_quant_options* quant,
                            const obc_options* options, float* weight_out, uint8_t* codes_out,
                            float* scales_out, uint8_t* zeros_out, size_t grid_size,
                            double* row_losses_out, double* loss_out);
obc_status obc_quantize_f64(const double* weight, size_t rows, size_t cols, const double* hessian,
                            size_t hessian_dim, const obc_quant_options* quant,
                            const obc_options* options, double* weight_out, uint8_t* codes_out,
                            double* scales_out, uint8_t* zeros_out, size_t grid_size,
                            double* row_losses_out, double* loss_out);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* OBC_OBC_H */
