// The host side of lenet_backward's tile programs (../lenet.h lists the steps):
// checks, the tensors the programs read and write, the programs' parameters. CUDA runs it
// (../cuda/lenet_cuda.cu), and so does the CPU emulation for the tests
// (tile_emulation.cpp).
#include <ATen/ATen.h>

#include "../lenet.h"

namespace lenet_ext {

LeNetBackwardTiles prepare_backward_tiles(const at::Tensor& grad_logits, const at::Tensor& x,
                                          const LeNetActivations& saved, const LeNetParams& p,
                                          const LeNetGradMask& output_mask, int threads, TileChooser choose,
                                          TileChooser choose_conv1) {
  const LeNetBackwardCall call = check_backward_args(grad_logits, x, saved, p, output_mask);
  LeNetBackwardTiles r;
  if (!tile_program_fits(x, p) || !call.needed_below[kFc3W] || x.size(0) == 0) return r;
  const LeNetGradMask& mask = call.mask;
  const bool conv2 = call.needed_below[kFc1W], conv1 = call.needed_below[kConv2W];
  const ConvPoolGeometry &g1 = call.block1, &g2 = call.block2;
  const int f1 = static_cast<int>(p.fc1_weight.size(0)), f2 = static_cast<int>(p.fc2_weight.size(0)),
            f3 = static_cast<int>(p.fc3_weight.size(0));
  const int tile =
      choose([&](int images) { return make_backward_tile_shape(g2, f1, f2, f3, images, threads).floats; });
  const int conv1_tile =
      conv1 ? choose_conv1([&](int images) { return make_conv_tile_shape(g1, images, threads).floats; }) : 0;
  if (tile == 0 || (conv1 && conv1_tile == 0)) return r;

  const int64_t batch = x.size(0);
  r.mask = mask;
  r.tiles = (batch + tile - 1) / tile;
  r.inputs = {grad_logits.contiguous(),  saved.fc2.contiguous(),    saved.fc1.contiguous(),
              saved.block2.contiguous(), p.fc1_weight.contiguous(), p.fc2_weight.contiguous(),
              p.fc3_weight.contiguous(), saved.block1.contiguous(), p.conv2_weight.contiguous(),
              contiguous_or_undefined(p.conv2_bias)};
  const auto data = [&](int i) { return float_data_or_null(r.inputs[i]); };
  r.g1 = at::empty({batch, f1}, x.options());
  r.g2 = at::empty({batch, f2}, x.options());
  for (int i = kConv1W; i < kGrads; ++i)
    if (mask[i]) r.grads[i] = at::empty_like(parameter(p, LeNetGrad(i)), at::MemoryFormat::Contiguous);

  LeNetBackwardTileParams& a = r.params;
  a.s = make_backward_tile_shape(g2, f1, f2, f3, tile, threads);
  a.conv2 = conv2;
  a.row_length = a.s.dense_columns + (conv2 ? parameter_count(a.s.conv2) : 0);
  // Every tile writes its whole row.
  r.partials = at::empty({r.tiles, a.row_length}, x.options());
  if (conv1) r.grad_block1 = at::empty_like(r.inputs[7]);
  a.batch = batch;
  a.grad_logits = data(0), a.fc2 = data(1), a.fc1 = data(2);
  a.fc1_w = data(4), a.fc2_w = data(5), a.fc3_w = data(6);
  a.block1 = data(7), a.conv2_w = data(8), a.conv2_b = data(9);
  a.g1 = r.g1.mutable_data_ptr<float>(), a.g2 = r.g2.mutable_data_ptr<float>();
  a.grad_block1 = conv1 ? r.grad_block1.mutable_data_ptr<float>() : nullptr;
  a.partials = r.partials.mutable_data_ptr<float>();

  std::vector<ColumnSum> sums;
  const auto add_sum = [&](LeNetGrad i, const at::Tensor& partials, int column, int columns) {
    if (!mask[i]) return;
    sums.push_back(ColumnSum{partials.const_data_ptr<float>(), partials.size(0), static_cast<int>(partials.size(1)),
                             column, columns, r.grads[i].mutable_data_ptr<float>(), 0});
  };
  add_sum(kFc1B, r.partials, 0, f1);
  add_sum(kFc2B, r.partials, f1, f2);
  add_sum(kFc3B, r.partials, f1 + f2, f3);
  if (conv2) {
    const int weights = static_cast<int>(p.conv2_weight.numel());
    add_sum(kConv2W, r.partials, a.s.dense_columns, weights);
    add_sum(kConv2B, r.partials, a.s.dense_columns + weights, static_cast<int>(g2.out_channels));
  }
  if (conv1) {
    BackwardCall c1 = prepare_backward(r.grad_block1, x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1,
                                       {mask[kX], mask[kConv1W], mask[kConv1B]});
    const ConvTileBackward tiled = prepare_tile_backward(c1, conv1_tile, threads);
    r.conv1_tiles = tiled.tiles;
    r.conv1_params = tiled.params;
    r.conv1_partials = tiled.partials;
    r.grads[kX] = c1.grad_x;
    r.conv1 = std::move(c1);
    const int weights = static_cast<int>(p.conv1_weight.numel());
    add_sum(kConv1W, r.conv1_partials, 0, weights);
    add_sum(kConv1B, r.conv1_partials, weights, static_cast<int>(g1.out_channels));
  }
  // y = a W^T: dL/dW = g^T a, with g the gradient of y and a the layer's input.
  DenseWeightGrad layers[kMaxDenseLayers];
  LeNetGrad layer_grads[kMaxDenseLayers];
  int count = 0;
  const auto add_layer = [&](LeNetGrad i, const at::Tensor& g, const at::Tensor& a) {
    if (!mask[i]) return;
    layers[count] = DenseWeightGrad{g.const_data_ptr<float>(), a.const_data_ptr<float>(), static_cast<int>(g.size(1)),
                                    static_cast<int>(a.size(1)), 0};
    layer_grads[count++] = i;
  };
  add_layer(kFc3W, r.inputs[0], r.inputs[1]);
  add_layer(kFc2W, r.g2, r.inputs[2]);
  add_layer(kFc1W, r.g1, r.inputs[3].view({batch, -1}));
  if (count > 0) {
    r.dense_params = dense_weight_grads_params(layers, count, batch, threads);
    r.dense_partials = at::empty({r.dense_params.splits, r.dense_params.row_length}, x.options());
    r.dense_params.partials = r.dense_partials.mutable_data_ptr<float>();
    for (int k = 0; k < count; ++k) {
      const DenseWeightGrad& layer = r.dense_params.layers[k];
      add_sum(layer_grads[k], r.dense_partials, layer.column, layer.rows * layer.cols);
    }
  }
  r.sums = plan_partial_sums(std::move(sums), x.options());
  return r;
}

LeNetGrads LeNetBackwardTiles::finish() { return as_tuple(grads); }

}  // namespace lenet_ext
