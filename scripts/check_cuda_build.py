"""Checks a CUDA build of layerskip_ext without a GPU: it imports, and every op of torch.ops.layerskip has a
kernel registered for the CUDA dispatch key (and one for CPU). Exit code 1 naming the ops that lack one.

    PYTHONPATH=build/cuda/lib.linux-x86_64-cpython-311 python scripts/check_cuda_build.py [expected_dir]
"""
import os
import sys

import torch

import layerskip_ext  # noqa: F401
from layerskip_ext import engine

if len(sys.argv) > 1:  # the build under test, not another installed copy
    where = os.path.dirname(os.path.abspath(engine.__file__))
    if not where.startswith(os.path.abspath(sys.argv[1])):
        sys.exit(f"check_cuda_build: imported layerskip_ext from {where}, not from {sys.argv[1]}")
if not engine.is_available():
    sys.exit(f"check_cuda_build: the extension did not import: {engine._IMPORT_ERROR}")

ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("layerskip::"))
if not ops:
    sys.exit("check_cuda_build: no layerskip ops registered")
missing = {key: [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
           for key in ("CPU", "CUDA")}
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {len(ops)} layerskip ops:")
for op in ops:
    print(f"  {op:40s} CPU {'yes' if op not in missing['CPU'] else 'NO'}  CUDA {'yes' if op not in missing['CUDA'] else 'NO'}")
if missing["CPU"] or missing["CUDA"]:
    sys.exit(f"check_cuda_build: FAILED, kernels missing: {missing}")
print("check_cuda_build: every op has a CPU and a CUDA kernel")
