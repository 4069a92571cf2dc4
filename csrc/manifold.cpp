// U-REPA's manifold loss without any N×N matrix, and the fused U-REPA pair (alignment + manifold).
//
// Per image, with the unit target tokens P = Ĥ, Q = Ŷ (N × D) and Dm = PPᵀ − QQᵀ:
//   L_man = (1/N²) ‖Dm‖²_F,   ∂L/∂P = (4/N²) Dm P,   ∂L/∂Q = −(4/N²) Dm Q.
// Both paths below work with X = P + Q and Δ = P − Q, for which Dm = ½(XΔᵀ + ΔXᵀ): when h and y align,
// Δ is small and every product is small with it, instead of a difference of two large products. With
// Z = [X | Δ] and W = [Δ | X] (N × 2D), W_i·Z_jᵀ = 2 Dm_ij.
//
// Tiled (≈ N²·D multiply-adds a pass): tiles S = W_i Z_jᵀ of T × T rows, never more than one per thread.
//   The loss sums ¼ S² over the tiles j ≥ i (twice off the diagonal: Dm is symmetric); the backward
//   accumulates R_i = Σ_j S_ij [P_j | Q_j] = 2 [Dm P | Dm Q]_i over all j, in a fixed order.
// Gram (≈ N·D² a pass; chosen when N is large against D): M = ZᵀZ (2D × 2D; fp32 products of one block of
//   rows, summed over blocks in fp64), whose blocks are XX, XΔ, ΔΔ:
//     ‖Dm‖² = ½⟨XX, ΔΔ⟩ + ½⟨XΔ, (XΔ)ᵀ⟩,    R_i = W_i · ½[M_X + M_Δ | M_X − M_Δ]
//   (M_X, M_Δ: the column halves of M) — the same R as the tiled path, since Σ_j Z_jᵀ P_j = ½(M_X + M_Δ).
// Each row then finishes as G_h = (2 g_man/N²) R_P − (g_cos/N) ŷ, G_y = −(2 g_man/N²) R_Q − (g_cos/N) ĥ,
// and goes through the normaliser's backward and the transposed interpolation (units.h, resample.h).
// GEMMs are ATen's (MKL), called single-threaded inside at::parallel_for tasks whose partition does not
// depend on the thread count, and partial sums are reduced in a fixed order: results are bit-identical from
// run to run and whatever the number of threads.
#include <ATen/Parallel.h>

#include <array>
#include <optional>

#include "losses.h"
#include "units.h"

namespace repa {

namespace {

template <typename acc_t>
at::TensorOptions options() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

// Multiply-adds per image over forward + backward (h's gradient): tiled ≈ 4·N²·D, Gram ≈ 10·N·D². Measured
// with MKL on one AVX2 core (bench/cpu_cpp.py --calibrate) Gram's GEMMs run ~20% slower per multiply-add
// (thin panels), which moves the crossover from N = 2.5·D to N ≈ 3·D.
bool use_gram(Method method, int64_t n, int64_t dim) {
  if (method != Method::Auto) return method == Method::Gram;
  return n >= 3 * dim;
}

// One block of target rows [row0, row0 + count) of one image: unit rows [P | Q], their norms and cosines,
// and Z = [X | Δ] (or, swapped, W = [Δ | X]) for the GEMMs.
template <typename acc_t>
struct Block {
  at::Tensor pq, z;  // (T, 2D)
  std::vector<acc_t> norms, cosines;
  int64_t image = -1, index = -1, row0 = 0, count = 0;

  Block(int64_t rows, int64_t dim)
      : pq(at::empty({rows, 2 * dim}, options<acc_t>())), z(at::empty({rows, 2 * dim}, options<acc_t>())),
        norms(2 * rows), cosines(rows) {}

  bool holds(int64_t b, int64_t k) const { return image == b && index == k; }

  void load(const Inputs<acc_t>& in, int64_t b, int64_t k, bool swapped) {
    image = b;
    index = k;
    row0 = k * in.block;
    count = in.rows_in(k);
    const int64_t dim = in.dim;
    const acc_t* units = pq.data_ptr<acc_t>();
    load_units(in.h, in.y, b, row0, count, pq.data_ptr<acc_t>(), norms.data(), cosines.data());
    acc_t* out = z.data_ptr<acc_t>();
    for (int64_t r = 0; r < count; ++r, units += 2 * dim, out += 2 * dim) {
      acc_t* sum = out + (swapped ? dim : 0);
      acc_t* diff = out + (swapped ? 0 : dim);
      for (int64_t d = 0; d < dim; ++d) {
        sum[d] = units[d] + units[dim + d];
        diff[d] = units[d] - units[dim + d];
      }
    }
  }

  at::Tensor z_rows() const { return z.narrow(0, 0, count); }
  // The columns [first, last) of [P | Q].
  at::Tensor pq_rows(int64_t first, int64_t last) const { return pq.narrow(0, 0, count).narrow(1, first, last - first); }

  double cosine_sum() const {
    double sum = 0;
    for (int64_t r = 0; r < count; ++r) sum += cosines[r];
    return sum;
  }
};

// Σ x² in fp64 with four interleaved partial sums (fixed order).
template <typename acc_t>
double sum_squares(const acc_t* x, int64_t n) {
  double lane[4] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) lane[k] += static_cast<double>(x[i + k]) * static_cast<double>(x[i + k]);
  }
  for (; i < n; ++i) lane[0] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return (lane[0] + lane[2]) + (lane[1] + lane[3]);
}

// Turns R rows (R_P and/or R_Q, see the top) into gradient rows and hands them to the sinks.
template <typename acc_t>
struct Finish {
  const Inputs<acc_t>& in;
  const acc_t* grad_alignment;  // null: no alignment term
  const acc_t* grad_manifold;
  const GradSink<acc_t>* h;  // null when not wanted
  const GradSink<acc_t>* y;

  // The columns [first, last) of [P | Q] that R holds: P's when h is wanted, Q's when y is.
  int64_t first() const { return h ? 0 : in.dim; }
  int64_t last() const { return y ? 2 * in.dim : in.dim; }

  void operator()(const Block<acc_t>& blk, const acc_t* r, acc_t* g) const {
    const int64_t dim = in.dim, width = last() - first(), q_col = h ? dim : 0;
    const acc_t n = static_cast<acc_t>(in.tokens);
    const acc_t c_man = 2 * grad_manifold[blk.image] / (n * n);
    const acc_t c_cos = grad_alignment ? grad_alignment[blk.image] / n : acc_t(0);
    const acc_t* units = blk.pq.template const_data_ptr<acc_t>();
    for (int64_t row = 0; row < blk.count; ++row, r += width) {
      const acc_t* p = units + row * 2 * dim;
      const acc_t* q = p + dim;
      if (h) {
        for (int64_t d = 0; d < dim; ++d) g[d] = c_man * r[d] - c_cos * q[d];
        normalize_backward(g, p, blk.norms[2 * row], dim);
        h->put(blk.image, blk.row0 + row, g);
      }
      if (y) {
        for (int64_t d = 0; d < dim; ++d) g[d] = -c_man * r[q_col + d] - c_cos * p[d];
        normalize_backward(g, q, blk.norms[2 * row + 1], dim);
        y->put(blk.image, blk.row0 + row, g);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Tiled path.

template <typename acc_t>
void tiled_forward(const Inputs<acc_t>& in, std::vector<double>& cosine_sum, std::vector<double>& manifold_sum) {
  const int64_t blocks = in.blocks(), t = in.block;
  std::vector<std::array<int64_t, 3>> tiles;  // (image, i, j ≥ i): equal work, so a static split balances
  for (int64_t b = 0; b < in.batch; ++b) {
    for (int64_t i = 0; i < blocks; ++i) {
      for (int64_t j = i; j < blocks; ++j) tiles.push_back({b, i, j});
    }
  }
  std::vector<double> tile_sum(tiles.size()), diagonal_cosines(in.batch * blocks);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    Block<acc_t> wi(t, in.dim), zj(t, in.dim);
    at::Tensor buffer = at::empty({t * t}, options<acc_t>());
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, i, j] = tiles[task];
      if (!wi.holds(b, i)) wi.load(in, b, i, /*swapped=*/true);
      if (i == j) diagonal_cosines[b * blocks + i] = wi.cosine_sum();
      zj.load(in, b, j, /*swapped=*/false);
      at::Tensor tile = buffer.narrow(0, 0, wi.count * zj.count).view({wi.count, zj.count});
      at::mm_out(tile, wi.z_rows(), zj.z_rows().t());
      tile_sum[task] = (i == j ? 0.25 : 0.5) * sum_squares(tile.const_data_ptr<acc_t>(), tile.numel());
    }
  });
  for (size_t task = 0; task < tiles.size(); ++task) manifold_sum[tiles[task][0]] += tile_sum[task];
  for (int64_t k = 0; k < in.batch * blocks; ++k) cosine_sum[k / blocks] += diagonal_cosines[k];
}

template <typename acc_t>
void tiled_backward(const Inputs<acc_t>& in, const Finish<acc_t>& finish) {
  const int64_t blocks = in.blocks(), t = in.block, first = finish.first(), width = finish.last() - first;
  at::parallel_for(0, in.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Block<acc_t> wi(t, in.dim), zj(t, in.dim);
    at::Tensor buffer = at::empty({t * t}, options<acc_t>());
    at::Tensor r = at::empty({t, width}, options<acc_t>());
    std::vector<acc_t> g(in.dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i = task % blocks;
      wi.load(in, b, i, /*swapped=*/true);
      at::Tensor r_rows = r.narrow(0, 0, wi.count).zero_();
      for (int64_t j = 0; j < blocks; ++j) {
        zj.load(in, b, j, /*swapped=*/false);
        at::Tensor tile = buffer.narrow(0, 0, wi.count * zj.count).view({wi.count, zj.count});
        at::mm_out(tile, wi.z_rows(), zj.z_rows().t());
        r_rows.addmm_(tile, zj.pq_rows(first, first + width));
      }
      finish(wi, r_rows.const_data_ptr<acc_t>(), g.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Gram path.

constexpr int64_t kPanel = 64;  // columns of M per GEMM: a fixed partition, whatever the thread count

// M = ZᵀZ of image b in fp64 (2D × 2D). One parallel region: each thread owns a fixed range of column
// panels of M and streams every block of rows through them, loading each block once (the load costs ~5%
// of the panel products), so each entry of M is summed over the blocks in the same order on any number of
// threads. When cosine_sum is given, adds Σ_t ĥ_t·ŷ_t to it (from the thread that owns panel 0).
template <typename acc_t>
at::Tensor gram_matrix(const Inputs<acc_t>& in, int64_t b, double* cosine_sum) {
  const int64_t width = 2 * in.dim, panels = (width + kPanel - 1) / kPanel;
  at::Tensor m = at::zeros({width, width}, at::kDouble);
  double* m_data = m.data_ptr<double>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    Block<acc_t> blk(in.block, in.dim);
    at::Tensor buffer = at::empty({width * kPanel}, options<acc_t>());
    for (int64_t k = 0; k < in.blocks(); ++k) {
      blk.load(in, b, k, /*swapped=*/false);
      if (cosine_sum && begin == 0) *cosine_sum += blk.cosine_sum();
      const at::Tensor z = blk.z_rows();
      for (int64_t panel = begin; panel < end; ++panel) {
        const int64_t c0 = panel * kPanel, cols = std::min(kPanel, width - c0);
        at::Tensor part = buffer.narrow(0, 0, width * cols).view({width, cols});
        at::mm_out(part, z.t(), z.narrow(1, c0, cols));
        const acc_t* src = part.const_data_ptr<acc_t>();
        for (int64_t row = 0; row < width; ++row) {
          for (int64_t c = 0; c < cols; ++c) m_data[row * width + c0 + c] += src[row * cols + c];
        }
      }
    }
  });
  return m;
}

template <typename acc_t>
void gram_forward(const Inputs<acc_t>& in, std::vector<double>& cosine_sum, std::vector<double>& manifold_sum) {
  const int64_t dim = in.dim, width = 2 * dim;
  for (int64_t b = 0; b < in.batch; ++b) {
    const at::Tensor m = gram_matrix(in, b, &cosine_sum[b]);
    const double* mm = m.const_data_ptr<double>();
    double sum = 0;  // ½⟨XX, ΔΔ⟩ + ½⟨XΔ, (XΔ)ᵀ⟩
    for (int64_t a = 0; a < dim; ++a) {
      for (int64_t c = 0; c < dim; ++c) {
        sum += 0.5 * (mm[a * width + c] * mm[(dim + a) * width + dim + c] +
                      mm[a * width + dim + c] * mm[c * width + dim + a]);
      }
    }
    manifold_sum[b] = sum;
  }
}

template <typename acc_t>
void gram_backward(const Inputs<acc_t>& in, const Finish<acc_t>& finish) {
  const int64_t dim = in.dim, width = 2 * dim, first = finish.first(), cols = finish.last() - first;
  for (int64_t b = 0; b < in.batch; ++b) {
    const at::Tensor m = gram_matrix(in, b, nullptr);
    const double* mm = m.const_data_ptr<double>();
    // K = ½[M_X + M_Δ | M_X − M_Δ], restricted to the wanted halves: R = W·K.
    at::Tensor k = at::empty({width, cols}, options<acc_t>());
    acc_t* kk = k.data_ptr<acc_t>();
    for (int64_t row = 0; row < width; ++row) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t d = (first + c) % dim;
        const double sign = first + c < dim ? 1.0 : -1.0;  // P's half: M_X + M_Δ; Q's: M_X − M_Δ
        kk[row * cols + c] = static_cast<acc_t>(0.5 * (mm[row * width + d] + sign * mm[row * width + dim + d]));
      }
    }
    at::parallel_for(0, in.blocks(), 1, [&](int64_t begin, int64_t end) {
      Block<acc_t> wi(in.block, dim);
      at::Tensor r = at::empty({in.block, cols}, options<acc_t>());
      std::vector<acc_t> g(dim);
      for (int64_t i = begin; i < end; ++i) {
        wi.load(in, b, i, /*swapped=*/true);
        at::Tensor r_rows = r.narrow(0, 0, wi.count);
        at::mm_out(r_rows, wi.z_rows(), k);
        finish(wi, r_rows.const_data_ptr<acc_t>(), g.data());
      }
    });
  }
}

}  // namespace

template <typename acc_t>
void manifold_forward(const Inputs<acc_t>& in, Method method, acc_t* alignment, acc_t* manifold) {
  std::vector<double> cosine_sum(in.batch), manifold_sum(in.batch);
  if (use_gram(method, in.tokens, in.dim)) {
    gram_forward(in, cosine_sum, manifold_sum);
  } else {
    tiled_forward(in, cosine_sum, manifold_sum);
  }
  const double n = static_cast<double>(in.tokens);
  for (int64_t b = 0; b < in.batch; ++b) {
    if (alignment) alignment[b] = static_cast<acc_t>(-cosine_sum[b] / n);
    manifold[b] = static_cast<acc_t>(manifold_sum[b] / (n * n));
  }
}

template <typename acc_t>
void manifold_backward(const Inputs<acc_t>& in, Method method, const acc_t* grad_alignment,
                       const acc_t* grad_manifold) {
  std::optional<GradSink<acc_t>> h, y;
  if (in.h.grad) h.emplace(in.h);
  if (in.y.grad) y.emplace(in.y);
  if (!h && !y) return;
  const Finish<acc_t> finish{in, grad_alignment, grad_manifold, h ? &*h : nullptr, y ? &*y : nullptr};
  if (use_gram(method, in.tokens, in.dim)) {
    gram_backward(in, finish);
  } else {
    tiled_backward(in, finish);
  }
  if (h) h->finish();
  if (y) y->finish();
}

template void manifold_forward<float>(const Inputs<float>&, Method, float*, float*);
template void manifold_forward<double>(const Inputs<double>&, Method, double*, double*);
template void manifold_backward<float>(const Inputs<float>&, Method, const float*, const float*);
template void manifold_backward<double>(const Inputs<double>&, Method, const double*, const double*);

}  // namespace repa
