"""setup.py and a C++ compiler that links libstdc++ statically into shared objects (the GPU machines' compiler
wrapper did: the extension then carried a second C++ runtime beside torch's and segfaulted formatting an integer
into a TORCH_CHECK message): the system's GCC builds instead, or, without one, the build is refused by name.
`python setup.py --name` runs the check without building anything."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("g++") and shutil.which("readelf")),
                                reason="needs Linux, g++ and readelf")


def setup_name(cxx: str, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXX=cxx, **env_vars)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_static_libstdcxx_compiler_without_a_system_one_is_refused_by_name():
    result = setup_name("g++ -static-libstdc++", LAYERSKIP_SYSTEM_CXX="")
    assert result.returncode != 0
    assert "links libstdc++ statically" in result.stderr and "g++ -static-libstdc++" in result.stderr


@pytest.mark.skipif(not (os.access("/usr/bin/g++", os.X_OK) and os.access("/usr/bin/gcc", os.X_OK)),
                    reason="needs /usr/bin/g++ and /usr/bin/gcc")
def test_static_libstdcxx_compiler_is_replaced_by_the_system_gcc():
    result = setup_name("g++ -static-libstdc++")
    assert result.returncode == 0, result.stderr
    assert "building with /usr/bin/g++ and /usr/bin/gcc instead" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "layerskip_ext"


def test_the_usual_compiler_passes():
    result = setup_name("g++")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "layerskip_ext"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_c_compiler_driver_is_not_taken_for_a_static_libstdcxx_one():
    """CXX=gcc (a C driver) links no C++ runtime into the probe: its std:: symbols stay undefined for torch's
    libstdc++ to supply, one runtime in the process. The probe took the missing libstdc++.so entry for a static
    libstdc++ and refused the build with a wrong reason."""
    result = setup_name("gcc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "layerskip_ext"
