# Builds layerskip_ext._C with torch.utils.cpp_extension.
#
# A CUDAExtension when a CUDA build of torch and nvcc are present, else a CppExtension.
# Knobs (environment variables):
#   LAYERSKIP_CUDA=0|1   force the CPU-only or the CUDA build
#   LAYERSKIP_MARCH=...  value of -march for the CPU kernels (default: native)
#   LAYERSKIP_DEBUG=1    build with -O0 -g
#   LAYERSKIP_SANITIZE=1 build with AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh)
#   TORCH_CUDA_ARCH_LIST GPU architectures (default: the visible GPU's, or 8.0;9.0+PTX without one)
#   LAYERSKIP_SYSTEM_CXX the C++ compiler used instead of a CXX that links libstdc++ statically into shared objects
#                        (default /usr/bin/g++, with the gcc beside it; "" refuses such a CXX)
#   LAYERSKIP_CUDA_OPS_ONLY=1  only the op schemas and the CUDA kernels (no CPU kernels, no engine): the quick
#                        CUDA compile-and-register check of scripts/build_cuda.sh
import glob
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """The CUDA toolkit root, following an `nvcc` wrapper script to the real compiler."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"#!"):  # a wrapper script: find the real nvcc it calls
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if match is None:
            return None
        nvcc = os.path.realpath(match.group(1).decode())
    home = os.path.dirname(os.path.dirname(nvcc))
    return home if os.path.isdir(os.path.join(home, "include")) else None


def _nvidia_wheel_includes():
    """Header folders of the pip `nvidia-*` wheels (cusparse.h and friends live there)."""
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _links_libstdcxx_statically(cxx: str) -> bool:
    """True when the C++ compiler `cxx` puts libstdc++ itself into a shared object instead of linking libstdc++.so
    (a compiler wrapper on one of our GPU machines did). Such an extension carries a second C++ runtime beside the
    one torch uses: formatting an integer into an error message (TORCH_CHECK) crashed it with a segfault. False
    when it cannot tell (no readelf, the probe does not build): the build itself then reports."""
    if shutil.which("readelf") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\nstd::string probe(long n) { std::ostringstream s; s << n; return s.str(); }\n")
        try:
            built = subprocess.run(shlex.split(cxx) + ["-shared", "-fPIC", src, "-o", lib], capture_output=True,
                                   timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if built.returncode != 0:
            return False
        needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
        if "NEEDED" not in needed or any(runtime in needed for runtime in ("libstdc++", "libc++")):
            return False
        # No C++ runtime among the libraries: statically linked only when the probe's std:: functions are in it. A
        # C compiler driver (CXX=gcc, CXX=clang) links no runtime at all and leaves them undefined, for the
        # process's libstdc++ (torch's) to supply: one runtime, nothing to refuse.
        symbols = subprocess.run(["readelf", "--dyn-syms", "-W", lib], capture_output=True, text=True).stdout
        for line in symbols.splitlines():
            fields = line.split()
            if len(fields) >= 8 and fields[6] == "UND" and fields[7].startswith(("_ZNS", "_ZNKS")):
                return False
        return True


# A compiler that links libstdc++ statically is replaced by the system's GCC when that one links it as a shared
# library (LAYERSKIP_SYSTEM_CXX names another C++ compiler to try, "" none), else refused.
_cxx = os.environ.get("CXX", "c++")
if sys.platform.startswith("linux") and _links_libstdcxx_statically(_cxx):
    _system_cxx = os.environ.get("LAYERSKIP_SYSTEM_CXX", "/usr/bin/g++")
    _system_cc = re.sub(r"g\+\+(-[0-9.]+)?$", r"gcc\1", _system_cxx)
    if (_system_cxx and shutil.which(_system_cxx) and shutil.which(_system_cc)
            and not _links_libstdcxx_statically(_system_cxx)):
        print(f"layerskip_ext: the C++ compiler {_cxx!r} links libstdc++ statically into shared objects (the "
              f"extension would carry its own C++ runtime beside torch's and crash); building with {_system_cxx} "
              f"and {_system_cc} instead", file=sys.stderr)
        os.environ["CXX"], os.environ["CC"] = _system_cxx, _system_cc
    else:
        sys.exit(f"layerskip_ext: the C++ compiler {_cxx!r} links libstdc++ statically into shared objects, so the "
                 "extension would carry its own C++ runtime beside torch's and crash (e.g. in its error messages); "
                 "set CXX and CC to a compiler that links libstdc++.so, such as the system's /usr/bin/g++")

cuda_home = _real_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

force = os.environ.get("LAYERSKIP_CUDA")
if force not in (None, "", "0", "1"):
    sys.exit(f"LAYERSKIP_CUDA must be 0 or 1, got {force!r}")
cuda_ops_only = os.environ.get("LAYERSKIP_CUDA_OPS_ONLY") == "1"
if cuda_ops_only and force != "1":
    sys.exit("LAYERSKIP_CUDA_OPS_ONLY=1 needs LAYERSKIP_CUDA=1")
if force == "1":
    if torch.version.cuda is None or cuda_home is None:
        sys.exit("LAYERSKIP_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME not found)")
    use_cuda = True
elif force == "0":
    use_cuda = False
else:
    use_cuda = torch.version.cuda is not None and cuda_home is not None

debug = os.environ.get("LAYERSKIP_DEBUG") == "1"
march = os.environ.get("LAYERSKIP_MARCH", "native")
cxx_flags = ["-O0", "-g"] if debug else ["-O3", f"-march={march}", "-ffp-contract=fast"]
# -fopenmp: at::parallel_for is an inline OpenMP loop in the headers; without it, it runs serially.
# The C++ standard is torch's (C++17 for 2.11, C++20 for 2.13 and later): the sources are C++17.
cxx_flags += ["-fvisibility=hidden", "-fopenmp"]
nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
link_flags = []
if os.environ.get("LAYERSKIP_SANITIZE") == "1":
    # every report is fatal; float-cast-overflow is not part of GCC's -fsanitize=undefined; vptr checks need
    # RTTI that libtorch's classes do not all expose to us
    sanitizers = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize=vptr",
                  "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cxx_flags = ["-O1", "-g", f"-march={march}", "-ffp-contract=fast", "-fvisibility=hidden", "-fopenmp"] + sanitizers
    link_flags = sanitizers

if cuda_ops_only:
    sources = sorted(glob.glob("csrc/*.cpp"))
else:
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/engine/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []
if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # no GPU to ask which architecture to build for: Ampere and Hopper, plus PTX for newer GPUs
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs += _nvidia_wheel_includes()
    define_macros.append(("LAYERSKIP_WITH_CUDA", "1"))
    Extension = CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    Extension = CppExtension
    extra = {"cxx": cxx_flags}

ext = Extension(
    name="layerskip_ext._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=link_flags,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_dir={"layerskip_ext": "python/layerskip_ext", "layerskip_ext.training": "training"},
    packages=["layerskip_ext", "layerskip_ext.server", "layerskip_ext.training"],
    package_data={"layerskip_ext.training": ["configs/*.json", "configs/*.yaml"]},
)
