// The weights as the vectorised kernels read them: in blocks of 16 output
// channels, each tap's 16 channels side by side, so that one vector load
// gives a tap for a whole block. Packed in one pass per call (at batch 1 this
// is a visible part of the call) and read only through the accessors below.
//
//   weights  [C_out / 16][C_in][K][K][16]
//   bias     [C_out / 16][16]
//
// both zero-padded to whole blocks of 16 channels.
#pragma once

#include <cstdint>

namespace lenet_ext {
namespace cpu {

constexpr int kLanes = 16;

struct PackedWeights {
  const float* weights;
  const float* bias;
  int64_t per_channel;  // C_in * K * K

  static int64_t blocks(int64_t out_channels) { return (out_channels + kLanes - 1) / kLanes; }

  // Floats of a packed copy of out_channels filters of per_channel taps each.
  static int64_t size(int64_t out_channels, int64_t per_channel) {
    return blocks(out_channels) * kLanes * (per_channel + 1);
  }

  // Packs weight (C_out, C_in, K, K) and bias (C_out, or nullptr: zeros) into
  // dst, which holds size() floats.
  static PackedWeights pack(const float* weight, const float* bias, int64_t out_channels,
                            int64_t per_channel, float* dst) {
    const int64_t padded = blocks(out_channels) * kLanes;
    float* packed_bias = dst + padded * per_channel;
    for (int64_t co = 0; co < padded; ++co) {
      const bool real = co < out_channels;
      float* filter = dst + (co / kLanes) * per_channel * kLanes + co % kLanes;
      for (int64_t i = 0; i < per_channel; ++i) filter[i * kLanes] = real ? weight[co * per_channel + i] : 0.0f;
      packed_bias[co] = real && bias ? bias[co] : 0.0f;
    }
    return {dst, packed_bias, per_channel};
  }

  // The [C_in][K][K][16] taps of channel block cb, and its 16 biases.
  const float* block(int64_t cb) const { return weights + cb * per_channel * kLanes; }
  const float* block_bias(int64_t cb) const { return bias + cb * kLanes; }
  // Channel co's taps, kLanes floats apart.
  const float* filter(int64_t co) const { return block(co / kLanes) + co % kLanes; }
};

}  // namespace cpu
}  // namespace lenet_ext
