// LeNet as three operators: lenet_forward for inference, lenet_train_forward,
// which also returns the activations backward reads, and lenet_backward. One
// dispatch from Python instead of a dozen, which is most of the cost at batch
// 1, and one autograd node for the whole network.
//
//   schemas, checks and the whole-batch implementation   lenet.cpp
//   CPU: tiles of the batch, a chunk of tiles per thread  cpu/lenet_cpu.cpp
//   CUDA: the forwards one launch of a tile program,      cuda/lenet_cuda.cu
//   the backward three programs and the partial sums
//   the tile programs, run by CUDA and, for the tests,    tile/lenet_forward_tile.h,
//   by the CPU emulation (tile/tile_emulation.cpp)        tile/lenet_backward_tile.h,
//                                                         tile/dense_weight_grads_tile.h,
//                                                         tile/lenet_backward_tile_call.cpp
//
// The first two are built from the steps declared here: the conv blocks run
// the fused operator (conv_sigmoid_avgpool2d.h), the dense block addmm with an
// in-place sigmoid.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include "conv_sigmoid_avgpool2d.h"
#include "tile/dense_weight_grads_tile.h"
#include "tile/lenet_backward_tile.h"
#include "tile/lenet_forward_tile.h"
#include "tile/tile_partial_sums.h"

#include <array>
#include <optional>
#include <tuple>

namespace lenet_ext {

// The operators' arguments after x, in schema order (LENET_PARAMS_SCHEMA in
// lenet.cpp; lenet_ext.ops.LENET_PARAMS on the Python side).
struct LeNetParams {
  const at::Tensor& conv1_weight;
  const std::optional<at::Tensor>& conv1_bias;
  int64_t conv1_padding, pool1;
  const at::Tensor& conv2_weight;
  const std::optional<at::Tensor>& conv2_bias;
  int64_t conv2_padding, pool2;
  const at::Tensor& fc1_weight;
  const std::optional<at::Tensor>& fc1_bias;
  const at::Tensor& fc2_weight;
  const std::optional<at::Tensor>& fc2_bias;
  const at::Tensor& fc3_weight;
  const std::optional<at::Tensor>& fc3_bias;
};

// LeNet's parameters in the schemas of the operators (lenet.cpp), after x.
#define LENET_PARAMS_SCHEMA                                                                 \
  "Tensor conv1_weight, Tensor? conv1_bias, int conv1_padding, int pool1, "                 \
  "Tensor conv2_weight, Tensor? conv2_bias, int conv2_padding, int pool2, "                 \
  "Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "              \
  "Tensor fc3_weight, Tensor? fc3_bias"

// The dispatcher calls a kernel with the schema's arguments one by one: each
// implementation takes them as LENET_PARAMS_ARGS and bundles them with
// LENET_PARAMS.
#define LENET_PARAMS_ARGS                                                                         \
  const at::Tensor &conv1_weight, const std::optional<at::Tensor>&conv1_bias,                     \
      int64_t conv1_padding, int64_t pool1, const at::Tensor &conv2_weight,                      \
      const std::optional<at::Tensor>&conv2_bias, int64_t conv2_padding, int64_t pool2,           \
      const at::Tensor &fc1_weight, const std::optional<at::Tensor>&fc1_bias,                     \
      const at::Tensor &fc2_weight, const std::optional<at::Tensor>&fc2_bias,                     \
      const at::Tensor &fc3_weight, const std::optional<at::Tensor>&fc3_bias
#define LENET_PARAMS                                                                              \
  LeNetParams {                                                                                   \
    conv1_weight, conv1_bias, conv1_padding, pool1, conv2_weight, conv2_bias, conv2_padding,      \
        pool2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias                   \
  }

// The logits and the activations lenet_backward reads: the two conv blocks'
// outputs (the second flattened to (N, features)) and the two hidden sigmoids.
struct LeNetActivations {
  at::Tensor logits, block1, block2, fc1, fc2;
};

// lenet_backward's gradients, in the order of the operators' tensor
// arguments (x, then the parameters).
enum LeNetGrad { kX, kConv1W, kConv1B, kConv2W, kConv2B, kFc1W, kFc1B, kFc2W, kFc2B, kFc3W, kFc3B, kGrads };
using LeNetGradMask = std::array<bool, kGrads>;
using LeNetGradArray = std::array<at::Tensor, kGrads>;
using LeNetGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
LeNetGrads as_tuple(const LeNetGradArray& grads);

// The parameter gradient i belongs to (i >= kConv1W; a bias only when given).
const at::Tensor& parameter(const LeNetParams& p, LeNetGrad i);

// --- forward steps ----------------------------------------------------------

// The two conv blocks of x into r.block1 and r.block2; the argument checks of
// the conv operator run on the way.
void conv_blocks(const at::Tensor& x, const LeNetParams& p, LeNetActivations& r);

// A dense layer's weight and bias against its input x; `name` is the
// layer's name in the schema (fc1, fc2, fc3), `op` the operator's.
void check_linear(const InputMeta& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* op, const char* name);

// The dense layers from r.block2 into r.fc1, r.fc2 and r.logits; `op` names
// the operator in the errors of the dense layers' checks.
void dense_layers(const LeNetParams& p, const char* op, LeNetActivations& r);

// The whole forward on the whole batch at once (the implementation for
// devices without their own, and the checks of every other).
LeNetActivations forward_whole_batch(const at::Tensor& x, const LeNetParams& p, const char* op);

// The checks of the layer-by-layer path, on the sizes each layer's input
// will have, without running a layer; returns the conv blocks' sizes.
struct LeNetSizes {
  ConvPoolGeometry block1, block2;
};
LeNetSizes check_lenet_args(const at::Tensor& x, const LeNetParams& p, const char* op);

// --- the forward as one tile program (tile/lenet_forward_tile.h) -------------------

// A checked call of lenet_forward (train false) or lenet_train_forward (train
// true) for the tile program: its tensors made contiguous and kept alive, the
// outputs allocated (the logits; for training also the activations
// lenet_backward reads), and the program's parameters pointing at them.
// tile_for picks the images per block from the buffers of one image; when it
// answers 0 nothing is allocated and params.s.tile is 0. tile_program_fits
// says whether the program takes this call at all (float32; otherwise the
// caller runs the layers).
struct LeNetTileCall {
  std::array<at::Tensor, 11> tensors;  // x and the ten parameters, contiguous
  LeNetActivations out;
  LeNetTileParams params;
};
bool tile_program_fits(const at::Tensor& x, const LeNetParams& p);
LeNetTileCall prepare_tile_call(const at::Tensor& x, const LeNetParams& p, bool train,
                                c10::function_ref<int(const LeNetTileShape&)> tile_for);

// --- backward steps ---------------------------------------------------------

// A checked lenet_backward call: the saved activations fit x and the
// parameters. mask leaves out the arguments given as None; needed_below[i]
// says whether a gradient at index < i is asked for, so that the chain must
// go on past layer i. block1 and block2 are the conv blocks' sizes.
struct LeNetBackwardCall {
  LeNetGradMask mask;
  std::array<bool, kGrads + 1> needed_below;
  ConvPoolGeometry block1, block2;
};

LeNetBackwardCall check_backward_args(const at::Tensor& grad_logits, const at::Tensor& x,
                                      const LeNetActivations& saved, const LeNetParams& p,
                                      const LeNetGradMask& output_mask);

// The dense layers' backward over the rows of one slice of the batch (saved
// holds those rows): writes each parameter gradient asked for into
// slots[i] (out= of a matrix product or a sum), and returns the gradient of
// block 2's output as (rows, C, H, W), undefined when nothing below fc1 is
// asked for.
at::Tensor dense_backward(const at::Tensor& grad_logits, const LeNetActivations& saved,
                          const LeNetParams& p, const LeNetBackwardCall& call, LeNetGradArray& slots);

// The conv operator's backward, through the dispatcher.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_block_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool, std::array<bool, 3> mask);

// lenet_backward on the whole batch at once: the dense layers through
// dense_backward, the conv blocks through the conv operator's backward (the
// implementation for devices without one of their own, CUDA's for the calls
// its tile programs do not take, and the CPU's for a batch of one tile).
LeNetGrads lenet_backward_whole_batch(const at::Tensor& grad_logits, const at::Tensor& x,
                                      const LeNetActivations& saved, const LeNetParams& p,
                                      const LeNetGradMask& output_mask);

// --- lenet_backward as tile programs (tile/lenet_backward_tile.h) ------------------

// A checked lenet_backward call prepared for CUDA's tile programs, run in
// this order on one stream:
//   1. LeNetBackwardTileProgram over `tiles` blocks: the dense layers' chain
//      and conv block 2's backward;
//   2. conv block 1's ConvTileBackwardProgram over conv1_tiles blocks (0:
//      nothing below conv2 is asked for);
//   3. DenseWeightGradsProgram over dense_weight_grads_blocks(dense_params)
//      blocks (0: no dense weight gradient is asked for): the dense weight
//      gradients' partial sums, from what program 1 wrote
//      (tile/dense_weight_grads_tile.h);
//   4. the passes of PartialSumsProgram in `sums`: every gradient asked for
//      but dL/dx, from the three programs' partial sums;
//   5. finish(): all the gradients in lenet_backward's order.
// A chooser picks a program's images per block from its shared memory
// (floats for a tile of so many images); when either answers 0, or nothing
// below fc3 is asked for, or the call is not float32, tiles is 0, nothing is
// allocated and the caller runs lenet_backward_whole_batch.
using TileChooser = c10::function_ref<int(c10::function_ref<int(int)>)>;
struct LeNetBackwardTiles {
  int64_t tiles = 0, conv1_tiles = 0;
  LeNetBackwardTileParams params;
  ConvTileBackwardParams conv1_params;
  DenseWeightGradsParams dense_params{};  // zero blocks unless a dense weight gradient is asked for
  PartialSumsPlan sums;
  LeNetGradMask mask;
  // Contiguous: grad_logits, fc2, fc1, block2, fc1..fc3 weights, block1, conv2 weight and bias.
  std::array<at::Tensor, 10> inputs;
  at::Tensor g1, g2, partials, conv1_partials, dense_partials, grad_block1;
  BackwardCall conv1;  // its tensors, kept alive for program 2
  LeNetGradArray grads;

  LeNetGrads finish();
};

LeNetBackwardTiles prepare_backward_tiles(const at::Tensor& grad_logits, const at::Tensor& x,
                                          const LeNetActivations& saved, const LeNetParams& p,
                                          const LeNetGradMask& output_mask, int threads, TileChooser choose,
                                          TileChooser choose_conv1);

// The conv blocks' backward over one slice of the batch: grad_block2 and
// block1 and x are that slice's. Calls add(i, grad) for each parameter
// gradient asked for and returns the gradient of x (undefined when not asked
// for).
template <typename Add>
at::Tensor conv_backward(const at::Tensor& grad_block2, const at::Tensor& block1, const at::Tensor& x,
                         const LeNetParams& p, const LeNetBackwardCall& call, const Add& add) {
  const LeNetGradMask& mask = call.mask;
  auto [grad_block1, grad_weight, grad_bias] =
      conv_block_backward(grad_block2, block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2,
                          {call.needed_below[kConv2W], mask[kConv2W], mask[kConv2B]});
  if (mask[kConv2W]) add(kConv2W, grad_weight);
  if (mask[kConv2B]) add(kConv2B, grad_bias);
  if (!call.needed_below[kConv2W]) return at::Tensor();
  auto [grad_x, grad_weight1, grad_bias1] =
      conv_block_backward(grad_block1, x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1,
                          {mask[kX], mask[kConv1W], mask[kConv1B]});
  if (mask[kConv1W]) add(kConv1W, grad_weight1);
  if (mask[kConv1B]) add(kConv1B, grad_bias1);
  return grad_x;
}

}  // namespace lenet_ext
