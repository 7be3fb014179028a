// The valid sampling temperatures, one rule for the CPU ops, the CUDA kernels and the engine (Python's copy:
// sampling.py MIN_TEMPERATURE / MAX_TEMPERATURE). Host and device code (no torch headers).
#pragma once

#ifndef LAYERSKIP_HOST_DEVICE
#if defined(__CUDACC__)
#define LAYERSKIP_HOST_DEVICE __host__ __device__
#else
#define LAYERSKIP_HOST_DEVICE
#endif
#endif

namespace layerskip {

// 0 (greedy) or in [1e-4, 1e4]: below 1e-4, 1/T scales logit gaps past float range (NaN probabilities; a float
// temperature under ~3e-39 is 0 and 1/T inf); above 1e4 the distribution is uniform anyway. NaN is outside.
LAYERSKIP_HOST_DEVICE inline bool temperature_in_range(double t) { return t == 0.0 || (t >= 1e-4 && t <= 1e4); }

}  // namespace layerskip
