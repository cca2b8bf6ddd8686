// The CUDA tile programs run on the CPU, thread by thread and phase by phase,
// as operators for the tests (tests/test_tile_programs.py):
//   _lenet_forward_tile_emulated                     lenet_forward_tile.h
//   _lenet_train_forward_tile_emulated               lenet_forward_tile.h
//   _conv_sigmoid_avgpool2d_tile_emulated            conv_sigmoid_avgpool2d_tile.h
//   _conv_sigmoid_avgpool2d_backward_tile_emulated   conv_sigmoid_avgpool2d_tile_backward.h
//   _lenet_backward_tile_emulated                    lenet_backward_tile.h, dense_weight_grads_tile.h,
//                                                    tile_partial_sums.h
//   _tile_partial_sums_emulated                      tile_partial_sums.h
// They check the programs' index math, shared-memory layouts and partial last
// tiles without a GPU; the phase functions are the CUDA kernels' own.
//
// Each phase runs twice, its threads in opposite orders, on two copies of the
// shared memory: if any thread of a phase reads what another thread writes in
// the same phase, or two threads write one place, the copies differ and the
// call fails. That is the race a barrier would have to prevent. What this
// cannot see: races on global memory, and the GPU's own rules (coalescing,
// bank conflicts, occupancy), which the GPU run and compute-sanitizer cover.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../conv_sigmoid_avgpool2d.h"
#include "conv_sigmoid_avgpool2d_tile_backward.h"
#include "../lenet.h"

TORCH_LIBRARY_FRAGMENT(lenet_ext, m) {
  m.def("_lenet_forward_tile_emulated(Tensor x, " LENET_PARAMS_SCHEMA ", int tile, int threads) -> Tensor");
  m.def("_lenet_train_forward_tile_emulated(Tensor x, " LENET_PARAMS_SCHEMA
        ", int tile, int threads) -> (Tensor logits, Tensor block1, Tensor block2, Tensor fc1, Tensor fc2)");
  m.def(
      "_conv_sigmoid_avgpool2d_tile_emulated(Tensor x, Tensor weight, Tensor? bias, int padding, int pool, "
      "int tile, int threads) -> Tensor");
  m.def(
      "_conv_sigmoid_avgpool2d_backward_tile_emulated(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "
      "int padding, int pool, bool[3] output_mask, int tile, int threads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_lenet_backward_tile_emulated(Tensor grad_logits, Tensor x, Tensor block1, Tensor block2, Tensor fc1, "
      "Tensor fc2, " LENET_PARAMS_SCHEMA
      ", bool[11] output_mask, int tile, int conv1_tile, int threads) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_tile_partial_sums_emulated(Tensor partials, int threads) -> Tensor");
}

namespace lenet_ext {

namespace {

// Runs a Program (see ../cuda/tile_program.cuh) over `tiles` blocks of
// `threads` threads, as the CUDA kernel would.
template <typename Program>
void emulate_tile_program(const char* op, const typename Program::Params& params, int64_t tiles, int64_t threads) {
  TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
  std::vector<float> smem(params.s.floats), reversed(params.s.floats);
  const auto run = [&](int phase, float* memory, int64_t tile, int tid) {
    Program::run_phase(phase, params, memory, tile, tid, static_cast<int>(threads));
  };
  // The last block first: one that writes past its own images into the
  // next tile's rows of an output then overwrites values already final.
  for (int64_t t = tiles - 1; t >= 0; --t) {
    // Whatever a previous block left behind; the program must not read it.
    std::fill(smem.begin(), smem.end(), std::nanf(""));
    for (int phase = 0; phase < Program::kPhases; ++phase) {
      reversed = smem;
      for (int tid = static_cast<int>(threads) - 1; tid >= 0; --tid) run(phase, reversed.data(), t, tid);
      for (int tid = 0; tid < threads; ++tid) run(phase, smem.data(), t, tid);
      // A program without shared memory (its data() is null) has nothing to compare.
      TORCH_CHECK(smem.empty() || std::memcmp(smem.data(), reversed.data(), smem.size() * sizeof(float)) == 0, op,
                  ": phase ", phase, " depends on the order of its threads");
    }
  }
}

void emulate_partial_sums(const char* op, const PartialSumsPlan& plan, int64_t threads) {
  // Every pass but the last must write all of its scratch rows: NaN shows one it does not.
  for (const at::Tensor& rows : plan.scratch) rows.fill_(std::nanf(""));
  for (size_t i = 0; i < plan.passes.size(); ++i)
    emulate_tile_program<PartialSumsProgram>(op, plan.passes[i], plan.blocks[i], threads);
}

int checked_tile(const char* op, int64_t tile) {
  TORCH_CHECK_VALUE(tile >= 1 && tile <= 1024, op, ": expected 1 <= tile <= 1024, got ", tile);
  return static_cast<int>(tile);
}

LeNetActivations lenet_tile_emulated(const char* op, const at::Tensor& x, const LeNetParams& p, int64_t tile,
                                     int64_t threads, bool train) {
  TORCH_CHECK_TYPE(tile_program_fits(x, p), op, ": the tile program takes float32 only");
  const int images = checked_tile(op, tile);
  const LeNetTileCall call = prepare_tile_call(x, p, train, [&](const LeNetTileShape&) { return images; });
  emulate_tile_program<LeNetTileProgram>(op, call.params, (x.size(0) + tile - 1) / tile, threads);
  return call.out;
}

at::Tensor lenet_forward_tile_emulated(const at::Tensor& x, LENET_PARAMS_ARGS, int64_t tile, int64_t threads) {
  return lenet_tile_emulated("_lenet_forward_tile_emulated", x, LENET_PARAMS, tile, threads, false).logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_train_forward_tile_emulated(
    const at::Tensor& x, LENET_PARAMS_ARGS, int64_t tile, int64_t threads) {
  const LeNetActivations r =
      lenet_tile_emulated("_lenet_train_forward_tile_emulated", x, LENET_PARAMS, tile, threads, true);
  return {r.logits, r.block1, r.block2, r.fc1, r.fc2};
}

at::Tensor conv_tile_emulated(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t padding, int64_t pool, int64_t tile, int64_t threads) {
  constexpr const char* op = "_conv_sigmoid_avgpool2d_tile_emulated";
  const ForwardCall call = prepare_forward(x, weight, bias, padding, pool);
  TORCH_CHECK_TYPE(conv_tile_program_fits(call.g, x), op, ": the tile program takes float32 only");
  const ConvTileForwardParams params = conv_tile_forward_params(call, checked_tile(op, tile));
  emulate_tile_program<ConvTileForwardProgram>(op, params, (call.g.batch + tile - 1) / tile, threads);
  return call.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_tile_emulated(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t padding, int64_t pool, std::array<bool, 3> output_mask, int64_t tile, int64_t threads) {
  constexpr const char* op = "_conv_sigmoid_avgpool2d_backward_tile_emulated";
  const BackwardCall call = prepare_backward(grad_out, x, weight, bias, padding, pool, output_mask);
  TORCH_CHECK_TYPE(conv_tile_program_fits(call.g, x), op, ": the tile program takes float32 only");
  TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
  const ConvTileBackward tiled = prepare_tile_backward(call, checked_tile(op, tile), static_cast<int>(threads));
  // The program must write every partial sum it is given: NaN shows one it does not.
  if (tiled.tiles > 0) tiled.partials.fill_(std::nanf(""));
  const ConvTileSums sums = prepare_tile_sums(call, tiled);
  emulate_tile_program<ConvTileBackwardProgram>(op, tiled.params, tiled.tiles, threads);
  emulate_partial_sums(op, sums.plan, threads);
  return {call.grad_x, sums.grad_weight, sums.grad_bias};
}

// lenet_backward as CUDA runs it (../cuda/lenet_cuda.cu): the same steps, each
// program emulated; the calls the programs do not take run the whole batch.
LeNetGrads lenet_backward_tile_emulated(const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& block1,
                                        const at::Tensor& block2, const at::Tensor& fc1, const at::Tensor& fc2,
                                        LENET_PARAMS_ARGS, LeNetGradMask output_mask, int64_t tile,
                                        int64_t conv1_tile, int64_t threads) {
  constexpr const char* op = "_lenet_backward_tile_emulated";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LeNetParams p = LENET_PARAMS;
  const LeNetActivations saved{.block1 = block1, .block2 = block2, .fc1 = fc1, .fc2 = fc2};
  const int images = checked_tile(op, tile), conv1_images = checked_tile(op, conv1_tile);
  TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
  LeNetBackwardTiles call = prepare_backward_tiles(
      grad_logits, x, saved, p, output_mask, static_cast<int>(threads),
      [&](c10::function_ref<int(int)>) { return images; }, [&](c10::function_ref<int(int)>) { return conv1_images; });
  if (call.tiles == 0) return lenet_backward_whole_batch(grad_logits, x, saved, p, output_mask);
  // The programs must write every partial sum and every gradient they are given: NaN shows one they do not.
  for (at::Tensor* t : {&call.partials, &call.conv1_partials, &call.dense_partials, &call.g1, &call.g2,
                        &call.grad_block1})
    if (t->defined()) t->fill_(std::nanf(""));
  for (at::Tensor& grad : call.grads)
    if (grad.defined()) grad.fill_(std::nanf(""));
  emulate_tile_program<LeNetBackwardTileProgram>(op, call.params, call.tiles, threads);
  if (call.conv1_tiles > 0) emulate_tile_program<ConvTileBackwardProgram>(op, call.conv1_params, call.conv1_tiles, threads);
  if (const int64_t blocks = dense_weight_grads_blocks(call.dense_params); blocks > 0)
    emulate_tile_program<DenseWeightGradsProgram>(op, call.dense_params, blocks, threads);
  emulate_partial_sums(op, call.sums, threads);
  return call.finish();
}

// The sum over dim 0 of a (rows, columns) float32 tensor, as the tile
// programs' last step adds their partial sums.
at::Tensor tile_partial_sums_emulated(const at::Tensor& partials, int64_t threads) {
  constexpr const char* op = "_tile_partial_sums_emulated";
  TORCH_CHECK_VALUE(partials.dim() == 2, op, ": expected a 2-d partials, got shape ", partials.sizes());
  TORCH_CHECK_TYPE(partials.scalar_type() == at::kFloat, op, ": expected float32, got ", partials.scalar_type());
  TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
  const at::Tensor rows = partials.contiguous();
  at::Tensor out = at::empty({rows.size(1)}, rows.options());
  const int columns = static_cast<int>(rows.size(1));
  const PartialSumsPlan plan = plan_partial_sums(
      {ColumnSum{rows.const_data_ptr<float>(), rows.size(0), columns, 0, columns, out.mutable_data_ptr<float>(), 0}},
      rows.options());
  out.fill_(std::nanf(""));
  emulate_partial_sums(op, plan, threads);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CPU, m) {
  m.impl("_lenet_forward_tile_emulated", &lenet_forward_tile_emulated);
  m.impl("_lenet_train_forward_tile_emulated", &lenet_train_forward_tile_emulated);
  m.impl("_conv_sigmoid_avgpool2d_tile_emulated", &conv_tile_emulated);
  m.impl("_conv_sigmoid_avgpool2d_backward_tile_emulated", &conv_backward_tile_emulated);
  m.impl("_lenet_backward_tile_emulated", &lenet_backward_tile_emulated);
  m.impl("_tile_partial_sums_emulated", &tile_partial_sums_emulated);
}

}  // namespace lenet_ext
