/* Outside C consumer of the installed package: accumulate, prune, quantize, handle errors.
 * Exit status 0 when all checks pass. */
#include <math.h>
#include <obc/obc.h>
#include <stdio.h>
#include <string.h>

enum { ROWS = 8, COLS = 16, SAMPLES = 128 };

static int failures = 0;

static void check(int ok, const char* what) {
  printf("%s %s\n", ok ? "[ ok ]" : "[FAIL]", what);
  if (!ok) {
    printf("       last error: %s\n", obc_last_error());
    ++failures;
  }
}

/* An interrupt callback: stops once its budget of polls is spent (a host's timeout). */
static int stop_when_spent(void* user_data) {
  int* polls_left = (int*)user_data;
  if (*polls_left <= 0) return 1;
  --*polls_left;
  return 0;
}

int main(void) {
  static float x[SAMPLES * COLS];
  static float weight[ROWS * COLS];
  static float weight_out[ROWS * COLS];
  static uint8_t kept[ROWS * COLS];
  static uint8_t codes[ROWS * COLS];
  static float scales[ROWS * 2];
  static uint8_t zeros[ROWS * 2];
  static double hessian[COLS * COLS];
  double row_losses[ROWS];
  double loss = -1.0, sum = 0.0;
  obc_accumulator* acc = NULL;
  obc_options options;
  obc_quant_options quant;
  int i, pruned = 0, polls = 0;

  for (i = 0; i < SAMPLES * COLS; ++i) x[i] = (float)(sin(0.37 * i) + cos(0.11 * i * i));
  for (i = 0; i < ROWS * COLS; ++i) weight[i] = (float)sin(1.7 * i + 0.2);
  printf("obc_native %s from C\n", obc_version());

  check(obc_accumulator_create(COLS, &acc) == OBC_OK, "create an accumulator");
  check(obc_accumulator_add_f32(acc, x, SAMPLES, COLS) == OBC_OK, "add activations");
  check(obc_accumulator_hessian(acc, hessian, COLS * COLS) == OBC_OK, "get the Hessian");
  obc_accumulator_free(acc);

  obc_options_init(&options);
  check(obc_prune_unstructured_f32(weight, ROWS, COLS, hessian, COLS, 0.5, &options, weight_out,
                                   kept, row_losses, &loss) == OBC_OK,
        "prune 50% unstructured");
  for (i = 0; i < ROWS * COLS; ++i) pruned += kept[i] == 0 && weight_out[i] == 0.0f;
  for (i = 0; i < ROWS; ++i) sum += row_losses[i];
  check(pruned == ROWS * COLS / 2, "half the weights are pruned and exactly zero");
  check(loss > 0 && fabs(loss - sum) <= 1e-12 * loss, "loss is the sum of the row losses");

  obc_quant_options_init(&quant);
  quant.bits = 3;
  quant.group_size = COLS / 2;
  check(obc_quantize_f32(weight, ROWS, COLS, hessian, COLS, &quant, &options, weight_out, codes,
                         scales, zeros, ROWS * 2, row_losses, &loss) == OBC_OK,
        "quantize to 3 bits, two groups per row");
  check(fabsf(weight_out[5] - scales[0] * (float)(codes[5] - zeros[0])) == 0.0f,
        "dequantized weight is scale * (code - zero)");

  options.prune_method = OBC_PRUNE_SPARSEGPT;
  check(obc_prune_quantize_sparsegpt_f32(weight, ROWS, COLS, hessian, COLS, 0.0, 1, 2, 4, &quant,
                                         &options, weight_out, codes, scales, zeros, ROWS * 2, kept,
                                         row_losses, &loss) == OBC_OK,
        "SparseGPT 2:4 + 3-bit in one sweep");
  pruned = 0;
  for (i = 0; i < ROWS * COLS; ++i) pruned += kept[i] == 0 && weight_out[i] == 0.0f;
  check(pruned == ROWS * COLS / 2, "2:4: half the weights are pruned and exactly zero");
  check(obc_prune_nm_f32(weight, ROWS, COLS, hessian, COLS, 2, 4, &options, weight_out, kept, NULL,
                         &loss) == OBC_OK && loss > 0,
        "SparseGPT 2:4 pruning");
  check(obc_last_float64_fallback() == 0, "no float64 fallback on a well-conditioned layer");
  options.prune_method = OBC_PRUNE_EXACT;

  /* Errors: codes and messages, never a crash. */
  check(obc_prune_nm_f32(NULL, ROWS, COLS, hessian, COLS, 2, 4, &options, weight_out, NULL, NULL,
                         NULL) == OBC_ERR_INVALID_ARGUMENT &&
            strstr(obc_last_error(), "weight") != NULL,
        "NULL weight is OBC_ERR_INVALID_ARGUMENT");
  check(obc_quantize_f32(weight, ROWS, COLS, hessian, COLS, &quant, &options, weight_out, NULL,
                         scales, NULL, ROWS, NULL, NULL) == OBC_ERR_INVALID_ARGUMENT,
        "a wrong grid buffer size is OBC_ERR_INVALID_ARGUMENT");
  options.interrupt = stop_when_spent;
  options.interrupt_user_data = &polls;
  check(obc_prune_unstructured_f32(weight, ROWS, COLS, hessian, COLS, 0.5, &options, weight_out,
                                   NULL, NULL, NULL) == OBC_ERR_INTERRUPTED,
        "the interrupt callback stops the solve");
  check(obc_accumulator_load("/nonexistent/dir/file.obchess", &acc) == OBC_ERR_IO && acc == NULL,
        "a missing Hessian file is OBC_ERR_IO");

  printf("%s\n", failures == 0 ? "all checks passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
