// Unit tokens on the target grid and the normaliser's backward, shared by every loss.
//
//   ĥ_t = h_t / max(‖h_t‖, eps)        (h_t: the resampled target token, F.normalize's formula)
//   ∂L/∂h_t = (G − (G·ĥ_t) ĥ_t) / max(‖h_t‖, eps),   G = ∂L/∂ĥ_t   (below eps: G / eps, a plain scaling)
//
// Rows are produced in blocks, in fp32 (fp64 for fp64 inputs), when a loss needs them; the finished
// gradient of a target row goes either straight to the input's gradient (same grid) or to a staging
// buffer that the transposed interpolation then gathers from.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "resample.h"

namespace repa {

// Σ a[d]·b[d] with eight interleaved partial sums: vectorisable, and the order is fixed (deterministic).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t lane[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int k = 0; k < 8; ++k) lane[k] += a[d + k] * b[d + k];
  }
  for (; d < n; ++d) lane[0] += a[d] * b[d];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// ‖row[0:n]‖. Where the sum of squares overflows (elements around 1e19 in fp32), again with the row's
// max-abs taken out first, so that the norm, and the unit row, stay right at any scale.
template <typename acc_t>
inline acc_t row_norm(const acc_t* row, int64_t n) {
  const acc_t squares = dot(row, row, n);
  if (std::isfinite(squares)) return std::sqrt(squares);
  acc_t scale = 0;
  for (int64_t d = 0; d < n; ++d) scale = std::max(scale, std::abs(row[d]));
  if (!std::isfinite(scale)) return scale;  // an inf element: nothing to rescue (a NaN leaves squares NaN)
  acc_t scaled = 0;
  for (int64_t d = 0; d < n; ++d) scaled += (row[d] / scale) * (row[d] / scale);
  return scale * std::sqrt(scaled);
}

// Scales row[0:n] to unit length in place; returns the norm it had.
template <typename acc_t>
inline acc_t normalize(acc_t* row, int64_t n) {
  const acc_t norm = row_norm(row, n);
  const acc_t denom = std::max(norm, static_cast<acc_t>(kNormEps));
  for (int64_t d = 0; d < n; ++d) row[d] /= denom;
  return norm;
}

// g ← ∂L/∂x from g = ∂L/∂x̂, given the unit row x̂ and ‖x‖.
template <typename acc_t>
inline void normalize_backward(acc_t* g, const acc_t* unit, acc_t norm, int64_t n) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  if (norm > eps) {
    const acc_t along = dot(g, unit, n);
    for (int64_t d = 0; d < n; ++d) g[d] -= along * unit[d];
  }
  const acc_t denom = std::max(norm, eps);
  for (int64_t d = 0; d < n; ++d) g[d] /= denom;
}

// Target rows [row0, row0 + count) of image b as unit tokens, [ĥ | ŷ] per row (count × 2D, row-major),
// with the norms they had (count × 2: ‖h_t‖, ‖y_t‖) and the cosines ĥ_t·ŷ_t (count).
template <typename acc_t>
void load_units(const Tokens<acc_t>& h, const Tokens<acc_t>& y, int64_t b, int64_t row0, int64_t count,
                acc_t* pq, acc_t* norms, acc_t* cosines) {
  const int64_t dim = h.dim;
  for (int64_t r = 0; r < count; ++r) {
    acc_t* p = pq + r * 2 * dim;
    acc_t* q = p + dim;
    h.load(b, row0 + r, p);
    y.load(b, row0 + r, q);
    norms[2 * r] = normalize(p, dim);
    norms[2 * r + 1] = normalize(q, dim);
    cosines[r] = dot(p, q, dim);
  }
}

// Where the finished gradient rows of one input go: straight into its gradient when its grid is the
// target grid, else into a (B, N_t, D) staging buffer that finish() gathers onto the input's own grid.
template <typename acc_t>
struct GradSink {
  const Tokens<acc_t>& x;
  at::Tensor staging;

  explicit GradSink(const Tokens<acc_t>& tokens) : x(tokens) {
    if (!x.identity) {
      staging = at::empty({x.batch, x.target_tokens(), x.dim},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
  }

  void put(int64_t b, int64_t t, const acc_t* row) const {
    if (x.identity) {
      x.store_grad(b, t, row);
      return;
    }
    acc_t* dst = staging.data_ptr<acc_t>() + (b * x.target_tokens() + t) * x.dim;
    std::copy(row, row + x.dim, dst);
  }

  // The transposed interpolation, one source token per step: a gather, no atomics.
  void finish() const {
    if (x.identity) return;
    const acc_t* rows = staging.const_data_ptr<acc_t>();
    const int64_t dim = x.dim, targets = x.target_tokens();
    at::parallel_for(0, x.batch * x.tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(dim);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / x.tokens, s = i % x.tokens;
        x.gather(s, acc.data(), [&](int64_t t, acc_t w, acc_t* out) {
          const acc_t* g = rows + (b * targets + t) * dim;
          for (int64_t d = 0; d < dim; ++d) out[d] += w * g[d];
        });
        x.store_grad(b, s, acc.data());
      }
    });
  }
};

}  // namespace repa
