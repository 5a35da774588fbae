// Tests for obc/obc.h: agreement with the C++ API, and error codes (never crashes) for bad calls.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <Eigen/QR>

#include "check.hpp"
#include "obc/accumulator.hpp"
#include "obc/build_info.hpp"
#include "obc/errors.hpp"
#include "obc/hessian_io.hpp"
#include "obc/obc.h"
#include "obc/prune.hpp"
#include "obc/quant.hpp"
#include "obc/quant_select.hpp"
#include "obc/sparsegpt.hpp"

extern "C" int obc_test_c_api_from_c(void);

using namespace obc;
namespace fs = std::filesystem;

namespace {

struct Layer {
  RowMatrixXd weight;  // rows x cols
  RowMatrixXd x;       // n x cols activations
  Eigen::MatrixXd hessian;
};

Layer make_layer(Index rows, Index cols, Index n, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  Layer l;
  l.weight = RowMatrixXd::NullaryExpr(rows, cols, [&] { return normal(gen); });
  l.x = RowMatrixXd::NullaryExpr(n, cols, [&] { return normal(gen); });
  HessianAccumulator acc(cols);
  acc.add(l.x);
  l.hessian = acc.hessian();
  return l;
}

bool error_mentions(const char* part) {
  return std::string(obc_last_error()).find(part) != std::string::npos;
}

obc_options default_options() {
  obc_options options;
  obc_options_init(&options);
  return options;
}

int stop_after(void* user_data) {
  int* calls = static_cast<int*>(user_data);
  ++*calls;
  return 1;
}

int never_stop(void* user_data) {
  ++*static_cast<int*>(user_data);
  return 0;
}

}  // namespace

OBC_TEST(c_translation_unit_works) { CHECK(obc_test_c_api_from_c() == 0); }

OBC_TEST(version_status_names_and_defaults) {
  CHECK(std::string(obc_version()) == build_info().version);
  CHECK(std::string(obc_status_name(OBC_ERR_FORMAT)) == "OBC_ERR_FORMAT");
  CHECK(std::string(obc_status_name(static_cast<obc_status>(99))) == "OBC_ERR_UNKNOWN_STATUS");
  const obc_options options = default_options();
  CHECK(options.struct_size == sizeof(obc_options));
  CHECK(options.damp == 0.01 && options.spread == OBC_SPREAD_GLOBAL && options.num_threads == 0);
  CHECK(options.interrupt == nullptr);
  CHECK(options.prune_method == OBC_PRUNE_EXACT);
  CHECK(options.lazy_block == static_cast<size_t>(SparseGptOptions{}.lazy_block));
  obc_quant_options quant;
  obc_quant_options_init(&quant);
  CHECK(quant.bits == 4 && quant.sym == 1 && quant.group_size == 0 && quant.grid == OBC_GRID_MSE);
  obc_options_init(nullptr);  // allowed, does nothing
  obc_quant_options_init(nullptr);
}

OBC_TEST(accumulator_matches_cpp_and_round_trips) {
  const Layer l = make_layer(2, 12, 300, 1);
  obc_accumulator* acc = nullptr;
  CHECK(obc_accumulator_create(12, &acc) == OBC_OK);
  CHECK(obc_accumulator_set_num_threads(acc, 2) == OBC_OK);
  CHECK(obc_accumulator_add_f64(acc, l.x.data(), 100, 12) == OBC_OK);
  obc_accumulator* shard = nullptr;
  CHECK(obc_accumulator_create(12, &shard) == OBC_OK);
  const RowMatrix<float> rest = l.x.bottomRows(200).cast<float>();
  CHECK(obc_accumulator_add_f32(shard, rest.data(), 200, 12) == OBC_OK);
  CHECK(obc_accumulator_merge(acc, shard) == OBC_OK);
  uint64_t count = 0;
  size_t cols = 0;
  CHECK(obc_accumulator_count(acc, &count) == OBC_OK && count == 300);
  CHECK(obc_accumulator_cols(acc, &cols) == OBC_OK && cols == 12);

  HessianAccumulator cpp(12);
  cpp.add(l.x.topRows(100));
  cpp.add(rest);
  Eigen::MatrixXd h(12, 12), s(12, 12);
  CHECK(obc_accumulator_hessian(acc, h.data(), 144) == OBC_OK);
  CHECK(obc_accumulator_sum(acc, s.data(), 144) == OBC_OK);
  CHECK(h == cpp.hessian());
  CHECK(s == cpp.sum());
  CHECK(std::string(obc_last_error()).empty());

  const fs::path path = fs::temp_directory_path() /
                        ("obc_test_c_api_" + std::to_string(std::random_device{}()) + ".obchess");
  CHECK(obc_accumulator_save(acc, path.string().c_str()) == OBC_OK);
  obc_accumulator* loaded = nullptr;
  CHECK(obc_accumulator_load(path.string().c_str(), &loaded) == OBC_OK);
  Eigen::MatrixXd h_loaded(12, 12);
  CHECK(obc_accumulator_hessian(loaded, h_loaded.data(), 144) == OBC_OK);
  CHECK(h_loaded == h);
  obc_accumulator_free(loaded);

  // A corrupted file: OBC_ERR_FORMAT and *out stays NULL; a missing one: OBC_ERR_IO.
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x55');
  }
  loaded = reinterpret_cast<obc_accumulator*>(&count);  // must be reset to NULL
  CHECK(obc_accumulator_load(path.string().c_str(), &loaded) == OBC_ERR_FORMAT);
  CHECK(loaded == nullptr);
  CHECK(error_mentions("checksum mismatch"));
  fs::remove(path);
  CHECK(obc_accumulator_load(path.string().c_str(), &loaded) == OBC_ERR_IO);
  CHECK(error_mentions("cannot open"));
  CHECK(obc_accumulator_save(acc, (path / "nested" / "x").string().c_str()) == OBC_ERR_IO);

  obc_accumulator_free(shard);
  obc_accumulator_free(acc);
  obc_accumulator_free(nullptr);
}

OBC_TEST(accumulator_bad_calls_return_codes) {
  obc_accumulator* acc = nullptr;
  CHECK(obc_accumulator_create(0, &acc) == OBC_ERR_INVALID_ARGUMENT && acc == nullptr);
  CHECK(error_mentions("cols"));
  CHECK(obc_accumulator_create(4, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_create(SIZE_MAX, &acc) != OBC_OK && acc == nullptr);
  CHECK(obc_accumulator_create(4, &acc) == OBC_OK);
  const double x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  CHECK(obc_accumulator_add_f64(nullptr, x, 2, 4) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("accumulator"));
  CHECK(obc_accumulator_add_f64(acc, nullptr, 2, 4) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_add_f64(acc, x, 2, 3) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("expected 4"));
  CHECK(obc_accumulator_add_f64(acc, nullptr, 0, 4) == OBC_OK);  // empty batch
  const double nan[4] = {1, std::nan(""), 3, 4};
  CHECK(obc_accumulator_add_f64(acc, nan, 1, 4) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("NaN"));
  double h[16];
  CHECK(obc_accumulator_hessian(acc, h, 16) == OBC_ERR_INVALID_ARGUMENT);  // no samples yet
  CHECK(error_mentions("no samples"));
  CHECK(obc_accumulator_add_f64(acc, x, 2, 4) == OBC_OK);
  CHECK(obc_accumulator_hessian(acc, h, 15) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("hessian_size"));
  CHECK(obc_accumulator_hessian(acc, nullptr, 16) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_sum(acc, h, 17) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_count(acc, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_cols(nullptr, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_merge(acc, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_merge(nullptr, acc) == OBC_ERR_INVALID_ARGUMENT);
  obc_accumulator* other = nullptr;
  CHECK(obc_accumulator_create(5, &other) == OBC_OK);
  CHECK(obc_accumulator_merge(acc, other) == OBC_ERR_INVALID_ARGUMENT);
  obc_accumulator_free(other);
  CHECK(obc_accumulator_merge(acc, acc) == OBC_OK);
  uint64_t count = 0;
  CHECK(obc_accumulator_count(acc, &count) == OBC_OK && count == 4);
  CHECK(obc_accumulator_set_num_threads(acc, -1) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_set_num_threads(acc, OBC_MAX_THREADS + 1) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_save(acc, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_save(nullptr, "x") == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_accumulator_load(nullptr, &other) == OBC_ERR_INVALID_ARGUMENT && other == nullptr);
  CHECK(obc_accumulator_load("x", nullptr) == OBC_ERR_INVALID_ARGUMENT);
  obc_accumulator_free(acc);
}

OBC_TEST(pruning_matches_cpp_for_both_dtypes) {
  const Layer l = make_layer(6, 16, 200, 2);
  const obc_options options = default_options();
  const Index size = l.weight.size();

  // float64, unstructured
  {
    const auto r = prune_unstructured<double>(l.weight, l.hessian, 0.5);
    RowMatrixXd w(6, 16);
    std::vector<uint8_t> kept(static_cast<size_t>(size));
    Eigen::VectorXd losses(6);
    double loss = 0;
    CHECK(obc_prune_unstructured_f64(l.weight.data(), 6, 16, l.hessian.data(), 16, 0.5, &options,
                                     w.data(), kept.data(), losses.data(), &loss) == OBC_OK);
    CHECK(w == r.weight);
    CHECK(losses == r.row_losses);
    CHECK(loss == r.row_losses.sum());
    for (Index i = 0; i < size; ++i)
      CHECK(kept[static_cast<size_t>(i)] == (r.pruned.data()[i] ? 0 : 1));
  }
  // float32, every mode, optional outputs left NULL
  const RowMatrix<float> w32 = l.weight.cast<float>();
  RowMatrix<float> out(6, 16);
  Eigen::VectorXd losses(6);
  CHECK(obc_prune_unstructured_f32(w32.data(), 6, 16, l.hessian.data(), 16, 0.25, nullptr,
                                   out.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(out == prune_unstructured<float>(w32, l.hessian, 0.25).weight);
  CHECK(obc_prune_nm_f32(w32.data(), 6, 16, l.hessian.data(), 16, 2, 4, &options, out.data(),
                         nullptr, losses.data(), nullptr) == OBC_OK);
  auto nm = prune_nm<float>(w32, l.hessian, 2, 4);
  CHECK(out == nm.weight && losses == nm.row_losses);
  CHECK(obc_prune_blocked_f32(w32.data(), 6, 16, l.hessian.data(), 16, 0.5, 4, &options, out.data(),
                              nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(out == prune_blocked<float>(w32, l.hessian, 0.5, 4).weight);
  CHECK(obc_prune_structured_f32(w32.data(), 6, 16, l.hessian.data(), 16, 0.5, 2, &options,
                                 out.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(out == prune_structured<float>(w32, l.hessian, 0.5, 2).weight);
  // Uniform spread and damping options reach the solver.
  obc_options uniform = default_options();
  uniform.spread = OBC_SPREAD_UNIFORM;
  uniform.damp = 0.1;
  uniform.num_threads = 2;
  CHECK(obc_prune_unstructured_f32(w32.data(), 6, 16, l.hessian.data(), 16, 0.5, &uniform,
                                   out.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(
      out ==
      prune_unstructured<float>(w32, l.hessian, 0.5, Spread::Uniform, HessianOptions{0.1}).weight);
  // In place: weight_out may alias weight.
  RowMatrixXd in_place = l.weight;
  CHECK(obc_prune_nm_f64(in_place.data(), 6, 16, l.hessian.data(), 16, 2, 4, nullptr,
                         in_place.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(in_place == prune_nm<double>(l.weight, l.hessian, 2, 4).weight);
}

OBC_TEST(quantization_matches_cpp) {
  const Layer l = make_layer(5, 12, 150, 3);
  obc_quant_options quant;
  obc_quant_options_init(&quant);
  quant.bits = 3;
  quant.sym = 0;
  quant.group_size = 4;
  quant.grid = OBC_GRID_MINMAX;
  quant.method = OBC_QUANT_OBQ;
  quant.refine_passes = 0;
  QuantOptions opt;
  opt.bits = 3;
  opt.sym = false;
  opt.group_size = 4;
  opt.grid = GridSearch::MinMax;
  const auto r = quantize<double>(l.weight, l.hessian, opt);
  RowMatrixXd w(5, 12), scales(5, 3);
  RowMatrix<uint8_t> codes(5, 12), zeros(5, 3);
  Eigen::VectorXd losses(5);
  double loss = 0;
  CHECK(obc_quantize_f64(l.weight.data(), 5, 12, l.hessian.data(), 12, &quant, nullptr, w.data(),
                         codes.data(), scales.data(), zeros.data(), 15, losses.data(),
                         &loss) == OBC_OK);
  CHECK(w == r.weight && codes == r.codes && scales == r.grid.scale && zeros == r.grid.zero);
  CHECK(losses == r.row_losses && loss == r.row_losses.sum());
  // Defaults (quant NULL) are 4-bit symmetric per-row MSE grids, OBQ and GPTQ refined, best
  // per row.
  const RowMatrix<float> w32 = l.weight.cast<float>();
  RowMatrix<float> out(5, 12), scale32(5, 1);
  CHECK(obc_quantize_f32(w32.data(), 5, 12, l.hessian.data(), 12, nullptr, nullptr, out.data(),
                         nullptr, scale32.data(), nullptr, 5, nullptr, nullptr) == OBC_OK);
  const auto r32 = quantize_select<float>(w32, l.hessian, QuantOptions{});
  CHECK(out == r32.weight && scale32 == r32.grid.scale);
  // Wrong grid buffer size, bad bits / group / enum values, uninitialized struct.
  CHECK(obc_quantize_f64(l.weight.data(), 5, 12, l.hessian.data(), 12, &quant, nullptr, w.data(),
                         nullptr, scales.data(), nullptr, 5, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("grid_size"));
  obc_quant_options bad = quant;
  bad.bits = 9;
  CHECK(obc_quantize_f64(l.weight.data(), 5, 12, l.hessian.data(), 12, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("bits"));
  bad = quant;
  bad.group_size = 5;
  CHECK(obc_quantize_f64(l.weight.data(), 5, 12, l.hessian.data(), 12, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  bad = quant;
  bad.grid = 7;
  CHECK(obc_quantize_f64(l.weight.data(), 5, 12, l.hessian.data(), 12, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  bad = quant;
  bad.struct_size = 0;
  CHECK(obc_quantize_f64(l.weight.data(), 5, 12, l.hessian.data(), 12, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("obc_quant_options_init"));
}

OBC_TEST(quantization_methods_and_refinement) {
  const Layer l = make_layer(70, 16, 200, 5);  // 70 rows: two row chunks of the GPTQ solver
  RowMatrixXd w(70, 16);
  Eigen::VectorXd losses(70);
  double loss = 0;
  obc_quant_options quant;
  obc_quant_options_init(&quant);
  CHECK(quant.method == OBC_QUANT_AUTO && quant.refine_passes == 20 && quant.refine_tol == 1e-6);
  quant.bits = 3;
  QuantOptions opt;
  opt.bits = 3;
  // GPTQ alone, without refinement: quantize_gptq.
  quant.method = OBC_QUANT_GPTQ;
  quant.refine_passes = 0;
  CHECK(obc_quantize_f64(l.weight.data(), 70, 16, l.hessian.data(), 16, &quant, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, losses.data(), &loss) == OBC_OK);
  const auto gptq = quantize_gptq<double>(l.weight, l.hessian, opt);
  CHECK(w == gptq.weight && losses == gptq.row_losses);
  // Refined: quantize_select with that single candidate; the loss does not increase.
  quant.refine_passes = 5;
  CHECK(obc_quantize_f64(l.weight.data(), 70, 16, l.hessian.data(), 16, &quant, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, losses.data(), &loss) == OBC_OK);
  QuantSelectOptions select;
  select.methods = {QuantMethod::Gptq};
  select.refine.max_passes = 5;
  const auto refined = quantize_select<double>(l.weight, l.hessian, opt, select);
  CHECK(w == refined.weight && losses == refined.row_losses);
  CHECK((refined.row_losses.array() <= gptq.row_losses.array()).all());
  CHECK(refined.row_losses.sum() < gptq.row_losses.sum());
  // A struct from before `method` (its old size) keeps the old meaning: OBQ, no refinement.
  obc_quant_options old = quant;
  old.struct_size = static_cast<uint32_t>(offsetof(obc_quant_options, method));
  old.method = 99;  // not read
  CHECK(obc_quantize_f64(l.weight.data(), 70, 16, l.hessian.data(), 16, &old, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr, nullptr) == OBC_OK);
  CHECK(w == quantize<double>(l.weight, l.hessian, opt).weight);
  // Bad method and refinement fields.
  obc_quant_options bad = quant;
  bad.method = 5;
  CHECK(obc_quantize_f64(l.weight.data(), 70, 16, l.hessian.data(), 16, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("quant.method"));
  bad = quant;
  bad.refine_passes = -1;
  CHECK(obc_quantize_f64(l.weight.data(), 70, 16, l.hessian.data(), 16, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("quant.refine_passes"));
  bad = quant;
  bad.refine_tol = -1.0;
  CHECK(obc_quantize_f64(l.weight.data(), 70, 16, l.hessian.data(), 16, &bad, nullptr, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr,
                         nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("quant.refine_tol"));
}

OBC_TEST(auto_quantizer_drops_obq_above_its_width) {
  // OBC_QUANT_AUTO is OBQ + GPTQ up to kAutoObqMaxCols inputs and GPTQ alone above: at 1032
  // inputs it equals OBC_QUANT_GPTQ bit for bit, while the core's explicit pair (OBQ, GPTQ) keeps
  // OBQ in some rows of these white-noise inputs, so the two results differ.
  CHECK(auto_quant_methods(kAutoObqMaxCols).size() == 2 &&
        auto_quant_methods(kAutoObqMaxCols + 1) == std::vector<QuantMethod>{QuantMethod::Gptq});
  const Index rows = 4, cols = 1032;
  const Layer l = make_layer(rows, cols, 2 * cols, 6);
  RowMatrixXd auto_w(rows, cols), gptq_w(rows, cols);
  Eigen::VectorXd auto_losses(rows), gptq_losses(rows);
  obc_quant_options quant;
  obc_quant_options_init(&quant);
  quant.refine_passes = 1;
  CHECK(obc_quantize_f64(l.weight.data(), rows, cols, l.hessian.data(), cols, &quant, nullptr,
                         auto_w.data(), nullptr, nullptr, nullptr, 0, auto_losses.data(),
                         nullptr) == OBC_OK);
  quant.method = OBC_QUANT_GPTQ;
  CHECK(obc_quantize_f64(l.weight.data(), rows, cols, l.hessian.data(), cols, &quant, nullptr,
                         gptq_w.data(), nullptr, nullptr, nullptr, 0, gptq_losses.data(),
                         nullptr) == OBC_OK);
  CHECK(auto_w == gptq_w && auto_losses == gptq_losses);
  QuantOptions opt;
  QuantSelectOptions pair;
  pair.refine.max_passes = 1;
  const auto both = quantize_select<double>(l.weight, l.hessian, opt, pair);
  CHECK((both.row_method.array() == static_cast<std::uint8_t>(QuantMethod::Obq)).any());
  CHECK(both.row_losses.sum() < gptq_losses.sum());
}

OBC_TEST(bad_layer_calls_return_codes_and_leave_outputs) {
  const Layer l = make_layer(3, 8, 100, 4);
  const obc_options options = default_options();
  RowMatrixXd w = RowMatrixXd::Constant(3, 8, 7.0);
  double loss = 7.0;
  const double* W = l.weight.data();
  const double* H = l.hessian.data();
  auto unchanged = [&] { return (w.array() == 7.0).all() && loss == 7.0; };

  CHECK(obc_prune_unstructured_f64(nullptr, 3, 8, H, 8, 0.5, &options, w.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("weight"));
  CHECK(obc_prune_unstructured_f64(W, 3, 8, nullptr, 8, 0.5, &options, w.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("hessian"));
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 8, 0.5, &options, nullptr, nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("weight_out"));
  CHECK(obc_prune_unstructured_f64(W, 0, 8, H, 8, 0.5, &options, w.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("rows"));
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 7, 0.5, &options, w.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("hessian_dim"));
  CHECK(obc_prune_unstructured_f64(W, SIZE_MAX / 2, 8, H, 8, 0.5, &options, w.data(), nullptr,
                                   nullptr, &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 8, 1.5, &options, w.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("sparsity"));
  CHECK(obc_prune_nm_f64(W, 3, 8, H, 8, 4, 4, &options, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_prune_nm_f64(W, 3, 8, H, 8, 1, 3, &options, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_prune_blocked_f64(W, 3, 8, H, 8, 0.5, 3, &options, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_prune_structured_f64(W, 3, 8, H, 8, 0.5, 0, &options, w.data(), nullptr, nullptr,
                                 &loss) == OBC_ERR_INVALID_ARGUMENT);
  obc_options bad = options;
  bad.struct_size = 3;
  CHECK(obc_prune_nm_f64(W, 3, 8, H, 8, 2, 4, &bad, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("obc_options_init"));
  bad = options;
  bad.damp = -1;
  CHECK(obc_prune_nm_f64(W, 3, 8, H, 8, 2, 4, &bad, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("damp"));
  bad = options;
  bad.spread = 5;
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 8, 0.5, &bad, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  bad = options;
  bad.num_threads = -2;
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 8, 0.5, &bad, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  // More threads than OBC_MAX_THREADS: an error, not a million threads (libgomp aborts).
  bad.num_threads = OBC_MAX_THREADS + 1;
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 8, 0.5, &bad, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("num_threads"));
  bad.num_threads = 1000000;
  CHECK(obc_prune_structured_f64(W, 3, 8, H, 8, 0.25, 1, &bad, w.data(), nullptr, nullptr, &loss) ==
        OBC_ERR_INVALID_ARGUMENT);
  bad.num_threads = OBC_MAX_THREADS;  // the bound itself is allowed
  RowMatrixXd solved(3, 8);
  double solved_loss = 0;
  CHECK(obc_prune_unstructured_f64(W, 3, 8, H, 8, 0.5, &bad, solved.data(), nullptr, nullptr,
                                   &solved_loss) == OBC_OK);
  // NaN weights, asymmetric H, singular H without damping.
  RowMatrixXd nan_w = l.weight;
  nan_w(1, 1) = std::nan("");
  CHECK(obc_prune_unstructured_f64(nan_w.data(), 3, 8, H, 8, 0.5, &options, w.data(), nullptr,
                                   nullptr, &loss) == OBC_ERR_INVALID_ARGUMENT);
  Eigen::MatrixXd asym = l.hessian;
  asym(0, 1) += 1.0;
  CHECK(obc_prune_unstructured_f64(W, 3, 8, asym.data(), 8, 0.5, &options, w.data(), nullptr,
                                   nullptr, &loss) == OBC_ERR_INVALID_ARGUMENT);
  const Layer rank_deficient = make_layer(3, 8, 3, 5);  // 3 samples: rank 3 < 8
  obc_options undamped = options;
  undamped.damp = 0;
  CHECK(obc_prune_unstructured_f64(W, 3, 8, rank_deficient.hessian.data(), 8, 0.5, &undamped,
                                   w.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_NOT_POSITIVE_DEFINITE);
  CHECK(error_mentions("damp"));
  CHECK(unchanged());
}

OBC_TEST(interrupt_callback_stops_the_solve) {
  const Layer l = make_layer(8, 16, 100, 6);
  obc_options options = default_options();
  int calls = 0;
  options.interrupt = stop_after;
  options.interrupt_user_data = &calls;
  RowMatrixXd w = RowMatrixXd::Constant(8, 16, 7.0);
  CHECK(obc_prune_unstructured_f64(l.weight.data(), 8, 16, l.hessian.data(), 16, 0.5, &options,
                                   w.data(), nullptr, nullptr, nullptr) == OBC_ERR_INTERRUPTED);
  CHECK(calls >= 1);
  CHECK((w.array() == 7.0).all());
  CHECK(error_mentions("interrupted"));
  CHECK(obc_quantize_f64(l.weight.data(), 8, 16, l.hessian.data(), 16, nullptr, &options, w.data(),
                         nullptr, nullptr, nullptr, 0, nullptr, nullptr) == OBC_ERR_INTERRUPTED);
  calls = 0;
  options.interrupt = never_stop;
  CHECK(obc_prune_structured_f64(l.weight.data(), 8, 16, l.hessian.data(), 16, 0.5, 1, &options,
                                 w.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(calls >= 1);
}

OBC_TEST(deadline_interrupt_for_cpp_hosts) {
  const Layer l = make_layer(8, 16, 100, 7);
  DeadlineInterrupt expired(std::chrono::seconds(0));
  RunOptions run;
  run.interrupt = &expired;
  CHECK_THROWS(prune_unstructured<double>(l.weight, l.hessian, 0.5, Spread::Global, {}, run),
               Interrupted);
  DeadlineInterrupt generous(std::chrono::hours(1));
  run.interrupt = &generous;
  const auto r = prune_unstructured<double>(l.weight, l.hessian, 0.5, Spread::Global, {}, run);
  CHECK(r.weight == prune_unstructured<double>(l.weight, l.hessian, 0.5).weight);
}

OBC_TEST(last_error_is_per_thread) {
  CHECK(obc_accumulator_create(0, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  const std::string mine = obc_last_error();
  std::string theirs = "unset";
  std::thread worker([&] { theirs = obc_last_error(); });
  worker.join();
  CHECK(theirs.empty());
  CHECK(std::string(obc_last_error()) == mine);
  CHECK(!mine.empty());
}

// Finite weights too large for the precision: an error code, never a crash or NaN output. The
// float32 case used to read input -1 of a row (every score NaN) and crash.
template <class S, class Prune>
void check_overflow_rejected(S top, Prune&& call_all) {
  const std::vector<S> weight = {top, -top, top, top, -top, top, -top, -top};  // 1 x 8
  Eigen::MatrixXd identity = Eigen::MatrixXd::Identity(8, 8);
  call_all(weight.data(), identity.data());
}

OBC_TEST(too_large_weights_are_an_error) {
  obc_options options;
  obc_options_init(&options);
  obc_quant_options quant;
  obc_quant_options_init(&quant);
  quant.bits = 3;
  quant.sym = 0;
  quant.group_size = 4;
  std::vector<float> wf(8);
  std::vector<double> wd(8);
  double loss = 0;
  check_overflow_rejected<float>(std::numeric_limits<float>::max(), [&](const float* W,
                                                                       const double* H) {
    CHECK(obc_prune_unstructured_f32(W, 1, 8, H, 8, 0.5, &options, wf.data(), nullptr, nullptr,
                                     &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(error_mentions("too large for float32"));
    CHECK(obc_prune_nm_f32(W, 1, 8, H, 8, 2, 4, &options, wf.data(), nullptr, nullptr, &loss) ==
          OBC_ERR_INVALID_ARGUMENT);
    CHECK(obc_prune_blocked_f32(W, 1, 8, H, 8, 0.5, 2, &options, wf.data(), nullptr, nullptr,
                                &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(obc_prune_structured_f32(W, 1, 8, H, 8, 0.5, 2, &options, wf.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(obc_quantize_f32(W, 1, 8, H, 8, &quant, &options, wf.data(), nullptr, nullptr, nullptr,
                           0, nullptr, &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(error_mentions("too large for float32"));
  });
  check_overflow_rejected<double>(std::numeric_limits<double>::max() / 4, [&](const double* W,
                                                                              const double* H) {
    CHECK(obc_prune_unstructured_f64(W, 1, 8, H, 8, 0.5, &options, wd.data(), nullptr, nullptr,
                                     &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(error_mentions("too large for float64"));
    CHECK(obc_prune_nm_f64(W, 1, 8, H, 8, 2, 4, &options, wd.data(), nullptr, nullptr, &loss) ==
          OBC_ERR_INVALID_ARGUMENT);
    CHECK(obc_prune_blocked_f64(W, 1, 8, H, 8, 0.5, 2, &options, wd.data(), nullptr, nullptr,
                                &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(obc_prune_structured_f64(W, 1, 8, H, 8, 0.5, 2, &options, wd.data(), nullptr, nullptr,
                                   &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(obc_quantize_f64(W, 1, 8, H, 8, &quant, &options, wd.data(), nullptr, nullptr, nullptr,
                           0, nullptr, &loss) == OBC_ERR_INVALID_ARGUMENT);
    CHECK(error_mentions("too large for float64"));
  });
  // A 2^40 (float32) / 2^400 (float64) scale is fine: solved, finite.
  check_overflow_rejected<float>(std::ldexp(1.0f, 40), [&](const float* W, const double* H) {
    CHECK(obc_prune_unstructured_f32(W, 1, 8, H, 8, 0.5, &options, wf.data(), nullptr, nullptr,
                                     &loss) == OBC_OK);
    CHECK(std::isfinite(loss) && loss > 0);
  });
  check_overflow_rejected<double>(std::ldexp(1.0, 400), [&](const double* W, const double* H) {
    CHECK(obc_quantize_f64(W, 1, 8, H, 8, &quant, &options, wd.data(), nullptr, nullptr, nullptr,
                           0, nullptr, &loss) == OBC_OK);
    CHECK(std::isfinite(loss));
  });
}

// One C pruning call (f32 or f64 by S) with every output, for the SparseGPT comparisons.
template <class S>
struct CPruned {
  RowMatrix<S> weight;
  std::vector<uint8_t> kept;
  Eigen::VectorXd losses;
  double loss = 0;
  obc_status status = OBC_ERR_INTERNAL;

  CPruned(Index rows, Index cols)
      : weight(rows, cols), kept(static_cast<size_t>(rows * cols)), losses(rows) {}

  // Equal bit for bit to a C++ PruneResult.
  bool same_as(const PruneResult<S>& r) const {
    if (status != OBC_OK || weight != r.weight || losses != r.row_losses) return false;
    for (Index i = 0; i < r.pruned.size(); ++i)
      if (kept[static_cast<size_t>(i)] != (r.pruned.data()[i] == 0 ? 1 : 0)) return false;
    return loss == r.row_losses.sum();
  }
};

template <class S>
void check_sparsegpt_pruning(const Layer& l) {
  const RowMatrix<S> w = l.weight.cast<S>();
  const Index rows = w.rows(), cols = w.cols();
  obc_options options = default_options();
  options.prune_method = OBC_PRUNE_SPARSEGPT;
  options.lazy_block = 8;
  options.spread = OBC_SPREAD_UNIFORM;
  options.num_threads = 2;
  RunOptions run;
  run.num_threads = 2;
  SparseGptOptions opt;
  opt.lazy_block = 8;
  opt.spread = Spread::Uniform;

  auto call = [&](auto fn, auto... args) {
    CPruned<S> c(rows, cols);
    c.status = fn(w.data(), rows, cols, l.hessian.data(), cols, args..., &options, c.weight.data(),
                  c.kept.data(), c.losses.data(), &c.loss);
    return c;
  };
  opt.pattern = SparsePattern::Unstructured;
  opt.sparsity = 0.4;
  const auto unstructured = prune_sparsegpt<S>(w, l.hessian, opt, {}, run);
  // The exact method differs: the option really selects SparseGPT.
  const auto exact = prune_unstructured<S>(w, l.hessian, 0.4, Spread::Uniform);
  CHECK(unstructured.weight != exact.weight);
  if constexpr (std::is_same_v<S, float>) {
    CHECK(call(obc_prune_unstructured_f32, 0.4).same_as(unstructured));
  } else {
    CHECK(call(obc_prune_unstructured_f64, 0.4).same_as(unstructured));
  }

  opt.pattern = SparsePattern::Blocked;
  opt.block = 4;
  opt.sparsity = 0.5;
  const auto blocked = prune_sparsegpt<S>(w, l.hessian, opt, {}, run);
  opt.pattern = SparsePattern::NM;
  const auto nm = prune_sparsegpt<S>(w, l.hessian, opt, {}, run);  // n = 2, m = 4 by default
  if constexpr (std::is_same_v<S, float>) {
    CHECK(call(obc_prune_blocked_f32, 0.5, size_t{4}).same_as(blocked));
    CHECK(call(obc_prune_nm_f32, size_t{2}, size_t{4}).same_as(nm));
  } else {
    CHECK(call(obc_prune_blocked_f64, 0.5, size_t{4}).same_as(blocked));
    CHECK(call(obc_prune_nm_f64, size_t{2}, size_t{4}).same_as(nm));
  }
}

OBC_TEST(sparsegpt_pruning_matches_cpp_for_both_dtypes) {
  const Layer l = make_layer(10, 32, 400, 11);
  check_sparsegpt_pruning<float>(l);
  check_sparsegpt_pruning<double>(l);
}

template <class S>
void check_sparsegpt_joint(const Layer& l, Index n, Index m, double sparsity, Index block) {
  const RowMatrix<S> w = l.weight.cast<S>();
  const Index rows = w.rows(), cols = w.cols();
  obc_options options = default_options();
  options.lazy_block = 16;
  obc_quant_options quant;
  obc_quant_options_init(&quant);
  quant.bits = 3;
  quant.group_size = 8;
  quant.sym = 0;
  SparseGptOptions opt;
  opt.lazy_block = 16;
  opt.pattern = n > 0 ? SparsePattern::NM : block > 1 ? SparsePattern::Blocked
                                                      : SparsePattern::Unstructured;
  opt.sparsity = sparsity;
  opt.block = block;
  if (n > 0) {
    opt.n = n;
    opt.m = m;
  }
  QuantOptions qopt;
  qopt.bits = 3;
  qopt.group_size = 8;
  qopt.sym = false;
  const auto r = quantize_sparsegpt<S>(w, l.hessian, opt, qopt);
  const Index groups = cols / 8;
  RowMatrix<S> weight(rows, cols), scales(rows, groups);
  RowMatrix<uint8_t> codes(rows, cols), zeros(rows, groups);
  std::vector<uint8_t> kept(static_cast<size_t>(rows * cols));
  Eigen::VectorXd losses(rows);
  double loss = 0;
  obc_status status;
  if constexpr (std::is_same_v<S, float>) {
    status = obc_prune_quantize_sparsegpt_f32(
        w.data(), rows, cols, l.hessian.data(), cols, sparsity, block, n, m, &quant, &options,
        weight.data(), codes.data(), scales.data(), zeros.data(), rows * groups, kept.data(),
        losses.data(), &loss);
  } else {
    status = obc_prune_quantize_sparsegpt_f64(
        w.data(), rows, cols, l.hessian.data(), cols, sparsity, block, n, m, &quant, &options,
        weight.data(), codes.data(), scales.data(), zeros.data(), rows * groups, kept.data(),
        losses.data(), &loss);
  }
  CHECK(status == OBC_OK);
  CHECK(weight == r.weight && codes == r.codes);
  CHECK(scales == r.grid.scale && zeros == r.grid.zero);
  CHECK(losses == r.row_losses && loss == r.row_losses.sum());
  Index pruned = 0;
  for (Index i = 0; i < rows * cols; ++i) {
    CHECK(kept[static_cast<size_t>(i)] == (r.pruned.data()[i] == 0 ? 1 : 0));
    pruned += r.pruned.data()[i];
  }
  CHECK(pruned > 0);  // a real joint result: some weights pruned, the rest on the grid
}

OBC_TEST(sparsegpt_joint_matches_cpp) {
  const Layer l = make_layer(6, 32, 300, 12);
  check_sparsegpt_joint<float>(l, 0, 0, 0.5, 1);
  check_sparsegpt_joint<double>(l, 0, 0, 0.5, 1);
  check_sparsegpt_joint<float>(l, 0, 0, 0.25, 4);
  check_sparsegpt_joint<double>(l, 2, 4, 0.0, 1);
}

OBC_TEST(sparsegpt_bad_calls_return_codes) {
  const Layer l = make_layer(4, 16, 100, 13);
  obc_options options = default_options();
  RowMatrixXd out(4, 16);
  auto unstructured = [&] {
    return obc_prune_unstructured_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 0.5, &options,
                                      out.data(), nullptr, nullptr, nullptr);
  };
  options.prune_method = 2;
  CHECK(unstructured() == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("options.prune_method"));
  options.prune_method = OBC_PRUNE_SPARSEGPT;
  options.lazy_block = 0;
  CHECK(unstructured() == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("options.lazy_block"));
  options.lazy_block = 128;
  CHECK(unstructured() == OBC_OK);
  CHECK(obc_prune_structured_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 0.5, 1, &options,
                                 out.data(), nullptr, nullptr, nullptr) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("structured"));
  CHECK(obc_prune_blocked_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 0.5, 3, &options,
                              out.data(), nullptr, nullptr, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_prune_nm_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 4, 4, &options, out.data(),
                         nullptr, nullptr, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_prune_unstructured_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 1.5, &options,
                                   out.data(), nullptr, nullptr, nullptr) ==
        OBC_ERR_INVALID_ARGUMENT);

  // Joint: the pattern is a sparsity or N:M, never both or half of N:M.
  auto joint = [&](double sparsity, size_t block, size_t n, size_t m) {
    return obc_prune_quantize_sparsegpt_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, sparsity,
                                            block, n, m, nullptr, &options, out.data(), nullptr,
                                            nullptr, nullptr, 0, nullptr, nullptr, nullptr);
  };
  CHECK(joint(0.5, 1, 0, 0) == OBC_OK);
  CHECK(joint(0.0, 1, 2, 4) == OBC_OK);
  CHECK(joint(0.5, 1, 2, 0) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("n, m"));
  CHECK(joint(0.5, 1, 2, 4) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("sparsity, block"));
  CHECK(joint(0.5, 0, 0, 0) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("block"));
  CHECK(obc_prune_quantize_sparsegpt_f64(nullptr, 4, 16, l.hessian.data(), 16, 0.5, 1, 0, 0,
                                         nullptr, &options, out.data(), nullptr, nullptr, nullptr,
                                         0, nullptr, nullptr, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  RowMatrixXd scales(4, 1);
  CHECK(obc_prune_quantize_sparsegpt_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 0.5, 1, 0,
                                         0, nullptr, &options, out.data(), nullptr, scales.data(),
                                         nullptr, 3, nullptr, nullptr, nullptr) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("grid_size"));
}

// A lazy block wider than the layer is the whole layer in one block. It sized a rows x lazy_block
// buffer by the request before: OBC_ERR_OUT_OF_MEMORY for 2^40 on a 16-column layer.
OBC_TEST(sparsegpt_lazy_block_wider_than_the_layer) {
  const Layer l = make_layer(4, 16, 100, 14);
  obc_options options = default_options();
  options.prune_method = OBC_PRUNE_SPARSEGPT;
  RowMatrixXd whole(4, 16), wide(4, 16);
  RowMatrix<float> whole_f(4, 16), wide_f(4, 16);
  const RowMatrix<float> weight_f = l.weight.cast<float>();
  options.lazy_block = 16;
  CHECK(obc_prune_nm_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 2, 4, &options,
                         whole.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(obc_prune_blocked_f32(weight_f.data(), 4, 16, l.hessian.data(), 16, 0.5, 4, &options,
                              whole_f.data(), nullptr, nullptr, nullptr) == OBC_OK);
  for (const size_t lazy : {size_t{17}, size_t{1} << 40,
                            static_cast<size_t>(std::numeric_limits<std::int64_t>::max())}) {
    options.lazy_block = lazy;
    CHECK(obc_prune_nm_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 2, 4, &options,
                           wide.data(), nullptr, nullptr, nullptr) == OBC_OK);
    CHECK(wide == whole);
    CHECK(obc_prune_blocked_f32(weight_f.data(), 4, 16, l.hessian.data(), 16, 0.5, 4, &options,
                                wide_f.data(), nullptr, nullptr, nullptr) == OBC_OK);
    CHECK(wide_f == whole_f);
  }
}

OBC_TEST(options_struct_before_prune_method_means_exact) {
  // A host compiled against the header before prune_method / lazy_block passes the old size;
  // the library must not read past it and must run ExactOBS.
  const Layer l = make_layer(4, 16, 100, 14);
  struct {
    obc_options options;
    unsigned char guard[sizeof(obc_options)];
  } old;
  obc_options_init(&old.options);
  old.options.struct_size = static_cast<uint32_t>(offsetof(obc_options, prune_method));
  old.options.prune_method = 77;  // beyond the old struct: garbage that must be ignored
  old.options.lazy_block = 0;
  RowMatrixXd out(4, 16);
  CHECK(obc_prune_unstructured_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 0.5, &old.options,
                                   out.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(out == prune_unstructured<double>(l.weight, l.hessian, 0.5).weight);
  old.options.struct_size = static_cast<uint32_t>(offsetof(obc_options, lazy_block));
  CHECK(obc_prune_unstructured_f64(l.weight.data(), 4, 16, l.hessian.data(), 16, 0.5, &old.options,
                                   out.data(), nullptr, nullptr, nullptr) ==
        OBC_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("struct_size"));
}

OBC_TEST(float64_fallback_is_reported) {
  // damp = 0 on H with condition number 1e8 (eigenvalues 1 .. 1e-8 in a random basis): the float64
  // inverse is fine, the float32 greedy eliminations lose definiteness and are redone in float64.
  const Index rows = 16, cols = 256;
  std::mt19937_64 gen(3);
  std::normal_distribution<double> normal;
  const Eigen::MatrixXd a = Eigen::MatrixXd::NullaryExpr(cols, cols, [&] { return normal(gen); });
  const Eigen::MatrixXd q = Eigen::HouseholderQR<Eigen::MatrixXd>(a).householderQ();
  Eigen::VectorXd spectrum(cols);
  for (Index i = 0; i < cols; ++i) spectrum[i] = std::pow(10.0, -8.0 * i / (cols - 1));
  Eigen::MatrixXd h = q * spectrum.asDiagonal() * q.transpose();
  h = 0.5 * (h + h.transpose()).eval();
  const RowMatrix<float> w = RowMatrixXd::NullaryExpr(rows, cols, [&] { return normal(gen); })
                                 .cast<float>();
  const RowMatrixXd w64 = w.cast<double>();
  HessianOptions hopt;
  hopt.damp = 0;
  const auto cpp = prune_unstructured<float>(w, h, 0.5, Spread::Global, hopt);
  CHECK(cpp.float64_fallback);  // the problem really falls back
  obc_options options = default_options();
  options.damp = 0;
  RowMatrix<float> out(rows, cols);
  CHECK(obc_prune_unstructured_f32(w.data(), rows, cols, h.data(), cols, 0.5, &options, out.data(),
                                   nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(out == cpp.weight);
  CHECK(obc_last_float64_fallback() == 1);
  // The flag belongs to the last call: a float64 call, an error, and a well-conditioned float32
  // call each clear it.
  RowMatrixXd out64(rows, cols);
  CHECK(obc_prune_unstructured_f64(w64.data(), rows, cols, h.data(), cols, 0.5, &options,
                                   out64.data(), nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(obc_last_float64_fallback() == 0);
  CHECK(obc_prune_unstructured_f32(w.data(), rows, cols, h.data(), cols, 0.5, &options, out.data(),
                                   nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(obc_last_float64_fallback() == 1);
  CHECK(obc_prune_unstructured_f32(nullptr, rows, cols, h.data(), cols, 0.5, &options, out.data(),
                                   nullptr, nullptr, nullptr) == OBC_ERR_INVALID_ARGUMENT);
  CHECK(obc_last_float64_fallback() == 0);
  options.damp = 0.01;
  CHECK(obc_prune_unstructured_f32(w.data(), rows, cols, h.data(), cols, 0.5, &options, out.data(),
                                   nullptr, nullptr, nullptr) == OBC_OK);
  CHECK(obc_last_float64_fallback() == 0);
  // Quantization reports it too.
  options.damp = 0;
  const auto qcpp = quantize_select<float>(w, h, QuantOptions{}, QuantSelectOptions{}, hopt);
  CHECK(obc_quantize_f32(w.data(), rows, cols, h.data(), cols, nullptr, &options, out.data(),
                         nullptr, nullptr, nullptr, 0, nullptr, nullptr) == OBC_OK);
  CHECK(out == qcpp.weight);
  CHECK(qcpp.float64_fallback);
  CHECK(obc_last_float64_fallback() == 1);
}

OBC_TEST_MAIN
