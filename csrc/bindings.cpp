// Python bindings of the fused CPU losses (module repa_fused._C): argument checks, dtype dispatch, and the
// (T, B) layout that repa_fused.ops expects (T = 1 for cosine / manifold, 2 for urepa: alignment, manifold).
#include <torch/extension.h>

#include <string>

#include "losses.h"

namespace repa {
namespace {

int64_t terms_of(const std::string& op) {
  if (op == "cosine" || op == "manifold") return 1;
  if (op == "urepa") return 2;
  TORCH_CHECK(false, "op must be 'cosine', 'manifold' or 'urepa', got '", op, "'");
}

Method parse_method(const std::string& method) {
  if (method == "auto") return Method::Auto;
  if (method == "tiled") return Method::Tiled;
  if (method == "gram") return Method::Gram;
  TORCH_CHECK(false, "method must be 'auto', 'tiled' or 'gram', got '", method, "'");
}

void check_grid(const char* name, const std::vector<int64_t>& grid, int64_t tokens) {
  TORCH_CHECK(grid.size() == 2 && grid[0] > 0 && grid[1] > 0, name, " must be a pair of positive ints (H, W)");
  TORCH_CHECK(tokens < 0 || grid[0] * grid[1] == tokens, name, "=(", grid[0], ", ", grid[1], ") has ",
              grid[0] * grid[1], " cells but the tokens number ", tokens);
}

void check_inputs(const at::Tensor& h, const at::Tensor& y, const std::vector<int64_t>& h_grid,
                  const std::vector<int64_t>& y_grid, const std::vector<int64_t>& target_grid) {
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"h", h}, {"y", y}}) {
    TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got ", x.device());
    TORCH_CHECK(x.dim() == 3, name, " must be 3-D (B, N, D), got ", x.sizes());
    TORCH_CHECK(x.numel() > 0, name, " must have B, N, D ≥ 1, got ", x.sizes());
    const auto dtype = x.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                name, " must be float32, bfloat16, float16 or float64, got ", dtype);
  }
  TORCH_CHECK(h.size(0) == y.size(0), "h and y must have the same batch size B, got ", h.size(0), " and ", y.size(0));
  TORCH_CHECK(h.size(2) == y.size(2), "h and y must have the same width D, got ", h.size(2), " and ", y.size(2));
  check_grid("h_grid", h_grid, h.size(1));
  check_grid("y_grid", y_grid, y.size(1));
  check_grid("target_grid", target_grid, -1);
}

bool is_fp64(const at::Tensor& h, const at::Tensor& y) {
  return h.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble;
}

// (T, B) per-sample losses, float32 (float64 when an input is float64).
at::Tensor forward(const std::string& op, const at::Tensor& h, const at::Tensor& y, std::vector<int64_t> h_grid,
                   std::vector<int64_t> y_grid, std::vector<int64_t> target_grid, const std::string& method,
                   int64_t block) {
  const int64_t terms = terms_of(op);
  const Method how = parse_method(method);
  check_inputs(h, y, h_grid, y_grid, target_grid);
  TORCH_CHECK(block > 0, "block must be positive, got ", block);
  const at::Tensor hc = h.contiguous(), yc = y.contiguous();
  at::Tensor out = at::empty({terms, h.size(0)}, h.options().dtype(is_fp64(h, y) ? at::kDouble : at::kFloat));
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    const Inputs<acc_t> in(hc, yc, h_grid, y_grid, target_grid, block);
    acc_t* data = out.data_ptr<acc_t>();
    if (op == "cosine") {
      cosine_forward(in, data);
    } else {
      manifold_forward(in, how, terms == 2 ? data : nullptr, data + (terms - 1) * in.batch);
    }
  };
  if (out.scalar_type() == at::kDouble) run(0.0); else run(0.0f);
  return out;
}

// (∂/∂h, ∂/∂y) of Σ_tb grad[t, b]·forward(...)[t, b], in the inputs' dtypes; None where not wanted.
std::tuple<at::Tensor, at::Tensor> backward(const std::string& op, const at::Tensor& grad, const at::Tensor& h,
                                            const at::Tensor& y, std::vector<int64_t> h_grid,
                                            std::vector<int64_t> y_grid, std::vector<int64_t> target_grid,
                                            bool needs_h, bool needs_y, const std::string& method, int64_t block) {
  const int64_t terms = terms_of(op);
  const Method how = parse_method(method);
  check_inputs(h, y, h_grid, y_grid, target_grid);
  TORCH_CHECK(block > 0, "block must be positive, got ", block);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == terms && grad.size(1) == h.size(0), "grad must have shape (",
              terms, ", ", h.size(0), "), got ", grad.sizes());
  const at::Tensor hc = h.contiguous(), yc = y.contiguous();
  at::Tensor grad_h = needs_h ? at::empty(hc.sizes(), hc.options()) : at::Tensor();
  at::Tensor grad_y = needs_y ? at::empty(yc.sizes(), yc.options()) : at::Tensor();
  if (!needs_h && !needs_y) return {grad_h, grad_y};
  const at::Tensor g = grad.to(is_fp64(h, y) ? at::kDouble : at::kFloat).contiguous();
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    Inputs<acc_t> in(hc, yc, h_grid, y_grid, target_grid, block);
    if (needs_h) in.h.grad = grad_h.data_ptr();
    if (needs_y) in.y.grad = grad_y.data_ptr();
    const acc_t* data = g.const_data_ptr<acc_t>();
    if (op == "cosine") {
      cosine_backward(in, data);
    } else {
      manifold_backward(in, how, terms == 2 ? data : nullptr, data + (terms - 1) * in.batch);
    }
  };
  if (g.scalar_type() == at::kDouble) run(0.0); else run(0.0f);
  return {grad_h, grad_y};
}

}  // namespace
}  // namespace repa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "repa_fused CPU kernels: fused cosine alignment, manifold and U-REPA losses (memory linear in N)";
  m.attr("default_block") = repa::kDefaultBlock;
  m.def("forward", &repa::forward, "(T, B) per-sample losses", pybind11::arg("op"), pybind11::arg("h"),
        pybind11::arg("y"), pybind11::arg("h_grid"), pybind11::arg("y_grid"), pybind11::arg("target_grid"),
        pybind11::arg("method") = "auto", pybind11::arg("block") = repa::kDefaultBlock,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("backward", &repa::backward, "(grad_h | None, grad_y | None)", pybind11::arg("op"), pybind11::arg("grad"),
        pybind11::arg("h"), pybind11::arg("y"), pybind11::arg("h_grid"), pybind11::arg("y_grid"),
        pybind11::arg("target_grid"), pybind11::arg("needs_h"), pybind11::arg("needs_y"),
        pybind11::arg("method") = "auto", pybind11::arg("block") = repa::kDefaultBlock,
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
