// The fused losses' entry points, shared by cosine.cpp, manifold.cpp and bindings.cpp.
//
// acc_t is the accumulation type: float for fp32 / bf16 / fp16 inputs, double when an input is fp64 (so
// that gradcheck can run). Forward results are per-sample (B,) arrays; gradients are written through the
// Tokens' grad pointers (an input whose grad pointer is null gets none).
#pragma once

#include <cstdint>
#include <vector>

#include "resample.h"

namespace repa {

// How the manifold loss is computed (manifold.cpp): by (i, j) tiles of the similarity matrices, by the
// D×D Gram matrices, or whichever the cost model prefers.
enum class Method { Auto, Tiled, Gram };

// rows per block: the tile side of the tiled path and the row chunk of the Gram path.
constexpr int64_t kDefaultBlock = 256;

template <typename acc_t>
struct Inputs {
  Tokens<acc_t> h, y;
  int64_t batch, tokens, dim;  // tokens: N, on the target grid
  int64_t block;

  Inputs(const at::Tensor& h_, const at::Tensor& y_, const std::vector<int64_t>& h_grid,
         const std::vector<int64_t>& y_grid, const std::vector<int64_t>& target_grid, int64_t block_)
      : h(h_, h_grid, target_grid), y(y_, y_grid, target_grid), batch(h_.size(0)),
        tokens(target_grid[0] * target_grid[1]), dim(h_.size(2)), block(std::min(block_, tokens)) {}

  int64_t blocks() const { return (tokens + block - 1) / block; }
  int64_t rows_in(int64_t index) const { return std::min(block, tokens - index * block); }
};

// out[b] = −(1/N) Σ_t ĥ_bt·ŷ_bt
template <typename acc_t>
void cosine_forward(const Inputs<acc_t>& in, acc_t* out);

// Gradients of Σ_b grad[b]·out[b].
template <typename acc_t>
void cosine_backward(const Inputs<acc_t>& in, const acc_t* grad);

// manifold[b] = (1/N²) Σ_ij (ĥ_bi·ĥ_bj − ŷ_bi·ŷ_bj)²; alignment (when not null) as cosine_forward's out.
template <typename acc_t>
void manifold_forward(const Inputs<acc_t>& in, Method method, acc_t* alignment, acc_t* manifold);

// Gradients of Σ_b grad_alignment[b]·alignment[b] + grad_manifold[b]·manifold[b] (grad_alignment may be
// null: the manifold loss alone).
template <typename acc_t>
void manifold_backward(const Inputs<acc_t>& in, Method method, const acc_t* grad_alignment,
                       const acc_t* grad_manifold);

}  // namespace repa
