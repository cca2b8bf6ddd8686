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
// The GPU runs a phase's threads, and a launch's blocks, in any order; the
// emulation tries two and requires the same bits from both:
// - each phase runs twice, its threads in opposite orders, on two copies of
//   the shared memory, which must then be equal: a thread of a phase that
//   reads what another writes in the same phase, or two threads that write
//   one place, make them differ (the race a barrier would have to prevent);
// - each operator runs twice, on fresh outputs: with the blocks last to
//   first, each phase's run in thread order coming second (its global
//   writes are the ones kept), then with the blocks first to last and the
//   run in reverse thread order second. Its outputs must be equal: a race
//   between threads whose effect reaches global memory only, or a block that
//   reads or overwrites another block's output, makes them differ.
// Besides, no phase may write outside its block's shared memory.
// _tile_emulation_race_probe runs a small program with such a fault through
// the checks, for the tests of the checks themselves. What this cannot
// see: the GPU's own rules (coalescing, bank conflicts, occupancy, the
// memory model's ordering), which the GPU run and compute-sanitizer cover.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <iterator>
#include <tuple>
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
  m.def("_tile_emulation_race_probe(str race) -> Tensor");
}

namespace lenet_ext {

namespace {

// Which order an emulated launch runs its blocks and its threads in (see above).
enum class LaunchOrder { kLastBlockFirst, kFirstBlockFirst };

// Floats on each side of a block's shared memory that no phase may touch: a
// write there is one past the block's own (on the GPU, a fault or another
// block's data), and a read of their NaN shows in the outputs.
constexpr size_t kGuardFloats = 16;
constexpr uint32_t kGuardBits = 0x7fc0dead;  // a NaN unlike std::nanf's

float guard_value() {
  float value;
  std::memcpy(&value, &kGuardBits, sizeof(value));
  return value;
}

bool guards_intact(const std::vector<float>& memory) {
  const auto intact = [&](size_t from) {
    for (size_t i = from; i < from + kGuardFloats; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &memory[i], sizeof(bits));
      if (bits != kGuardBits) return false;
    }
    return true;
  };
  return intact(0) && intact(memory.size() - kGuardFloats);
}

// Runs the programs of one operator call (see ../cuda/tile_program.cuh) as
// the CUDA kernels would, in `order`.
struct Emulator {
  const char* op;
  int64_t threads;
  LaunchOrder order;

  // A Program over `tiles` blocks of `threads` threads.
  template <typename Program>
  void run(const typename Program::Params& params, int64_t tiles) const {
    TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
    const bool mirrored = order == LaunchOrder::kFirstBlockFirst;
    const size_t floats = static_cast<size_t>(params.s.floats);
    std::vector<float> smem(floats + 2 * kGuardFloats, guard_value()), other;
    const auto run_threads = [&](int phase, float* memory, int64_t tile, bool reversed) {
      for (int64_t k = 0; k < threads; ++k) {
        const int tid = static_cast<int>(reversed ? threads - 1 - k : k);
        Program::run_phase(phase, params, memory, tile, tid, static_cast<int>(threads));
      }
    };
    for (int64_t k = 0; k < tiles; ++k) {
      const int64_t tile = mirrored ? k : tiles - 1 - k;
      // Whatever a previous block left behind; the program must not read it.
      std::fill(smem.begin() + kGuardFloats, smem.end() - kGuardFloats, std::nanf(""));
      for (int phase = 0; phase < Program::kPhases; ++phase) {
        other = smem;
        run_threads(phase, other.data() + kGuardFloats, tile, !mirrored);
        run_threads(phase, smem.data() + kGuardFloats, tile, mirrored);  // kept: its global writes come last
        TORCH_CHECK(guards_intact(smem) && guards_intact(other), op, ": phase ", phase, " writes outside its block's ",
                    floats, " floats of shared memory");
        TORCH_CHECK(std::memcmp(smem.data(), other.data(), smem.size() * sizeof(float)) == 0, op, ": phase ", phase,
                    " depends on the order of its threads");
      }
    }
  }

  // The passes of a plan_partial_sums plan, in order.
  void partial_sums(const PartialSumsPlan& plan) const {
    // Every pass but the last must write all of its scratch rows: NaN shows one it does not.
    for (const at::Tensor& rows : plan.scratch) rows.fill_(std::nanf(""));
    for (size_t i = 0; i < plan.passes.size(); ++i) run<PartialSumsProgram>(plan.passes[i], plan.blocks[i]);
  }
};

// An operator's outputs, in order, appended to `out`.
void add_tensors(std::vector<at::Tensor>& out, const at::Tensor& t) { out.push_back(t); }
void add_tensors(std::vector<at::Tensor>& out, const LeNetActivations& a) {
  out.insert(out.end(), {a.logits, a.block1, a.block2, a.fc1, a.fc2});
}
template <typename... Ts>
void add_tensors(std::vector<at::Tensor>& out, const std::tuple<Ts...>& t) {
  std::apply([&](const auto&... each) { (add_tensors(out, each), ...); }, t);
}

// call(emulator)'s outputs, having checked that both launch orders give
// them bit for bit.
template <typename Call>
auto in_both_orders(const char* op, int64_t threads, const Call& call) {
  auto result = call(Emulator{op, threads, LaunchOrder::kLastBlockFirst});
  const auto mirrored = call(Emulator{op, threads, LaunchOrder::kFirstBlockFirst});
  std::vector<at::Tensor> a, b;
  add_tensors(a, result);
  add_tensors(b, mirrored);
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].defined() && !b[i].defined()) continue;
    const bool same = a[i].defined() && b[i].defined() && a[i].sizes() == b[i].sizes() &&
                      (a[i].numel() == 0 || std::memcmp(a[i].contiguous().const_data_ptr(),
                                                        b[i].contiguous().const_data_ptr(), a[i].nbytes()) == 0);
    TORCH_CHECK(same, op, ": output ", i, " depends on the order of the blocks and threads");
  }
  return result;
}

int checked_tile(const char* op, int64_t tile) {
  TORCH_CHECK_VALUE(tile >= 1 && tile <= 1024, op, ": expected 1 <= tile <= 1024, got ", tile);
  return static_cast<int>(tile);
}

LeNetActivations lenet_tile_emulated(const char* op, const at::Tensor& x, const LeNetParams& p, int64_t tile,
                                     int64_t threads, bool train) {
  TORCH_CHECK_TYPE(tile_program_fits(x, p), op, ": the tile program takes float32 only");
  const int images = checked_tile(op, tile);
  return in_both_orders(op, threads, [&](const Emulator& emulator) {
    const LeNetTileCall call = prepare_tile_call(x, p, train, [&](const LeNetTileShape&) { return images; });
    emulator.run<LeNetTileProgram>(call.params, (x.size(0) + tile - 1) / tile);
    return call.out;
  });
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
  const int images = checked_tile(op, tile);
  return in_both_orders(op, threads, [&](const Emulator& emulator) {
    const ForwardCall call = prepare_forward(x, weight, bias, padding, pool);
    TORCH_CHECK_TYPE(conv_tile_program_fits(call.g, x), op, ": the tile program takes float32 only");
    emulator.run<ConvTileForwardProgram>(conv_tile_forward_params(call, images), (call.g.batch + tile - 1) / tile);
    return call.out;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_tile_emulated(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t padding, int64_t pool, std::array<bool, 3> output_mask, int64_t tile, int64_t threads) {
  constexpr const char* op = "_conv_sigmoid_avgpool2d_backward_tile_emulated";
  const int images = checked_tile(op, tile);
  TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
  return in_both_orders(op, threads, [&](const Emulator& emulator) {
    const BackwardCall call = prepare_backward(grad_out, x, weight, bias, padding, pool, output_mask);
    TORCH_CHECK_TYPE(conv_tile_program_fits(call.g, x), op, ": the tile program takes float32 only");
    const ConvTileBackward tiled = prepare_tile_backward(call, images, static_cast<int>(threads));
    // The program must write every partial sum it is given: NaN shows one it does not.
    if (tiled.tiles > 0) tiled.partials.fill_(std::nanf(""));
    const ConvTileSums sums = prepare_tile_sums(call, tiled);
    emulator.run<ConvTileBackwardProgram>(tiled.params, tiled.tiles);
    emulator.partial_sums(sums.plan);
    return std::tuple<at::Tensor, at::Tensor, at::Tensor>{call.grad_x, sums.grad_weight, sums.grad_bias};
  });
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
  return in_both_orders(op, threads, [&](const Emulator& emulator) {
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
    emulator.run<LeNetBackwardTileProgram>(call.params, call.tiles);
    if (call.conv1_tiles > 0) emulator.run<ConvTileBackwardProgram>(call.conv1_params, call.conv1_tiles);
    if (const int64_t blocks = dense_weight_grads_blocks(call.dense_params); blocks > 0)
      emulator.run<DenseWeightGradsProgram>(call.dense_params, blocks);
    emulator.partial_sums(call.sums);
    return call.finish();
  });
}

// The sum over dim 0 of a (rows, columns) float32 tensor, as the tile
// programs' last step adds their partial sums.
at::Tensor tile_partial_sums_emulated(const at::Tensor& partials, int64_t threads) {
  constexpr const char* op = "_tile_partial_sums_emulated";
  TORCH_CHECK_VALUE(partials.dim() == 2, op, ": expected a 2-d partials, got shape ", partials.sizes());
  TORCH_CHECK_TYPE(partials.scalar_type() == at::kFloat, op, ": expected float32, got ", partials.scalar_type());
  TORCH_CHECK_VALUE(threads >= 1, op, ": expected threads >= 1, got ", threads);
  const at::Tensor rows = partials.contiguous();
  const int columns = static_cast<int>(rows.size(1));
  return in_both_orders(op, threads, [&](const Emulator& emulator) {
    at::Tensor out = at::empty({rows.size(1)}, rows.options());
    const PartialSumsPlan plan = plan_partial_sums(
        {ColumnSum{rows.const_data_ptr<float>(), rows.size(0), columns, 0, columns, out.mutable_data_ptr<float>(), 0}},
        rows.options());
    out.fill_(std::nanf(""));
    emulator.partial_sums(plan);
    return out;
  });
}

// A program with one of these faults, or none, for the tests of the checks
// above; a thread's two phases write its own float of the output.
enum class Race {
  kNone,     // a thread reads its neighbour's shared memory behind the barrier
  kShared,   // ... in the phase that writes it, into shared memory
  kGlobal,   // ... in the phase that writes it, into global memory
  kBlocks,   // a block reads the output of the block after it
  kOutside,  // the last thread writes one float past the block's shared memory
};
constexpr const char* kRaceNames[] = {"none", "shared", "global", "blocks", "outside"};

struct RaceProbeParams {
  struct {
    int floats;
  } s;
  Race race;
  int64_t tiles;
  float* out;
};

struct RaceProbeProgram {
  using Params = RaceProbeParams;
  static constexpr int kPhases = 2;

  static void run_phase(int phase, const Params& p, float* smem, int64_t tile, int tid, int threads) {
    float* out = p.out + tile * threads + tid;
    const int neighbour = (tid + 1) % threads;
    if (phase == 0) {
      smem[tid] = static_cast<float>(tid + 1);
      if (p.race == Race::kShared) smem[threads + tid] = smem[neighbour];
      if (p.race == Race::kGlobal) *out = smem[neighbour];
      if (p.race == Race::kOutside && tid == threads - 1) smem[p.s.floats] = 0.0f;
      return;
    }
    if (p.race == Race::kNone) *out = smem[neighbour];
    if (p.race == Race::kShared) *out = smem[threads + tid];
    if (p.race == Race::kBlocks) *out = 1.0f + (tile + 1 < p.tiles ? out[threads] : 0.0f);
  }
};

// The probe's output over three blocks of four threads.
at::Tensor tile_emulation_race_probe(c10::string_view race_name) {
  constexpr const char* op = "_tile_emulation_race_probe";
  constexpr int64_t kTiles = 3;
  constexpr int kThreads = 4;
  constexpr int kRaces = static_cast<int>(std::size(kRaceNames));
  int race = 0;
  while (race < kRaces && race_name != kRaceNames[race]) ++race;
  TORCH_CHECK_VALUE(race < kRaces, op, ": expected race none, shared, global, blocks or outside, got ", race_name);
  return in_both_orders(op, kThreads, [&](const Emulator& emulator) {
    at::Tensor out = at::zeros({kTiles * kThreads});
    const RaceProbeParams params{{2 * kThreads}, static_cast<Race>(race), kTiles, out.mutable_data_ptr<float>()};
    emulator.run<RaceProbeProgram>(params, kTiles);
    return out;
  });
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

TORCH_LIBRARY_IMPL(lenet_ext, CompositeExplicitAutograd, m) {
  m.impl("_tile_emulation_race_probe", &tile_emulation_race_probe);
}

}  // namespace lenet_ext
