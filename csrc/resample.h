// Bilinear resampling of a token grid, read on the fly: a target token is built from its source taps
// when it is needed, and the backward pass gathers into each source token. No resampled copy of an input
// is ever stored.
//
// Per axis, exactly as PyTorch's upsample_bilinear2d with align_corners=False (source size S, target T):
//   scale = S / T (in the accumulation type),  src = max(scale·(r + 0.5) − 0.5, 0),
//   i0 = ⌊src⌋,  i1 = min(i0 + 1, S − 1),  λ = src − i0,  x_r = (1 − λ)·x[i0] + λ·x[i1].
// A target token (r, c) of a row-major (H, W) grid is the separable 4-tap sum
//   x_rc = (1 − λ_r)·((1 − λ_c)·x[i0_r, i0_c] + λ_c·x[i0_r, i1_c]) + λ_r·((1 − λ_c)·x[i1_r, i0_c] + ...).
// The adjoint is a gather: source index s on an axis collects the targets r with i0_r = s (weight 1 − λ_r)
// or i1_r = s (weight λ_r). The lists are short and visited in a fixed order, so the backward needs no
// atomics and its sums are bit-reproducible.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace repa {

// Below this norm the normaliser x / max(‖x‖, eps) is a plain scaling (F.normalize's eps).
constexpr double kNormEps = 1e-12;

// One axis of the bilinear operator: the taps of each target index and, transposed, the targets that read
// each source index (compressed rows, zero weights dropped: an identity axis has exactly one entry each).
template <typename acc_t>
struct Axis {
  std::vector<int64_t> i0, i1;  // per target index
  std::vector<acc_t> w0, w1;
  std::vector<int64_t> start;   // per source index s: entries [start[s], start[s + 1])
  std::vector<int64_t> target;
  std::vector<acc_t> weight;

  Axis(int64_t source, int64_t target_size) {
    const acc_t scale = static_cast<acc_t>(source) / static_cast<acc_t>(target_size);
    std::vector<std::vector<std::pair<int64_t, acc_t>>> readers(source);
    for (int64_t r = 0; r < target_size; ++r) {
      const acc_t src = std::max(scale * (static_cast<acc_t>(r) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
      const int64_t lo = std::min(static_cast<int64_t>(src), source - 1);
      const int64_t hi = std::min(lo + 1, source - 1);
      const acc_t lambda = std::min(std::max(src - static_cast<acc_t>(lo), acc_t(0)), acc_t(1));
      i0.push_back(lo);
      i1.push_back(hi);
      w0.push_back(acc_t(1) - lambda);
      w1.push_back(lambda);
      // At the last source index both taps fall on it: one entry with the summed weight.
      if (hi == lo) {
        readers[lo].emplace_back(r, w0.back() + w1.back());
        continue;
      }
      if (w0.back() != acc_t(0)) readers[lo].emplace_back(r, w0.back());
      if (w1.back() != acc_t(0)) readers[hi].emplace_back(r, w1.back());
    }
    start.push_back(0);
    for (const auto& list : readers) {
      for (const auto& [r, w] : list) {
        target.push_back(r);
        weight.push_back(w);
      }
      start.push_back(static_cast<int64_t>(target.size()));
    }
  }
};

// One input of a loss: (B, N_s, D) contiguous tokens on their (H, W) grid, read as rows on the target grid
// in the accumulation type, and, when its gradient is wanted, the (B, N_s, D) gradient it receives.
template <typename acc_t>
struct Tokens {
  const void* data = nullptr;
  int64_t batch = 0, tokens = 0, dim = 0;
  int64_t source_h = 0, source_w = 0, target_h = 0, target_w = 0;
  bool identity = true;  // same grid: rows are read and written in place
  Axis<acc_t> rows, cols;
  void (*load_fn)(const Tokens&, int64_t, int64_t, acc_t*) = nullptr;

  void* grad = nullptr;  // set when the gradient is wanted
  void (*store_fn)(const acc_t*, void*, int64_t, int64_t) = nullptr;

  Tokens(const at::Tensor& x, std::vector<int64_t> grid, std::vector<int64_t> target_grid)
      : data(x.const_data_ptr()), batch(x.size(0)), tokens(x.size(1)), dim(x.size(2)),
        source_h(grid[0]), source_w(grid[1]), target_h(target_grid[0]), target_w(target_grid[1]),
        identity(grid == target_grid), rows(grid[0], target_grid[0]), cols(grid[1], target_grid[1]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "repa_tokens", [&] {
      load_fn = &load_row<scalar_t>;
      store_fn = &store_row<scalar_t>;
    });
  }

  int64_t target_tokens() const { return target_h * target_w; }

  // out[0:D] = the target token t of image b (interpolated unless the grid is the target grid).
  void load(int64_t b, int64_t t, acc_t* out) const { load_fn(*this, b, t, out); }

  // grad[b, s, :] = row, converted to the input's dtype.
  void store_grad(int64_t b, int64_t s, const acc_t* row) const { store_fn(row, grad, (b * tokens + s) * dim, dim); }

  // acc[0:D] = Σ over the target tokens t that read source token s of weight(s, t)·value(t), in a fixed
  // order; add(t, weight, acc) adds weight·value(t) to acc.
  template <typename AddTarget>
  void gather(int64_t s, acc_t* acc, const AddTarget& add) const {
    std::fill(acc, acc + dim, acc_t(0));
    const int64_t sr = s / source_w, sc = s % source_w;
    for (int64_t k = rows.start[sr]; k < rows.start[sr + 1]; ++k) {
      for (int64_t l = cols.start[sc]; l < cols.start[sc + 1]; ++l) {
        add(rows.target[k] * target_w + cols.target[l], rows.weight[k] * cols.weight[l], acc);
      }
    }
  }

 private:
  template <typename in_t>
  static void load_row(const Tokens& x, int64_t b, int64_t t, acc_t* out) {
    const int64_t dim = x.dim;
    const in_t* image = static_cast<const in_t*>(x.data) + b * x.tokens * dim;
    if (x.identity) {
      const in_t* row = image + t * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<acc_t>(row[d]);
      return;
    }
    const int64_t r = t / x.target_w, c = t % x.target_w;
    const acc_t wr0 = x.rows.w0[r], wr1 = x.rows.w1[r], wc0 = x.cols.w0[c], wc1 = x.cols.w1[c];
    const in_t* x00 = image + (x.rows.i0[r] * x.source_w + x.cols.i0[c]) * dim;
    const in_t* x01 = image + (x.rows.i0[r] * x.source_w + x.cols.i1[c]) * dim;
    const in_t* x10 = image + (x.rows.i1[r] * x.source_w + x.cols.i0[c]) * dim;
    const in_t* x11 = image + (x.rows.i1[r] * x.source_w + x.cols.i1[c]) * dim;
    for (int64_t d = 0; d < dim; ++d) {
      out[d] = wr0 * (wc0 * static_cast<acc_t>(x00[d]) + wc1 * static_cast<acc_t>(x01[d])) +
               wr1 * (wc0 * static_cast<acc_t>(x10[d]) + wc1 * static_cast<acc_t>(x11[d]));
    }
  }

  template <typename out_t>
  static void store_row(const acc_t* row, void* out, int64_t offset, int64_t dim) {
    out_t* dst = static_cast<out_t*>(out) + offset;
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<out_t>(row[d]);
  }
};

}  // namespace repa
