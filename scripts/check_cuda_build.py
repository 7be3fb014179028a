"""Checks a CUDA build of layerskip_ext without a GPU: it imports, and every op of torch.ops.layerskip has a
kernel registered for the CUDA dispatch key (and one for CPU, unless --cuda-only: the op-library-only build of
scripts/build_cuda.sh has no CPU kernels). Exit code 1 naming the ops that lack one.

    PYTHONPATH=build/cuda/lib.linux-x86_64-cpython-311 python scripts/check_cuda_build.py [--cuda-only] [expected_dir]
"""
import os
import sys

import torch

import layerskip_ext  # noqa: F401
from layerskip_ext import engine

args = sys.argv[1:]
cuda_only = "--cuda-only" in args
args = [a for a in args if a != "--cuda-only"]
if args:  # the build under test, not another installed copy
    where = os.path.dirname(os.path.abspath(engine.__file__))
    if not where.startswith(os.path.abspath(args[0])):
        sys.exit(f"check_cuda_build: imported layerskip_ext from {where}, not from {args[0]}")
if not engine.is_available():
    sys.exit(f"check_cuda_build: the extension did not import: {engine._IMPORT_ERROR}")

ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("layerskip::"))
# CPU-only by design, for now: the packed GGUF block kernels (csrc/cpu/quant_linear.cpp; a CUDA path for packed
# weights is not written yet), their 16-row interleaving, and the selection of their SIMD path and of linear's and
# attention's CPU kernels and of the CPU ops' parallel loops. Listed here so
# that any other op without a CUDA kernel still fails the check.
CPU_ONLY = {"layerskip::linear_quantized", "layerskip::linear_quantized.out", "layerskip::dequantize_rows",
            "layerskip::quant_kernels", "layerskip::quant_kernel", "layerskip::set_quant_kernel",
            "layerskip::linear_kernels", "layerskip::linear_kernel", "layerskip::set_linear_kernel",
            "layerskip::attention_kernels", "layerskip::attention_kernel", "layerskip::set_attention_kernel",
            "layerskip::quant_activations", "layerskip::set_quant_activations", "layerskip::interleave_quantized",
            "layerskip::work_pool_enabled"}
if not ops:
    sys.exit("check_cuda_build: no layerskip ops registered")


def has_kernel(op: str, key: str) -> bool:
    """A kernel for `key`, or a composite one (the ops without tensor arguments, which some torch versions do not
    count for CPU)."""
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in (key, "CompositeImplicitAutograd"))


missing = {key: [op for op in ops if not has_kernel(op, key) and not (key == "CUDA" and op in CPU_ONLY)]
           for key in (("CUDA",) if cuda_only else ("CPU", "CUDA"))}
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {len(ops)} layerskip ops:")
for op in ops:
    cells = [f"  {key} {'NO' if op in m else 'CPU-only' if key == 'CUDA' and op in CPU_ONLY else 'yes'}"
             for key, m in missing.items()]
    print(f"  {op:40s}" + "".join(cells))
if any(missing.values()):
    sys.exit(f"check_cuda_build: FAILED, kernels missing: {missing}")
print(f"check_cuda_build: every op has a kernel for {' and '.join(missing)}")
