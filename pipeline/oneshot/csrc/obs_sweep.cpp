// SparseGPT's N:M column sweep (pipeline/oneshot/sparsegpt.py: obs_sweep, the Python loop it replaces on
// CPU), op for op: the same ATen calls on the same views in the same order, so masks and weights are
// bit-identical to the Python loop (tests/test_sparsegpt.py checks it). What it removes is Python
// between the ~15 small ops of every group of M columns: their dispatch cost, and Python's GIL,
// which the Python loop holds between ops so that a block's sweeps, run one per core, wait on
// each other. A call from Python releases the GIL for the whole sweep.
// Minimal headers (not torch/extension.h): the first-use build takes seconds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

// weight [out, in], U [in, in] (upper Cholesky factor of H^-1, float32 or float64) -> (keep bool
// [out, in], new weight [out, in] in U's dtype), both transposed views of [in, out] tensors, as
// obs_sweep returns.
std::tuple<at::Tensor, at::Tensor> obs_sweep(const at::Tensor& weight, const at::Tensor& U, int64_t n, int64_t m,
                                             int64_t blocksize) {
  const at::ScalarType dtype = U.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // Python: precise(U)
  at::Tensor WT = weight.detach().to(dtype).t().contiguous();  // row j of WT is column j of W
  const int64_t cols = WT.size(0);
  at::Tensor keepT = at::zeros_like(WT, WT.options().dtype(at::kBool));
  at::Tensor d = U.diagonal();
  at::Tensor d_sq = d.square().unsqueeze(1);
  at::Tensor inv_d = d.reciprocal().unsqueeze(1);  // Python's 1 / d is d.reciprocal() * 1
  for (int64_t i1 = 0; i1 < cols; i1 += blocksize) {
    const int64_t i2 = std::min(i1 + blocksize, cols), width = i2 - i1;
    at::Tensor W1 = WT.slice(0, i1, i2), U1 = U.slice(0, i1, i2).slice(1, i1, i2);
    at::Tensor Err1 = at::zeros_like(W1);
    // the in-group coefficients as Python's U1.tolist() gives them: doubles (exact for float32 U)
    at::Tensor U1c = U1.to(at::kDouble).contiguous();
    const double* u = U1c.const_data_ptr<double>();
    at::Tensor U1T = U1.t();
    std::vector<at::Tensor> rows = W1.unbind(0), errs = Err1.unbind(0);
    for (int64_t g1 = 0; g1 < width; g1 += m) {
      const int64_t g2 = std::min(g1 + m, width);
      at::Tensor W_g = W1.slice(0, g1, g2), keep_g = keepT.slice(0, i1 + g1, i1 + g2);
      if (g1) {  // the OBS updates of the block's earlier columns
        W_g.addmm_(U1T.slice(0, g1, g2).slice(1, 0, g1), Err1.slice(0, 0, g1), 1, -1);
      }
      at::Tensor score = W_g.square().div_(d_sq.slice(0, i1 + g1, i1 + g2));
      keep_g.scatter_(0, std::get<1>(score.topk(n, 0)), true);
      std::vector<at::Tensor> prune_over_d =
          at::where(keep_g, at::Scalar(0.0), inv_d.slice(0, i1 + g1, i1 + g2)).unbind(0);
      for (int64_t j = 0; j < g2 - g1; ++j) {
        at::mul_out(errs[g1 + j], rows[g1 + j], prune_over_d[j]);
        for (int64_t k = j + 1; k < g2 - g1; ++k) {
          rows[g1 + k].add_(errs[g1 + j], -u[(g1 + j) * width + g1 + k]);
        }
      }
    }
    WT.slice(0, i2).addmm_(U.slice(0, i1, i2).slice(1, i2).t(), Err1, 1, -1);
  }
  WT.masked_fill_(keepT.logical_not(), 0);  // +0.0, as obs_sweep
  return {keepT.t(), WT.t()};
}

}  // namespace

TORCH_LIBRARY(maskllm_sparsegpt, lib) {
  lib.def("obs_sweep(Tensor weight, Tensor U, int n, int m, int blocksize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(maskllm_sparsegpt, CPU, lib) { lib.impl("obs_sweep", &obs_sweep); }
