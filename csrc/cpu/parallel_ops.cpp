// The op that says which parallel loops the CPU ops run on (cpu/parallel.h): the work pool, or OpenMP with
// LAYERSKIP_WORK_POOL=0. One reading of the variable, for C++ and Python alike.
#include <torch/library.h>

#include "cpu/parallel.h"
#include "ops.h"

namespace layerskip {

bool work_pool_enabled_cpu() { return cpu::use_work_pool(); }

// No tensor arguments: dispatched to its CompositeImplicitAutograd kernel.
TORCH_LIBRARY_IMPL(layerskip, CompositeImplicitAutograd, m) { m.impl("work_pool_enabled", &work_pool_enabled_cpu); }

}  // namespace layerskip
