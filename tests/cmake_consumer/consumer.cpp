// Outside consumer of the installed package: one layer through the C++ API and the C API.
//
// Usage: obc_consumer [OUT_DIR]
// Accumulates a Hessian from activations in two shards, prunes (unstructured 50%, 2:4) and
// quantizes (4 bit) a layer through both APIs, and checks that they agree exactly and that the
// reported loss equals ||(W - W_hat) X^T||^2 / n. With OUT_DIR it also writes its inputs and the
// C API's results (.npy files, a Hessian file, manifest.json) for tests/python/test_hessian_io.py,
// which checks that the Python module gives the same results. Exit status 0 when all checks pass.
#include <obc/obc.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <obc/accumulator.hpp>
#include <obc/build_info.hpp>
#include <obc/errors.hpp>
#include <obc/hessian_io.hpp>
#include <obc/prune.hpp>
#include <obc/quant.hpp>
#include <string>
#include <vector>

using obc::Index;
using obc::RowMatrix;
using obc::RowMatrixXd;

namespace {

constexpr Index kRows = 16;
constexpr Index kCols = 32;
constexpr Index kSamples = 512;
constexpr Index kShard = 200;  // rows of X in the first shard
constexpr double kSparsity = 0.5;
constexpr double kDamp = 0.01;
constexpr int kBits = 4;

int g_failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "[ ok ]" : "[FAIL]", what.c_str());
  if (!ok) ++g_failures;
}

// splitmix64 + Box-Muller: the same numbers on every platform this test runs on.
class Normal {
 public:
  explicit Normal(std::uint64_t seed) : state_(seed) {}
  double operator()() {
    const double u1 = (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53;
    const double u2 = static_cast<double>(next() >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  std::uint64_t state_;
};

// Writes a C-order 2-D (or 1-D when cols < 0) .npy file, format version 1.0.
void write_npy(const std::string& path, const char* descr, const void* data, std::size_t item,
               Index rows, Index cols) {
  std::string shape = cols < 0 ? "(" + std::to_string(rows) + ",)"
                               : "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
  std::string header =
      std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const auto len = static_cast<std::uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  const Index count = cols < 0 ? rows : rows * cols;
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(item * count));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    ++g_failures;
  }
}

// ||(W - W_hat) X^T||^2 / n per row, straight from the activations (X is n x cols).
Eigen::VectorXd losses_from_activations(const RowMatrixXd& W, const RowMatrixXd& W_hat,
                                        const RowMatrix<float>& X) {
  const RowMatrixXd out = (W - W_hat) * X.cast<double>().transpose();
  return out.rowwise().squaredNorm() / static_cast<double>(X.rows());
}

bool close(const Eigen::VectorXd& a, const Eigen::VectorXd& b, double rtol) {
  return ((a - b).array().abs() <= rtol * b.array().abs().max(b.cwiseAbs().maxCoeff())).all();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string out_dir = argc > 1 ? argv[1] : "";
  std::printf("obc_native %s (C API %s), OpenMP %s\n", obc::build_info().version.c_str(),
              obc_version(), obc::build_info().openmp ? "on" : "off");
  check(obc::build_info().version == obc_version(), "C and C++ report the same version");

  Normal normal(2024);
  RowMatrixXd W(kRows, kCols);
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = normal();
  RowMatrix<float> X(kSamples, kCols);  // activation rows, correlated and shifted
  for (Index r = 0; r < kSamples; ++r) {
    const double common = normal();
    for (Index c = 0; c < kCols; ++c) {
      X(r, c) = static_cast<float>(normal() + 0.5 * common + 0.1 * static_cast<double>(c % 4));
    }
  }

  // --- Hessian: C++ shards merged; C API with the same batches; a file round trip.
  obc::HessianAccumulator first(kCols), second(kCols);
  first.add(X.topRows(kShard));
  second.add(X.bottomRows(kSamples - kShard));
  first.merge(second);
  const Eigen::MatrixXd H = first.hessian();
  const Eigen::MatrixXd H_direct =
      (2.0 / kSamples) * (X.cast<double>().transpose() * X.cast<double>());
  check((H - H_direct).cwiseAbs().maxCoeff() <= 1e-12 * H_direct.cwiseAbs().maxCoeff(),
        "merged shards equal 2/n X^T X");

  obc_accumulator* acc = nullptr;
  bool c_ok =
      obc_accumulator_create(kCols, &acc) == OBC_OK &&
      obc_accumulator_add_f32(acc, X.data(), kShard, kCols) == OBC_OK &&
      obc_accumulator_add_f32(acc, X.data() + kShard * kCols, kSamples - kShard, kCols) == OBC_OK;
  Eigen::MatrixXd H_c(kCols, kCols);
  c_ok = c_ok && obc_accumulator_hessian(acc, H_c.data(), kCols * kCols) == OBC_OK;
  check(c_ok, c_ok ? "C API accumulates" : std::string("C API accumulates: ") + obc_last_error());
  obc_accumulator_free(acc);
  // The C accumulator added both batches to one sum; C++ merged two sums: equal to rounding.
  check((H_c - H).cwiseAbs().maxCoeff() <= 1e-13 * H.cwiseAbs().maxCoeff(),
        "C API Hessian equals the C++ one");

  if (!out_dir.empty()) {
    const std::string path = out_dir + "/hessian.obchess";
    obc::save_hessian(path, first);
    obc_accumulator* loaded = nullptr;
    Eigen::MatrixXd H_file(kCols, kCols);
    const bool loaded_ok = obc_accumulator_load(path.c_str(), &loaded) == OBC_OK &&
                           obc_accumulator_hessian(loaded, H_file.data(), kCols * kCols) == OBC_OK;
    obc_accumulator_free(loaded);
    check(loaded_ok && H_file == H, "Hessian file written by C++ reads back exactly through C");
  }

  obc_options options;
  obc_options_init(&options);
  options.damp = kDamp;

  // --- Unstructured pruning.
  const auto pruned = obc::prune_unstructured<double>(W, H, kSparsity, obc::Spread::Global,
                                                      obc::HessianOptions{kDamp});
  RowMatrixXd prune_weight(kRows, kCols);
  RowMatrix<std::uint8_t> prune_kept(kRows, kCols);
  Eigen::VectorXd prune_losses(kRows);
  double prune_loss = -1;
  check(obc_prune_unstructured_f64(W.data(), kRows, kCols, H.data(), kCols, kSparsity, &options,
                                   prune_weight.data(), prune_kept.data(), prune_losses.data(),
                                   &prune_loss) == OBC_OK,
        "C API prunes");
  check(prune_weight == pruned.weight && prune_losses == pruned.row_losses,
        "C and C++ pruning agree exactly");
  const Index kept = prune_kept.cast<Index>().sum();
  check(kept == kRows * kCols / 2, "50% of the weights are pruned");
  check(close(prune_losses, losses_from_activations(W, prune_weight, X), 1e-9),
        "pruning loss equals ||(W - W_hat) X^T||^2 / n");
  // Magnitude pruning of the same count, without the OBS update, must lose more.
  std::vector<double> magnitudes(W.data(), W.data() + W.size());
  for (double& m : magnitudes) m = std::abs(m);
  std::nth_element(magnitudes.begin(), magnitudes.begin() + W.size() / 2, magnitudes.end());
  const double threshold = magnitudes[static_cast<std::size_t>(W.size() / 2)];
  const RowMatrixXd magnitude = (W.array().abs() < threshold).select(0.0, W);
  const double magnitude_loss = losses_from_activations(W, magnitude, X).sum();
  std::printf("unstructured 50%%: loss %.6g (magnitude pruning: %.6g)\n", prune_loss,
              magnitude_loss);
  check(prune_loss > 0 && prune_loss < magnitude_loss, "ExactOBS beats magnitude pruning");

  // --- 2:4 pruning.
  const auto nm = obc::prune_nm<double>(W, H, 2, 4, obc::HessianOptions{kDamp});
  RowMatrixXd nm_weight(kRows, kCols);
  Eigen::VectorXd nm_losses(kRows);
  check(obc_prune_nm_f64(W.data(), kRows, kCols, H.data(), kCols, 2, 4, &options, nm_weight.data(),
                         nullptr, nm_losses.data(), nullptr) == OBC_OK &&
            nm_weight == nm.weight && nm_losses == nm.row_losses,
        "2:4 pruning: C and C++ agree exactly");

  // --- 4-bit quantization.
  obc::QuantOptions qopt;
  qopt.bits = kBits;
  const auto quant = obc::quantize<double>(W, H, qopt, obc::HessianOptions{kDamp});
  obc_quant_options cq;
  obc_quant_options_init(&cq);
  cq.bits = kBits;
  cq.method = OBC_QUANT_OBQ;  // the greedy of obc::quantize, without refinement
  cq.refine_passes = 0;
  RowMatrixXd quant_weight(kRows, kCols), quant_scales(kRows, 1);
  RowMatrix<std::uint8_t> quant_codes(kRows, kCols), quant_zeros(kRows, 1);
  Eigen::VectorXd quant_losses(kRows);
  double quant_loss = -1;
  check(obc_quantize_f64(W.data(), kRows, kCols, H.data(), kCols, &cq, &options,
                         quant_weight.data(), quant_codes.data(), quant_scales.data(),
                         quant_zeros.data(), kRows, quant_losses.data(), &quant_loss) == OBC_OK,
        "C API quantizes");
  check(quant_weight == quant.weight && quant_codes == quant.codes &&
            quant_scales == quant.grid.scale && quant_zeros == quant.grid.zero &&
            quant_losses == quant.row_losses,
        "C and C++ quantization agree exactly");
  check(close(quant_losses, losses_from_activations(W, quant_weight, X), 1e-9),
        "quantization loss equals ||(W - W_hat) X^T||^2 / n");
  std::printf("4-bit OBQ: loss %.6g\n", quant_loss);

  // --- Errors come back as codes, never as exceptions or crashes.
  const obc_status wrong_size =
      obc_prune_nm_f64(W.data(), kRows, kCols, H.data(), kCols - 1, 2, 4, &options,
                       nm_weight.data(), nullptr, nullptr, nullptr);
  check(wrong_size == OBC_ERR_INVALID_ARGUMENT,
        std::string("wrong Hessian size is an error: ") + obc_last_error());
  obc::DeadlineInterrupt expired(std::chrono::seconds(0));
  obc::RunOptions run;
  run.interrupt = &expired;
  bool interrupted = false;
  try {
    obc::prune_unstructured<double>(W, H, kSparsity, obc::Spread::Global, {}, run);
  } catch (const obc::Interrupted&) {
    interrupted = true;
  }
  check(interrupted, "a passed deadline interrupts the C++ solver");

  if (!out_dir.empty()) {
    const auto p = [&](const char* name) { return out_dir + "/" + name; };
    write_npy(p("W.npy"), "<f8", W.data(), 8, kRows, kCols);
    write_npy(p("X.npy"), "<f4", X.data(), 4, kSamples, kCols);
    write_npy(p("H.npy"), "<f8", H.data(), 8, kCols, kCols);  // symmetric: layout-free
    write_npy(p("prune_weight.npy"), "<f8", prune_weight.data(), 8, kRows, kCols);
    write_npy(p("prune_kept.npy"), "|u1", prune_kept.data(), 1, kRows, kCols);
    write_npy(p("prune_row_losses.npy"), "<f8", prune_losses.data(), 8, kRows, -1);
    write_npy(p("nm_weight.npy"), "<f8", nm_weight.data(), 8, kRows, kCols);
    write_npy(p("quant_weight.npy"), "<f8", quant_weight.data(), 8, kRows, kCols);
    write_npy(p("quant_codes.npy"), "|u1", quant_codes.data(), 1, kRows, kCols);
    write_npy(p("quant_scales.npy"), "<f8", quant_scales.data(), 8, kRows, 1);
    write_npy(p("quant_zeros.npy"), "|u1", quant_zeros.data(), 1, kRows, 1);
    write_npy(p("quant_row_losses.npy"), "<f8", quant_losses.data(), 8, kRows, -1);
    std::ofstream manifest(p("manifest.json"));
    manifest << "{\"version\": \"" << obc_version() << "\", \"shard_rows\": " << kShard
             << ", \"sparsity\": " << kSparsity << ", \"damp\": " << kDamp
             << ", \"nm\": [2, 4], \"bits\": " << kBits
             << ", \"sym\": true, \"grid\": \"mse\", \"spread\": \"global\"}\n";
    check(static_cast<bool>(manifest), "outputs written to " + out_dir);
  }

  std::printf("%s\n", g_failures == 0 ? "all checks passed" : "FAILED");
  return g_failures == 0 ? 0 : 1;
}
