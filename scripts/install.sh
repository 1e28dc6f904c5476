#!/usr/bin/env bash
# One install recipe for every place codeserve is set up: `make serve`/`make test` run it on a
# developer's machine, the Dockerfile's builder stage runs it in the image. Keeping one script means
# the container cannot drift from what CI tests.
#
#   scripts/install.sh VENV [EXTRAS]
#
# VENV    virtualenv to create or update (created with $PYTHON, default python3)
# EXTRAS  pip extras of codeserve, comma-separated (default: none, which is all serving needs):
#         "bench" and "quantize" bring those tools' dependencies, "dev" brings both plus the test
#         and lint tools (`make test` passes dev; `make serve` and the Dockerfile pass nothing)
#
# CODESERVE_EDITABLE=0 installs a regular (non-editable) copy, as the container image does.
#
# llama-cpp-python ships as an sdist only, so its C++ core is compiled here (9-12 min on 2 cores),
# with codeserve's patches for that version applied (patches/). The wheel is cached under
# $CODESERVE_WHEEL_CACHE keyed by version, CMAKE_ARGS *and* the patches: pip's own wheel cache
# ignores CMAKE_ARGS and would hand a CPU wheel to someone who asked for CUDA.
set -euo pipefail

venv=${1:?usage: scripts/install.sh VENV [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

# Pinned: the version the test suite was run against.
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
# Portable x86-64 CPU build. A GGML_NATIVE build enables AMX when the CPU reports it, and segfaults
# in ggml_backend_amx_mul_mat where the kernel does not let the process use it (some VMs/sandboxes).
# Override for GPUs: CMAKE_ARGS="-DGGML_CUDA=on" (NVIDIA) or CMAKE_ARGS="-DGGML_METAL=on" (macOS).
default_cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if [ "$(uname -s)" = Darwin ]; then default_cmake_args="-DGGML_METAL=on"; fi
if [ "$(uname -m)" = aarch64 ] || [ "$(uname -m)" = arm64 ]; then
  default_cmake_args="-DGGML_NATIVE=OFF"
  [ "$(uname -s)" = Darwin ] && default_cmake_args="-DGGML_METAL=on"
fi
export CMAKE_ARGS=${CMAKE_ARGS:-$default_cmake_args}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}

# Patches codeserve carries for that version (patches/llama-cpp-python-VERSION/*.patch, each saying
# why), applied to the sdist before it is compiled. A version without patches builds as released.
patches=()
if [ -d "$here/patches/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION" ]; then
  patches=("$here/patches/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"/*.patch)
fi
patch_sum=$(cat /dev/null ${patches[@]+"${patches[@]}"} | sha256sum | cut -c1-16)

cache_root=${CODESERVE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/codeserve/wheels}
key=$(printf '%s\n%s\n%s\n%s\n' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS" "$(uname -sm)" "$patch_sum" | sha256sum | cut -c1-16)
wheel_dir=$cache_root/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$key

if [ ! -x "$venv/bin/python" ]; then
  echo ">> creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo ">> building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (CMAKE_ARGS=$CMAKE_ARGS)"
  echo ">> this compiles llama.cpp and takes about 10 minutes on 2 cores; it is cached in $wheel_dir"
  rm -rf "$wheel_dir.tmp" && mkdir -p "$wheel_dir.tmp/sdist"
  "${pip[@]}" download --no-deps --no-binary :all: -d "$wheel_dir.tmp/sdist" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$wheel_dir.tmp/sdist"/llama_cpp_python-*.tar.gz -C "$wheel_dir.tmp/sdist"
  sdist=("$wheel_dir.tmp/sdist"/llama_cpp_python-*/)
  src=${sdist[0]}
  for p in ${patches[@]+"${patches[@]}"}; do
    echo ">> applying $(basename "$p")"
    patch -d "$src" -p1 --forward --batch --quiet < "$p"
  done
  "${pip[@]}" wheel --no-deps --no-cache-dir -w "$wheel_dir.tmp" "$src"
  rm -rf "$wheel_dir.tmp/sdist" "$wheel_dir"
  mv "$wheel_dir.tmp" "$wheel_dir"
fi

echo ">> installing codeserve into $venv"
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
# Forced: a build with other patches or CMAKE_ARGS carries the same version number, so pip alone
# would keep whichever copy the virtualenv already has.
"${pip[@]}" install --quiet --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
"${pip[@]}" install --quiet --find-links "$wheel_dir" "$wheel_dir"/llama_cpp_python-*.whl
if [ "${CODESERVE_EDITABLE:-1}" = 0 ]; then
  "${pip[@]}" install --quiet --find-links "$wheel_dir" "$spec"
else
  "${pip[@]}" install --quiet --find-links "$wheel_dir" -e "$spec"
fi
