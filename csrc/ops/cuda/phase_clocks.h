// Clock stamps of the tile programs' phases: where a program's time goes,
// phase by phase, on machines where Nsight Compute cannot run
// (scripts/phase_profile.py reads them). While recording is on, each launch
// gets a buffer of tiles x (phases + 1) stamps, and thread 0 of every block
// writes the multiprocessor's clock64() as the block starts and after each
// phase's barrier. Off (the default), launches pass null and write nothing.
// Recording allocates and waits for the device: not for timed runs or
// CUDA graph captures. The buffers live until take_phase_clocks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lenet_ext {

void record_phase_clocks(bool on);

// A buffer for one launch of `tiles` blocks of a program with these phases,
// on the current device, or null when not recording.
long long* phase_clock_buffer(const char* program, const char* const* phase_names, int phases, int64_t tiles);

struct PhaseClocks {
  std::string program;
  std::vector<std::string> phases;
  int64_t tiles;
  std::vector<long long> stamps;  // tiles x (phases + 1)
};

// The launches recorded since the last call, in launch order; waits for them.
std::vector<PhaseClocks> take_phase_clocks();

}  // namespace lenet_ext
