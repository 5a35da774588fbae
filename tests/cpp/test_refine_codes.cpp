// The refinement's per-code kernels (internal/refine_kernels.hpp: propose_codes, sweep_codes),
// every compiled copy this CPU runs (generic SSE2, AVX2, AVX-512), against plain per-row loops
// (the refinement's code before the kernels, built here without FMA contraction): bit for bit,
// on row counts that leave partial groups of lanes, odd sub-blocks and blocks, several grids per
// row, pruned inputs, float32 and float64 weights. Any difference would make the refinement's
// results depend on the CPU. Also: each copy's product gives a row the same bits however many
// whole chunks share the product (the refinement's work items).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "internal/grid_point.hpp"
#include "internal/refine_kernels.hpp"

namespace {

namespace k = obc::internal;
using k::KIndex;

std::vector<std::pair<const char*, const k::RefineKernels*>> copies() {
  std::vector<std::pair<const char*, const k::RefineKernels*>> out{
      {"generic", &k::refine_kernels_generic()}};
#if defined(OBC_TEST_AVX_COPIES) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.push_back({"avx2", &k::refine_kernels_avx2()});
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    out.push_back({"avx512", &k::refine_kernels_avx512()});
#endif
  return out;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// A layer of rows x cols codes on grids of group_size columns: weights on the grid, some pruned
// (0), upper an nb x nb upper triangle with a positive diagonal.
template <class S>
struct Layer {
  KIndex rows, cols, group_size, groups;
  int maxq;
  std::vector<S> weight, scale;
  std::vector<std::uint8_t> zero, pruned;
  Layer(KIndex rows_, KIndex cols_, KIndex group_size_, int bits, std::mt19937& rng)
      : rows(rows_), cols(cols_), group_size(group_size_), groups(cols_ / group_size_),
        maxq((1 << bits) - 1) {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    scale.resize(static_cast<size_t>(rows * groups));
    zero.resize(scale.size());
    for (size_t i = 0; i < scale.size(); ++i) {
      scale[i] = static_cast<S>(0.01 + 0.2 * unit(rng));
      zero[i] = static_cast<std::uint8_t>(unit(rng) * (maxq + 1) * 0.999);
    }
    weight.resize(static_cast<size_t>(rows * cols));
    pruned.resize(weight.size());
    for (KIndex r = 0; r < rows; ++r)
      for (KIndex c = 0; c < cols; ++c) {
        const size_t i = static_cast<size_t>(r * cols + c);
        pruned[i] = unit(rng) < 0.15;
        const int code = static_cast<int>(unit(rng) * (maxq + 1) * 0.999);
        const k::GridPoint<S> gp{scale[static_cast<size_t>(r * groups + c / group_size)],
                                 zero[static_cast<size_t>(r * groups + c / group_size)], maxq};
        weight[i] = pruned[i] ? S(0) : gp.value(code);
      }
  }
  k::GridPoint<S> at(KIndex r, KIndex c) const {
    const size_t g = static_cast<size_t>(r * groups + c / group_size);
    return {scale[g], static_cast<int>(zero[g]), maxq};
  }
};

template <class S>
void check_propose(std::mt19937& rng) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int trial = 0; trial < 40; ++trial) {
    const KIndex group_size = std::vector<KIndex>{3, 8, 16, 40}[trial % 4];
    const KIndex cols = group_size * (4 + trial % 5);
    const KIndex nb = std::min<KIndex>(cols, 5 + trial * 7 % 37);
    const KIndex b0 = (trial * 13) % (cols - nb + 1);
    const KIndex rows = 1 + trial % 19;  // 1 .. 19 rows: full and partial groups of 8 lanes
    Layer<S> layer(rows, cols, group_size, 2 + trial % 7, rng);
    std::vector<KIndex> live;
    for (KIndex r = 0; r < rows; ++r)
      if (trial % 3 != 0 || r % 2 == 0) live.push_back(r);
    const KIndex n = static_cast<KIndex>(live.size());
    std::vector<double> upper(static_cast<size_t>(nb * nb));
    for (KIndex i = 0; i < nb; ++i)
      for (KIndex j = i; j < nb; ++j)
        upper[static_cast<size_t>(i * nb + j)] = i == j ? 0.5 + unit(rng) : unit(rng) - 0.5;
    std::vector<double> x0(static_cast<size_t>(n * nb));
    for (KIndex j = 0; j < n; ++j)
      for (KIndex t = 0; t < nb; ++t)
        x0[static_cast<size_t>(j * nb + t)] =
            static_cast<double>(layer.weight[static_cast<size_t>(live[j] * cols + b0 + t)]) +
            0.3 * (unit(rng) - 0.5);
    const KIndex ld_errors = k::kMaxProposeSub;
    // The reference: rows one after the other, as quant_refine.cpp ran them.
    std::vector<double> x_ref = x0, changes_ref(x0.size()), errors_ref(static_cast<size_t>(n * ld_errors));
    std::vector<S> codes_ref(x0.size());
    std::vector<char> changed_ref(static_cast<size_t>(n), 0);
    for (KIndex s0 = 0; s0 < nb; s0 += k::kMaxProposeSub) {
      const KIndex ns = std::min(k::kMaxProposeSub, nb - s0);
      for (KIndex j = 0; j < n; ++j) {
        const KIndex r = live[j];
        double* x = x_ref.data() + j * nb;
        for (KIndex kk = s0; kk < s0 + ns; ++kk) {
          const KIndex c = b0 + kk;
          const size_t rc = static_cast<size_t>(r * cols + c);
          const S q = layer.pruned[rc] ? S(0) : layer.at(r, c).quantize(static_cast<S>(x[kk]));
          codes_ref[static_cast<size_t>(j * nb + kk)] = q;
          const double dk = static_cast<double>(q) - static_cast<double>(layer.weight[rc]);
          changes_ref[static_cast<size_t>(j * nb + kk)] = dk;
          changed_ref[static_cast<size_t>(j)] |= dk != 0.0;
          const double err = (x[kk] - static_cast<double>(q)) / upper[static_cast<size_t>(kk * nb + kk)];
          errors_ref[static_cast<size_t>(j * ld_errors + kk - s0)] = err;
          for (KIndex t = kk + 1; t < s0 + ns; ++t) x[t] -= err * upper[static_cast<size_t>(kk * nb + t)];
        }
      }
    }
    for (const auto& [name, kern] : copies()) {
      std::vector<double> x = x0, changes(x0.size()), errors(errors_ref.size());
      std::vector<S> codes(x0.size());
      std::vector<char> changed(static_cast<size_t>(n), 0);
      std::vector<KIndex> rows_of(live);
      for (KIndex s0 = 0; s0 < nb; s0 += k::kMaxProposeSub) {
        const k::ProposeRows<S> job{x.data(), upper.data(), nb, b0, s0,
                                    std::min(k::kMaxProposeSub, nb - s0), n, rows_of.data(),
                                    layer.weight.data(), layer.pruned.data(), cols,
                                    layer.scale.data(), layer.zero.data(), layer.groups,
                                    group_size, layer.maxq, codes.data(), changes.data(),
                                    errors.data(), ld_errors, changed.data()};
        if constexpr (std::is_same_v<S, float>)
          kern->propose_codes_f32(job);
        else
          kern->propose_codes_f64(job);
      }
      // errors: only the last sub-block's are compared (each sub-block overwrites them).
      const bool ok = same_bits(x, x_ref) && same_bits(codes, codes_ref) &&
                      same_bits(changes, changes_ref) && same_bits(changed, changed_ref);
      if (!ok) std::printf("  propose_codes, copy %s, trial %d\n", name, trial);
      CHECK(ok);
    }
  }
}

template <class S>
void check_sweep(std::mt19937& rng) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  KIndex total_moves = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const KIndex group_size = std::vector<KIndex>{5, 16, 33}[trial % 3];
    const KIndex cols = group_size * (3 + trial % 4);
    const KIndex nb = std::min<KIndex>(cols, 7 + trial * 11 % 41);
    const KIndex c0 = (trial * 5) % (cols - nb + 1);
    Layer<S> layer(2, cols, group_size, 2 + trial % 7, rng);
    const KIndex r = 1;
    // hd: symmetric with a dominant positive diagonal; g large enough that many codes move.
    std::vector<double> hd(static_cast<size_t>(cols * cols)), hdiag(static_cast<size_t>(cols));
    for (KIndex i = 0; i < cols; ++i)
      for (KIndex j = 0; j <= i; ++j) {
        const double v = i == j ? 1.0 + unit(rng) : 0.2 * (unit(rng) - 0.5);
        hd[static_cast<size_t>(i * cols + j)] = hd[static_cast<size_t>(j * cols + i)] = v;
      }
    for (KIndex i = 0; i < cols; ++i) hdiag[static_cast<size_t>(i)] = hd[static_cast<size_t>(i * cols + i)];
    std::vector<double> g0(static_cast<size_t>(nb));
    for (double& v : g0) v = 0.3 * (unit(rng) - 0.5);
    // The reference, as quant_refine.cpp's code_sweep ran it.
    std::vector<S> w_ref = layer.weight;
    std::vector<double> g_ref = g0, moved_ref;
    double objective_ref = 0.25;
    for (KIndex c = c0; c < c0 + nb; ++c) {
      if (layer.pruned[static_cast<size_t>(r * cols + c)]) continue;
      const k::GridPoint<S> gp = layer.at(r, c);
      const double hcc = hd[static_cast<size_t>(c * cols + c)];
      const double gc = g_ref[static_cast<size_t>(c - c0)];
      if (std::abs(gc) < 0.49 * static_cast<double>(gp.scale) * hcc) continue;
      S& w = w_ref[static_cast<size_t>(r * cols + c)];
      const int code = gp.code(w);
      const double current = static_cast<double>(w);
      const double ideal = static_cast<double>(code) - gc / (hcc * static_cast<double>(gp.scale));
      if (!std::isfinite(ideal)) continue;
      const double clamped = std::clamp(ideal, 0.0, static_cast<double>(layer.maxq));
      const int lo = static_cast<int>(std::floor(clamped));
      const int hi = std::min(lo + 1, layer.maxq);
      int best_code = code;
      double best_change = 0.0, best_delta = 0.0;
      for (const int candidate : {lo, hi}) {
        if (candidate == code) continue;
        const double delta = static_cast<double>(gp.value(candidate)) - current;
        const double change = delta * gc + 0.5 * delta * delta * hcc;
        if (change < best_change) {
          best_change = change;
          best_code = candidate;
          best_delta = delta;
        }
      }
      if (best_code == code) continue;
      w = gp.value(best_code);
      for (KIndex t = 0; t < nb; ++t) g_ref[static_cast<size_t>(t)] += best_delta * hd[static_cast<size_t>(c * cols + c0 + t)];
      moved_ref.push_back(static_cast<double>(c - c0));
      moved_ref.push_back(best_delta);
      objective_ref += best_change;
    }
    total_moves += static_cast<KIndex>(moved_ref.size() / 2);
    for (const auto& [name, kern] : copies()) {
      std::vector<S> w = layer.weight;
      std::vector<double> g = g0, deltas(static_cast<size_t>(nb)), moved;
      std::vector<KIndex> columns(static_cast<size_t>(nb));
      double objective = 0.25;
      const k::SweepRow<S> job{g.data(), hd.data(), cols, hdiag.data(), c0, nb,
                               w.data() + r * cols, layer.pruned.data() + r * cols,
                               layer.scale.data() + r * layer.groups,
                               layer.zero.data() + r * layer.groups, group_size, layer.maxq,
                               &objective, columns.data(), deltas.data()};
      KIndex moves;
      if constexpr (std::is_same_v<S, float>)
        moves = kern->sweep_codes_f32(job);
      else
        moves = kern->sweep_codes_f64(job);
      for (KIndex m = 0; m < moves; ++m) {
        moved.push_back(static_cast<double>(columns[static_cast<size_t>(m)]));
        moved.push_back(deltas[static_cast<size_t>(m)]);
      }
      const bool ok = same_bits(w, w_ref) && same_bits(g, g_ref) && same_bits(moved, moved_ref) &&
                      std::memcmp(&objective, &objective_ref, sizeof(double)) == 0;
      if (!ok) std::printf("  sweep_codes, copy %s, trial %d\n", name, trial);
      CHECK(ok);
    }
  }
  CHECK(total_moves >= 40);  // the trials do move codes (and skip most)
}

// The refinement's initial gradients and the scale refit's products are one product per work
// item of several 64-row chunks (refine_items, quant_refine.cpp), the items depending on the
// thread count: a row's floats must not depend on how many whole chunks share its product, nor
// where its chunk sits in it. Checked against one product per chunk, bit for bit, with depths
// that Eigen does and does not block; a partial chunk (37 rows) always has a product of its own.
void check_product_chunks(const char* name, const k::RefineKernels& kern, std::mt19937& rng) {
  constexpr KIndex kChunk = k::kRefineChunk, kWhole = 5, kRows = kWhole * kChunk + 37;
  std::normal_distribution<double> normal(0.0, 1.0);
  for (const auto& [depth, n] : std::vector<std::pair<KIndex, KIndex>>{
           {5, 5}, {100, 100}, {264, 264}, {1030, 150}, {2100, 200}}) {
    std::vector<double> a(static_cast<size_t>(kRows * depth)), b(static_cast<size_t>(n * depth));
    for (double& x : a) x = normal(rng);
    for (double& x : b) x = normal(rng);
    auto run = [&](KIndex first, KIndex count, std::vector<double>& c) {
      kern.product(a.data() + first * depth, depth, b.data(), n, count, n, depth,
                   c.data() + first * n, n);
    };
    std::vector<double> per_chunk(static_cast<size_t>(kRows * n));
    for (KIndex r0 = 0; r0 < kRows; r0 += kChunk)
      run(r0, std::min(kChunk, kRows - r0), per_chunk);
    for (const std::vector<KIndex>& starts : std::vector<std::vector<KIndex>>{
             {0, 5}, {0, 2, 5}, {0, 4, 5}, {0, 1, 4, 5}}) {
      std::vector<double> grouped(per_chunk.size(), -1.0);
      for (size_t i = 0; i + 1 < starts.size(); ++i)
        run(starts[i] * kChunk, (starts[i + 1] - starts[i]) * kChunk, grouped);
      run(kWhole * kChunk, kRows - kWhole * kChunk, grouped);
      if (!same_bits(grouped, per_chunk))
        std::fprintf(stderr, "%s: depth %td, %zu items: rows differ\n", name, depth,
                     starts.size() - 1);
      CHECK(same_bits(grouped, per_chunk));
    }
    if (depth == 2100) {
      // The check can fail: a product of one row (the plain loop, one sum over the whole depth)
      // differs from the same row in a blocked GEMM.
      std::vector<double> one(per_chunk.size(), 0.0);
      run(3, 1, one);
      CHECK(!std::equal(one.begin() + 3 * n, one.begin() + 4 * n, per_chunk.begin() + 3 * n));
    }
  }
}

}  // namespace

OBC_TEST(product_rows_do_not_depend_on_the_chunks_sharing_it) {
  std::mt19937 rng(13);
  for (const auto& [name, kern] : copies()) check_product_chunks(name, *kern, rng);
}

OBC_TEST(propose_codes_copies_match_the_row_by_row_loop) {
  std::mt19937 rng(11);
  check_propose<float>(rng);
  check_propose<double>(rng);
}

OBC_TEST(sweep_codes_copies_match_the_scalar_loop) {
  std::mt19937 rng(12);
  check_sweep<float>(rng);
  check_sweep<double>(rng);
}

OBC_TEST_MAIN
