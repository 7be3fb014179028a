// Counter-based random numbers shared by the CPU and CUDA kernels and by reference.py.
//
// A draw is a pure function of (seed, counter): no generator state lives on the device, a
// generation is reproducible from its seed, and the CPU and CUDA kernels draw the same numbers.
// splitmix64 finaliser of seed ^ (counter * golden ratio), top 53 bits as a double in [0, 1).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LAYERSKIP_HOST_DEVICE __host__ __device__
#else
#define LAYERSKIP_HOST_DEVICE
#endif

namespace layerskip {

LAYERSKIP_HOST_DEVICE inline double uniform_from_counter(uint64_t seed, uint64_t counter) {
  uint64_t z = seed ^ (counter * 0x9E3779B97F4A7C15ull);
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
}

}  // namespace layerskip
