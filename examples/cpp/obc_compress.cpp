// obc_compress: a command-line C++ host of obc_native (no Python): Hessians from activation
// files, ExactOBS pruning and OBQ quantization of a weight matrix. See docs/cpp_hosts.md.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <obc/accumulator.hpp>
#include <obc/build_info.hpp>
#include <obc/errors.hpp>
#include <obc/hessian_io.hpp>
#include <obc/interrupt.hpp>
#include <obc/prune.hpp>
#include <obc/quant.hpp>
#include <optional>
#include <string>
#include <vector>

#include "npy.hpp"

namespace {

using obc::Index;
using obc::RowMatrix;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitTimeout = 3;

const char* kUsage = R"(usage:
  obc_compress accumulate --out H.obchess [--threads T] ACTS.npy [ACTS.npy ...]
      Hessian file from activation rows: each ACTS.npy is (n, cols) float32/float64
      (a conv layer: unfolded patches as rows).
  obc_compress merge --out H.obchess IN.obchess [IN.obchess ...]
      Exact merge of Hessian files written by separate processes.
  obc_compress info H.obchess
  obc_compress prune  --weight W.npy (--hessian H.obchess | --acts ACTS.npy [--acts ...]) --out OUT.npy
      (--sparsity S [--spread global|uniform] [--block B] | --nm N:M | --structured G --sparsity S)
      [--mask MASK.npy] [common options]
  obc_compress quantize --weight W.npy (--hessian H.obchess | --acts ACTS.npy [--acts ...]) --out OUT.npy
      --bits B [--asym] [--group-size G] [--grid mse|minmax]
      [--codes CODES.npy] [--scales SCALES.npy] [--zeros ZEROS.npy] [common options]
common options: --damp D (default 0.01)  --threads T (0 = all)  --timeout SECONDS
W.npy is (rows, cols) = (outputs, inputs), float32 or float64; results keep its dtype.
Exit status: 0 done, 1 error, 2 usage, 3 timeout.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// --name value options and positional arguments.
struct Args {
  std::map<std::string, std::vector<std::string>> options;
  std::vector<std::string> positional;

  bool has(const std::string& name) const { return options.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback = "") const {
    const auto it = options.find(name);
    return it == options.end() ? fallback : it->second.back();
  }
  std::string require(const std::string& name) const {
    if (!has(name)) throw UsageError("missing --" + name);
    return get(name);
  }
  double number(const std::string& name, double fallback) const {
    return has(name) ? to_number(get(name), "--" + name) : fallback;
  }
  double require_number(const std::string& name) const {
    return to_number(require(name), "--" + name);
  }
  static double to_number(const std::string& text, const std::string& what) {
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (end == text.c_str() || *end != '\0')
      throw UsageError(what + ": '" + text + "' is not a number");
    return v;
  }
  Index integer(const std::string& name, Index fallback) const {
    const double v = number(name, static_cast<double>(fallback));
    if (v != static_cast<double>(static_cast<Index>(v))) {
      throw UsageError("--" + name + ": not an integer");
    }
    return static_cast<Index>(v);
  }
};

Args parse(int argc, char** argv, int first) {
  static const char* kFlags[] = {"asym"};
  Args args;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      args.positional.push_back(a);
      continue;
    }
    const std::string name = a.substr(2);
    bool flag = false;
    for (const char* f : kFlags) flag = flag || name == f;
    if (flag) {
      args.options[name].push_back("1");
    } else if (i + 1 < argc) {
      args.options[name].push_back(argv[++i]);
    } else {
      throw UsageError(a + " needs a value");
    }
  }
  return args;
}

template <class S>
RowMatrix<S> to_matrix(const npy::Array& a, const std::string& name) {
  if (a.shape.size() != 2) throw UsageError(name + ": expected a 2-D array");
  RowMatrix<S> m(a.rows(), a.cols());
  if (a.descr == "<f4") {
    const auto* src = reinterpret_cast<const float*>(a.bytes.data());
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(src[i]);
  } else if (a.descr == "<f8") {
    const auto* src = reinterpret_cast<const double*>(a.bytes.data());
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(src[i]);
  } else {
    throw UsageError(name + ": expected float32 or float64, got " + a.descr);
  }
  return m;
}

void add_activations(obc::HessianAccumulator& acc, const npy::Array& a, const std::string& path) {
  if (a.shape.size() != 2) throw UsageError(path + ": expected (n, cols) activation rows");
  if (a.descr == "<f4") {
    acc.add(reinterpret_cast<const float*>(a.bytes.data()), a.rows(), a.cols());
  } else if (a.descr == "<f8") {
    acc.add(reinterpret_cast<const double*>(a.bytes.data()), a.rows(), a.cols());
  } else {
    throw UsageError(path + ": expected float32 or float64 activations, got " + a.descr);
  }
}

obc::AccumulatorOptions accumulator_options(const Args& args) {
  obc::AccumulatorOptions options;
  options.num_threads = static_cast<int>(args.integer("threads", 0));
  return options;
}

obc::HessianAccumulator accumulate(const std::vector<std::string>& paths, const Args& args) {
  if (paths.empty()) throw UsageError("no activation files");
  std::optional<obc::HessianAccumulator> acc;
  for (const std::string& path : paths) {
    const npy::Array a = npy::read(path);
    if (!acc) acc.emplace(a.cols(), accumulator_options(args));
    add_activations(*acc, a, path);
  }
  return std::move(*acc);
}

// The layer Hessian from --hessian FILE or from --acts files.
Eigen::MatrixXd layer_hessian(const Args& args) {
  if (args.has("hessian") == args.has("acts")) {
    throw UsageError("give exactly one of --hessian H.obchess or --acts ACTS.npy");
  }
  if (args.has("hessian")) return obc::load_hessian(args.get("hessian")).hessian();
  return accumulate(args.options.at("acts"), args).hessian();
}

void write_matrix(const std::string& path, const RowMatrix<float>& m) {
  npy::write(path, "<f4", {m.rows(), m.cols()}, m.data());
}
void write_matrix(const std::string& path, const RowMatrix<double>& m) {
  npy::write(path, "<f8", {m.rows(), m.cols()}, m.data());
}
void write_matrix(const std::string& path, const RowMatrix<std::uint8_t>& m) {
  npy::write(path, "|u1", {m.rows(), m.cols()}, m.data());
}

template <class S>
int prune(const Args& args, const RowMatrix<S>& W, const Eigen::MatrixXd& H, obc::RunOptions run) {
  const obc::HessianOptions hopt{args.number("damp", 0.01)};
  const std::string spread_name = args.get("spread", "global");
  if (spread_name != "global" && spread_name != "uniform") {
    throw UsageError("--spread: expected global or uniform");
  }
  const obc::Spread spread = spread_name == "global" ? obc::Spread::Global : obc::Spread::Uniform;
  obc::PruneResult<S> r;
  std::string mode;
  if (args.has("nm")) {
    const std::string nm = args.get("nm");
    const std::size_t colon = nm.find(':');
    if (colon == std::string::npos) throw UsageError("--nm: expected N:M, e.g. 2:4");
    const auto n = static_cast<Index>(Args::to_number(nm.substr(0, colon), "--nm N"));
    const auto m = static_cast<Index>(Args::to_number(nm.substr(colon + 1), "--nm M"));
    r = obc::prune_nm<S>(W, H, n, m, hopt, run);
    mode = "N:M " + nm;
  } else if (args.has("structured")) {
    const double sparsity = args.require_number("sparsity");
    r = obc::prune_structured<S>(W, H, sparsity, args.integer("structured", 1), hopt, run);
    mode = "structured, groups of " + args.get("structured") + " columns, sparsity " +
           args.get("sparsity");
  } else if (args.has("block")) {
    const double sparsity = args.require_number("sparsity");
    r = obc::prune_blocked<S>(W, H, sparsity, args.integer("block", 1), spread, hopt, run);
    mode = "blocks of " + args.get("block") + ", sparsity " + args.get("sparsity");
  } else {
    const double sparsity = args.require_number("sparsity");
    r = obc::prune_unstructured<S>(W, H, sparsity, spread, hopt, run);
    mode = "unstructured, sparsity " + args.get("sparsity") + " (" + spread_name + ")";
  }
  write_matrix(args.require("out"), r.weight);
  if (args.has("mask")) {
    const RowMatrix<std::uint8_t> kept = (r.pruned.array() == 0).template cast<std::uint8_t>();
    write_matrix(args.get("mask"), kept);
  }
  const Index zeros = r.pruned.template cast<Index>().sum();
  std::printf("pruned %s: %lld of %lld weights zero, loss %.6g (damp %g, lambda %.3g)\n",
              mode.c_str(), static_cast<long long>(zeros), static_cast<long long>(W.size()),
              r.row_losses.sum(), r.damp, r.damp_absolute);
  return 0;
}

template <class S>
int quantize(const Args& args, const RowMatrix<S>& W, const Eigen::MatrixXd& H,
             obc::RunOptions run) {
  obc::QuantOptions opt;
  opt.bits = static_cast<int>(args.integer("bits", -1));
  if (opt.bits < 0) throw UsageError("missing --bits");
  opt.sym = !args.has("asym");
  opt.group_size = args.integer("group-size", 0);
  const std::string grid = args.get("grid", "mse");
  if (grid != "mse" && grid != "minmax") throw UsageError("--grid: expected mse or minmax");
  opt.grid = grid == "mse" ? obc::GridSearch::Mse : obc::GridSearch::MinMax;
  const auto r = obc::quantize<S>(W, H, opt, obc::HessianOptions{args.number("damp", 0.01)}, run);
  write_matrix(args.require("out"), r.weight);
  if (args.has("codes")) write_matrix(args.get("codes"), r.codes);
  if (args.has("scales")) write_matrix(args.get("scales"), r.grid.scale);
  if (args.has("zeros")) write_matrix(args.get("zeros"), r.grid.zero);
  std::printf("quantized to %d bits (%s, %s grid, group %lld): loss %.6g (damp %g)\n", opt.bits,
              opt.sym ? "symmetric" : "asymmetric", grid.c_str(),
              static_cast<long long>(r.grid.group_size), r.row_losses.sum(), r.damp);
  return 0;
}

int solve(const std::string& command, const Args& args) {
  const npy::Array weight = npy::read(args.require("weight"));
  const Eigen::MatrixXd H = layer_hessian(args);
  obc::RunOptions run;
  run.num_threads = static_cast<int>(args.integer("threads", 0));
  // A C++ host's timeout: the core polls the hook between rows and throws obc::Interrupted.
  std::unique_ptr<obc::DeadlineInterrupt> deadline;
  if (args.has("timeout")) {
    deadline = std::make_unique<obc::DeadlineInterrupt>(
        std::chrono::duration_cast<obc::DeadlineInterrupt::Clock::duration>(
            std::chrono::duration<double>(args.number("timeout", 0))));
    run.interrupt = deadline.get();
  }
  const auto start = std::chrono::steady_clock::now();
  int status;
  if (weight.descr == "<f4") {
    const RowMatrix<float> W = to_matrix<float>(weight, "--weight");
    status = command == "prune" ? prune<float>(args, W, H, run) : quantize<float>(args, W, H, run);
  } else {
    const RowMatrix<double> W = to_matrix<double>(weight, "--weight");
    status =
        command == "prune" ? prune<double>(args, W, H, run) : quantize<double>(args, W, H, run);
  }
  const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
  std::printf("%.3f s, wrote %s\n", took.count(), args.get("out").c_str());
  return status;
}

int run(int argc, char** argv) {
  if (argc < 2) throw UsageError("missing command");
  const std::string command = argv[1];
  const Args args = parse(argc, argv, 2);
  if (command == "accumulate") {
    const obc::HessianAccumulator acc = accumulate(args.positional, args);
    obc::save_hessian(args.require("out"), acc);
    std::printf("%lld samples of width %lld -> %s\n", static_cast<long long>(acc.count()),
                static_cast<long long>(acc.cols()), args.get("out").c_str());
    return 0;
  }
  if (command == "merge") {
    if (args.positional.empty()) throw UsageError("no Hessian files to merge");
    obc::HessianAccumulator acc = obc::load_hessian(args.positional.front());
    for (std::size_t i = 1; i < args.positional.size(); ++i) {
      acc.merge(obc::load_hessian(args.positional[i]));
    }
    obc::save_hessian(args.require("out"), acc);
    std::printf("merged %zu files: %lld samples -> %s\n", args.positional.size(),
                static_cast<long long>(acc.count()), args.get("out").c_str());
    return 0;
  }
  if (command == "info") {
    if (args.positional.size() != 1) throw UsageError("info takes one Hessian file");
    const obc::HessianFileInfo info = obc::read_hessian_info(args.positional.front());
    std::printf("format version %u, cols %lld, samples %llu, %llu bytes\n", info.version,
                static_cast<long long>(info.cols), static_cast<unsigned long long>(info.count),
                static_cast<unsigned long long>(info.file_bytes));
    return 0;
  }
  if (command == "prune" || command == "quantize") return solve(command, args);
  if (command == "--help" || command == "-h" || command == "help") {
    std::printf("%s", kUsage);
    return 0;
  }
  if (command == "--version") {
    std::printf("obc_native %s\n", obc::build_info().version.c_str());
    return 0;
  }
  throw UsageError("unknown command '" + command + "'");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "obc_compress: %s\n\n%s", e.what(), kUsage);
    return kExitUsage;
  } catch (const obc::Interrupted&) {
    std::fprintf(stderr, "obc_compress: timed out (--timeout); nothing written\n");
    return kExitTimeout;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "obc_compress: %s\n", e.what());
    return kExitError;
  }
}
