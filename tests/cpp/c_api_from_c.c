/* The C API used from a C translation unit: proves obc/obc.h is plain C and links. */
#include <math.h>
#include <string.h>

#include "obc/obc.h"

/* Returns 0 when a tiny accumulate-then-prune round trip works from C, else the failing step. */
int obc_test_c_api_from_c(void) {
  enum { ROWS = 3, COLS = 4, N = 16 };
  float x[N * COLS];
  double weight[ROWS * COLS];
  double hessian[COLS * COLS];
  double weight_out[ROWS * COLS];
  uint8_t kept[ROWS * COLS];
  double row_losses[ROWS];
  double loss = -1;
  obc_accumulator* acc = NULL;
  obc_options options;
  int i;
  uint64_t count = 0;

  for (i = 0; i < N * COLS; ++i) x[i] = (float)sin(0.7 * i + 0.3) + (float)(i % 3) * 0.25f;
  for (i = 0; i < ROWS * COLS; ++i) weight[i] = cos(1.3 * i) + 0.1;

  if (strlen(obc_version()) == 0) return 1;
  if (obc_accumulator_create(COLS, &acc) != OBC_OK) return 2;
  if (obc_accumulator_add_f32(acc, x, N, COLS) != OBC_OK) return 3;
  if (obc_accumulator_count(acc, &count) != OBC_OK || count != N) return 4;
  if (obc_accumulator_hessian(acc, hessian, COLS * COLS) != OBC_OK) return 5;
  obc_accumulator_free(acc);

  obc_options_init(&options);
  options.damp = 0.01;
  if (obc_prune_unstructured_f64(weight, ROWS, COLS, hessian, COLS, 0.5, &options, weight_out, kept,
                                 row_losses, &loss) != OBC_OK) {
    return 6;
  }
  if (!(loss > 0) || fabs(loss - (row_losses[0] + row_losses[1] + row_losses[2])) > 1e-12 * loss) {
    return 7;
  }
  options.prune_method = OBC_PRUNE_SPARSEGPT;
  if (obc_prune_quantize_sparsegpt_f64(weight, ROWS, COLS, hessian, COLS, 0.5, 1, 0, 0, NULL,
                                       &options, weight_out, NULL, NULL, NULL, 0, kept, row_losses,
                                       &loss) != OBC_OK ||
      obc_last_float64_fallback() != 0) {
    return 10;
  }
  options.prune_method = OBC_PRUNE_EXACT;
  /* Errors come back as codes with a message, never as a crash. */
  if (obc_prune_unstructured_f64(NULL, ROWS, COLS, hessian, COLS, 0.5, &options, weight_out, kept,
                                 row_losses, &loss) != OBC_ERR_INVALID_ARGUMENT) {
    return 8;
  }
  if (strstr(obc_last_error(), "weight") == NULL) return 9;
  return 0;
}
