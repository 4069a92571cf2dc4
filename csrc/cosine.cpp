// REPA's cosine alignment, fused: resampling, normalisation and the cosine in one pass over the tokens;
// nothing of size N·D is stored, forward or backward.
//
//   L_b = −(1/N) Σ_t ĥ_t·ŷ_t        (ĥ_t, ŷ_t: unit target tokens, units.h)
//
// Backward, per target token, with u = h_t and v = y_t (resampled), c = ĥ_t·ŷ_t, r_u = 1/max(‖u‖, eps),
// r_v likewise, and g the upstream gradient of L_b: ∂L/∂ĥ_t = −(g/N) ŷ_t, and through the normaliser
//   ∂L/∂h_t = −(g/N)(ŷ − c ĥ)·r_u = A_h·(r_v v) + B_h·(r_u u),   A_h = −(g/N)·r_u,
//                                                              B_h = (g/N)·c·r_u   (0 when ‖u‖ ≤ eps),
// and symmetrically for y. Only these six scalars per target token are kept; the gather onto each source
// grid rebuilds u and v from their taps (4 taps each: cheap next to a stored N·D buffer) and scales them
// to unit rows first: a coefficient such as (g/N)·r_u·r_v would fall below fp32's normal range for
// tokens around 1e19.
#include <ATen/Parallel.h>

#include "losses.h"
#include "units.h"

namespace repa {

namespace {

// Runs visit(b, row0, count, pq, norms, cosines) on every block of unit target rows, in parallel.
template <typename acc_t, typename Visit>
void for_each_unit_block(const Inputs<acc_t>& in, const Visit& visit) {
  at::parallel_for(0, in.batch * in.blocks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pq(in.block * 2 * in.dim), norms(2 * in.block), cosines(in.block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / in.blocks(), index = task % in.blocks();
      const int64_t row0 = index * in.block, count = in.rows_in(index);
      load_units(in.h, in.y, b, row0, count, pq.data(), norms.data(), cosines.data());
      visit(task, b, row0, count, norms.data(), cosines.data());
    }
  });
}

}  // namespace

template <typename acc_t>
void cosine_forward(const Inputs<acc_t>& in, acc_t* out) {
  std::vector<double> partial(in.batch * in.blocks());
  for_each_unit_block(in, [&](int64_t task, int64_t, int64_t, int64_t count, const acc_t*, const acc_t* cosines) {
    double sum = 0;
    for (int64_t r = 0; r < count; ++r) sum += cosines[r];
    partial[task] = sum;
  });
  // Blocks are summed in a fixed order: the result does not depend on the number of threads.
  for (int64_t b = 0; b < in.batch; ++b) {
    double sum = 0;
    for (int64_t k = 0; k < in.blocks(); ++k) sum += partial[b * in.blocks() + k];
    out[b] = static_cast<acc_t>(-sum / static_cast<double>(in.tokens));
  }
}

template <typename acc_t>
void cosine_backward(const Inputs<acc_t>& in, const acc_t* grad) {
  const int64_t dim = in.dim, n = in.tokens;
  const acc_t eps = static_cast<acc_t>(kNormEps);
  // Per target token: r_u, r_v, A_h, B_h, A_y, B_y (see the top of the file).
  std::vector<acc_t> coef(in.batch * n * 6);
  for_each_unit_block(in, [&](int64_t, int64_t b, int64_t row0, int64_t count, const acc_t* norms,
                              const acc_t* cosines) {
    const acc_t g = grad[b] / static_cast<acc_t>(n);
    for (int64_t r = 0; r < count; ++r) {
      const acc_t nu = norms[2 * r], nv = norms[2 * r + 1], c = cosines[r];
      acc_t* k = coef.data() + ((b * n) + row0 + r) * 6;
      k[0] = acc_t(1) / std::max(nu, eps);
      k[1] = acc_t(1) / std::max(nv, eps);
      k[2] = -g * k[0];
      k[3] = nu > eps ? g * c * k[0] : acc_t(0);
      k[4] = -g * k[1];
      k[5] = nv > eps ? g * c * k[1] : acc_t(0);
    }
  });

  for (int side = 0; side < 2; ++side) {
    const Tokens<acc_t>& x = side == 0 ? in.h : in.y;
    if (x.grad == nullptr) continue;
    at::parallel_for(0, x.batch * x.tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(dim), u(dim), v(dim);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / x.tokens, s = i % x.tokens;
        x.gather(s, acc.data(), [&](int64_t t, acc_t w, acc_t* out) {
          in.h.load(b, t, u.data());
          in.y.load(b, t, v.data());
          const acc_t* k = coef.data() + ((b * n) + t) * 6;
          // h side: A_h·(r_v v) + B_h·(r_u u);  y side: A_y·(r_u u) + B_y·(r_v v). Each row is scaled to
          // unit length before its coefficient (the order keeps every factor in fp32's normal range).
          const acc_t* other = side == 0 ? v.data() : u.data();
          const acc_t* own = side == 0 ? u.data() : v.data();
          const acc_t r_own = k[side], r_other = k[1 - side];
          const acc_t a = w * k[2 + 2 * side], bb = w * k[3 + 2 * side];
          for (int64_t d = 0; d < dim; ++d) out[d] += a * (r_other * other[d]) + bb * (r_own * own[d]);
        });
        x.store_grad(b, s, acc.data());
      }
    });
  }
}

template void cosine_forward<float>(const Inputs<float>&, float*);
template void cosine_forward<double>(const Inputs<double>&, double*);
template void cosine_backward<float>(const Inputs<float>&, const float*);
template void cosine_backward<double>(const Inputs<double>&, const double*);

}  // namespace repa
