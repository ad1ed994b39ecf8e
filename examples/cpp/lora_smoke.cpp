// Calls peftkern::lora_linear from C++ through the dispatcher and checks it against ATen.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  using Signature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, double, double, const std::optional<at::Tensor>&);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("peftkern::lora_linear", "")
                .typed<Signature>();
  torch::manual_seed(0);
  const auto x = torch::randn({7, 12}, torch::kFloat64);
  const auto weight = torch::randn({5, 12}, torch::kFloat64);
  const auto bias = torch::randn({5}, torch::kFloat64);
  const auto lora_A = torch::randn({3, 12}, torch::kFloat64);
  const auto lora_B = torch::randn({5, 3}, torch::kFloat64);
  const auto [y, S] = op.call(x, weight, bias, lora_A, lora_B, 0.5, 0.0, std::nullopt);
  const auto expected = torch::addmm(bias, x, weight.t()) + 0.5 * x.mm(lora_A.t()).mm(lora_B.t());
  const double error = (y - expected).abs().max().item<double>();
  std::cout << "peftkern::lora_linear from C++: max error " << error << std::endl;
  return error < 1e-10 ? 0 : 1;
}
