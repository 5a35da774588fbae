// Tests for obc/gptq.hpp, obc/quant_refine.hpp and obc/quant_select.hpp: fixed-order quantization,
// refinement of the codes, the per-row choice, and independence of the thread count and of the
// CPU's cache size.
#include "obc/gptq.hpp"

#include <tuple>

#include "check.hpp"
#include "obc/errors.hpp"
#include "obc/quant_refine.hpp"
#include "obc/quant_select.hpp"
#include "obc/sparsegpt.hpp"
#include "problems.hpp"

using namespace obc;

OBC_TEST(gptq_on_grid_keeps_zeros_and_beats_rtn) {
  auto p = obc_test::make_problem(70, 32, 128, 41);
  p.W(3, 5) = 0;
  p.W(66, 31) = 0;
  QuantOptions opt;
  opt.bits = 3;
  opt.group_size = 8;
  for (bool act_order : {true, false}) {
    GptqOptions gopt;
    gopt.act_order = act_order;
    gopt.block_size = 5;
    const auto q = quantize_gptq<double>(p.W, p.H, opt, gopt);
    CHECK(q.weight(3, 5) == 0.0 && q.weight(66, 31) == 0.0);
    CHECK(q.pruned(3, 5) == 1 && q.pruned(66, 31) == 1);
    for (Index r = 0; r < 70; ++r)
      for (Index c = 0; c < 32; ++c)
        CHECK(q.weight(r, c) == q.grid.scale(r, c / 8) * (q.codes(r, c) - q.grid.zero(r, c / 8)));
    CHECK(q.row_method[0] == static_cast<std::uint8_t>(act_order ? QuantMethod::Gptq
                                                                 : QuantMethod::GptqNatural));
    const auto rtn = quantize_rtn<double>(p.W, p.H, opt);
    CHECK(q.row_losses.sum() < rtn.row_losses.sum());
  }
}

OBC_TEST(refinement_never_increases_the_loss) {
  auto p = obc_test::make_problem(20, 24, 96, 42, 2.0);
  QuantOptions opt;
  opt.bits = 2;
  auto q = quantize_rtn<double>(p.W, p.H, opt);
  const Eigen::VectorXd before = q.row_losses;
  refine_quantized<double>(p.W, p.H, q);
  CHECK(q.row_losses_unrefined == before);
  CHECK((q.row_losses.array() <= before.array() * (1 + 1e-12)).all());
  CHECK(q.row_losses.sum() < 0.9 * before.sum());
  CHECK(q.refine_passes >= 1 && q.refine_passes <= 20);
  RefineOptions bad;
  bad.max_passes = -1;
  CHECK_THROWS(refine_quantized<double>(p.W, p.H, q, bad), InvalidArgument);
}

OBC_TEST(select_picks_the_lower_loss_per_row_for_any_thread_count) {
  auto p = obc_test::make_problem(150, 32, 128, 43, 1.0);
  for (Index c = 0; c < 32; c += 3) p.W(7, c) = 0;
  QuantOptions opt;
  opt.bits = 3;
  opt.sym = false;
  QuantSelectOptions sopt;  // OBQ and GPTQ, refined
  RunOptions one;
  one.num_threads = 1;
  const auto best = quantize_select<double>(p.W, p.H, opt, sopt, {}, one);
  for (int threads : {2, 3}) {
    RunOptions run;
    run.num_threads = threads;
    const auto again = quantize_select<double>(p.W, p.H, opt, sopt, {}, run);
    CHECK(again.weight == best.weight && again.row_losses == best.row_losses);
    CHECK(again.grid.scale == best.grid.scale);  // refitted scales, too
    CHECK(again.row_method == best.row_method && again.refine_passes == best.refine_passes);
  }
  for (QuantMethod m : {QuantMethod::Obq, QuantMethod::Gptq}) {
    QuantSelectOptions single = sopt;
    single.methods = {m};
    const auto alone = quantize_select<double>(p.W, p.H, opt, single, {}, one);
    CHECK((best.row_losses.array() <= alone.row_losses.array()).all());
    for (Index r = 0; r < 150; ++r)
      if (best.row_method[r] == static_cast<std::uint8_t>(m))
        CHECK(best.weight.row(r) == alone.weight.row(r) &&
              best.grid.scale.row(r) == alone.grid.scale.row(r));
  }
  // Without refinement a single candidate is that quantizer's own result.
  QuantSelectOptions obq_only;
  obq_only.methods = {QuantMethod::Obq};
  obq_only.refine.max_passes = 0;
  obq_only.refit_rounds = 0;
  CHECK(quantize_select<double>(p.W, p.H, opt, obq_only).weight ==
        quantize<double>(p.W, p.H, opt).weight);
  QuantSelectOptions empty;
  empty.methods = {};
  CHECK_THROWS(quantize_select<double>(p.W, p.H, opt, empty), InvalidArgument);
  QuantSelectOptions twice;
  twice.methods = {QuantMethod::Gptq, QuantMethod::Gptq};
  CHECK_THROWS(quantize_select<double>(p.W, p.H, opt, twice), InvalidArgument);
}

// Eigen cuts a product's inner dimension into panels sized from the L1 cache it detects, which
// changes the rounding of long dot products from one CPU model to the next. The solvers must not
// depend on it (a Ray worker on another CPU must reproduce a local run): their long sums are
// the core's own fixed-order kernels, and their Eigen products stay shallower than any panel.
// This fails if a solver starts summing through a deep Eigen product. The plain product at the
// start shows that the L1 setting does change such a product's bits here.
OBC_TEST(results_do_not_depend_on_the_l1_size_eigen_detected) {
  auto p = obc_test::make_problem(64, 1100, 1400, 47, 1.0);
  const RowMatrix<float> Wf = p.W.cast<float>();
  std::ptrdiff_t l1 = 0, l2 = 0, l3 = 0;
  Eigen::internal::manage_caching_sizes(Eigen::GetAction, &l1, &l2, &l3);
  QuantOptions opt;
  opt.bits = 4;
  opt.group_size = 100;
  SparseGptOptions sopt;
  sopt.sparsity = 0.5;
  Eigen::setCpuCacheSizes(32 * 1024, l2, l3);
  const Eigen::MatrixXd deep_base = p.W * p.H;  // depth 1100
  const auto base = std::make_tuple(quantize_select<double>(p.W, p.H, opt),
                                    quantize_select<float>(Wf, p.H, opt), prune_sparsegpt<float>(Wf, p.H, sopt));
  for (std::ptrdiff_t other : {std::ptrdiff_t{16 * 1024}, std::ptrdiff_t{64 * 1024}}) {
    Eigen::setCpuCacheSizes(other, l2, l3);
    const Eigen::MatrixXd deep = p.W * p.H;
    CHECK(deep != deep_base);  // the setting matters for a deep product
    const auto q64 = quantize_select<double>(p.W, p.H, opt);
    const auto q32 = quantize_select<float>(Wf, p.H, opt);
    const auto sparse = prune_sparsegpt<float>(Wf, p.H, sopt);
    CHECK(q64.weight == std::get<0>(base).weight && q64.row_losses == std::get<0>(base).row_losses);
    CHECK(q32.weight == std::get<1>(base).weight && q32.row_losses == std::get<1>(base).row_losses);
    CHECK(sparse.weight == std::get<2>(base).weight);
  }
  Eigen::setCpuCacheSizes(l1, l2, l3);
}

OBC_TEST_MAIN
