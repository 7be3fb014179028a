"""The devices that the op and engine tests run on: the CPU always, and CUDA as a parameter that is skipped
(and reported as skipped, never as passed) when there is no GPU or the extension was built without its CUDA
kernels. Tests that run only on CUDA use `requires_cuda`."""
import pytest
import torch

import layerskip_ext._C  # noqa: F401  (registers the ops and their kernels)


def cuda_skip_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("layerskip::rms_norm", "CUDA"):
        return "layerskip_ext was built without its CUDA kernels"
    return None


CUDA_SKIP_REASON = cuda_skip_reason()
requires_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
DEVICES = ["cpu", CUDA]
