#!/usr/bin/env bash
# Sets up a development environment on a machine WITHOUT a ROS 2 install:
#   1. a virtual environment (.venv) with ROS 2 Kilted from PyPI, CPU PyTorch and the rest;
#   2. our messages (msg/, srv/) built with CMake against those wheels (.ros/install);
#   3. the Python package installed in editable mode, and env.sh to source.
#
# Idempotent: each step is skipped when its inputs have not changed since the last run, so a
# second run takes a second or two. On a machine WITH ROS 2 use colcon instead (README).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QWEN3VL_SEG_VENV:-$ROOT/.venv}"
ROSDIR="$ROOT/.ros"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
cd "$ROOT"

log() { printf '[setup] %s\n' "$*"; }
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
t0=$(date +%s)

# --- 1. virtual environment and Python dependencies --------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    # the ROS wheels and the pins of requirements/ are for these two
    "$PY" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' 2>/dev/null || {
        echo "[setup] needs Python 3.11 or 3.12; '$PY' is $("$PY" --version 2>&1). Install one (on Ubuntu:" \
             "python3.12-venv) or point PYTHON at it: PYTHON=python3.12 $0" >&2; exit 1; }
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
# pip's own exit status decides (a pipe through grep would hide a failed install); its notes
# about the local wheel store's index are left out of what is shown.
pip_install() {
    local out
    out="$(mktemp)"
    if "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$out" 2>&1; then
        grep -v "is ignored: it is neither" "$out" || true
        rm -f "$out"
    else
        grep -v "is ignored: it is neither" "$out" >&2 || true
        rm -f "$out"
        return 1
    fi
}
pip_stamp="$(stamp_of requirements/*.txt setup.py)"
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null)" != "$pip_stamp" ]; then
    log "installing Python dependencies (ROS 2 Kilted wheels, CPU PyTorch, transformers, ...)"
    # The ROS wheels re-exec the interpreter to set LD_LIBRARY_PATH; not needed while installing.
    export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
    pip_install --upgrade pip setuptools wheel \
        || { echo "[setup] could not upgrade pip (see above)" >&2; exit 1; }
    # PyPI's torch for Linux is the CUDA build (several GB of NVIDIA libraries). Without a local
    # wheel store (PIP_FIND_LINKS) the CPU build comes from PyTorch's own index first; where that
    # index cannot be reached, PyPI's build is used after all (it runs on a CPU too).
    # TORCH_INDEX_URL= (empty) skips it.
    torch_pin="$(grep -E '^torch==' requirements/base.txt || true)"
    torch_index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
    if [ -n "$torch_pin" ] && [ -z "${PIP_FIND_LINKS:-}" ] && [ -n "$torch_index" ]; then
        pip_install --retries 1 --timeout 30 --index-url "$torch_index" "$torch_pin" \
            || log "PyTorch's CPU index did not serve $torch_pin: torch comes from PyPI (with CUDA libraries)"
    fi
    pip_install -r requirements/ros.txt -r requirements/base.txt -r requirements/dev.txt \
        && "$VENV/bin/python" -c "import torch, transformers, cv2" \
        || { echo "[setup] dependency installation failed (see above); nothing marked as installed" >&2; exit 1; }
    echo "$pip_stamp" > "$VENV/.deps-stamp"
    rm -f "$ROSDIR/.build-stamp" "$VENV/.cmake-patched"  # reinstalled wheels bring their exports back
else
    log "Python dependencies up to date"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# --- 2. make the wheels' CMake exports point at this interpreter --------------------------
# The wheels were built on a manylinux image; their exported include folders name that
# machine's Python and NumPy headers, which do not exist here.
if [ ! -f "$VENV/.cmake-patched" ]; then
    log "rewriting the ROS wheels' CMake exports for this interpreter"
    PYINC="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    NPINC="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
    # (any CPython the wheels were built for; nothing to rewrite is no error)
    { grep -rlZ "/opt/python/cp3" "$VENV/share" --include='*.cmake' 2>/dev/null || true; } \
        | xargs -0 -r sed -i -E \
            -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#$NPINC#g" \
            -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$PYINC#g"
    touch "$VENV/.cmake-patched"
fi

# --- 3. build our interfaces (and the tf2_msgs / vision_msgs shims when missing) ----------
build_stamp="$(stamp_of msg/* srv/* CMakeLists.txt package.xml scripts/ros_shims/*/*/* scripts/ros_shims/*/*.txt scripts/ros_shims/*/*.xml)"
if [ "$(cat "$ROSDIR/.build-stamp" 2>/dev/null)" != "$build_stamp" ]; then
    export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
    export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
    export LD_LIBRARY_PATH="$VENV/lib:$ROSDIR/install/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PATH="$VENV/bin:$PATH"
    cmake_pkg() {  # name source
        log "building ROS interfaces: $1"
        rm -rf "$ROSDIR/build/$1"
        cmake -S "$2" -B "$ROSDIR/build/$1" -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_INSTALL_PREFIX="$ROSDIR/install" \
            -DCMAKE_PREFIX_PATH="$VENV;$ROSDIR/install" \
            -DPython3_EXECUTABLE="$VENV/bin/python" \
            -DINSTALL_PYTHON_PACKAGE=OFF -DBUILD_TESTING=OFF >"$ROSDIR/build-$1.log" 2>&1 \
            && cmake --build "$ROSDIR/build/$1" -j "$(nproc)" >>"$ROSDIR/build-$1.log" 2>&1 \
            && cmake --install "$ROSDIR/build/$1" >>"$ROSDIR/build-$1.log" 2>&1 \
            || { echo "[setup] building $1 failed; see $ROSDIR/build-$1.log" >&2; tail -30 "$ROSDIR/build-$1.log" >&2; exit 1; }
    }
    mkdir -p "$ROSDIR"
    # Stand-ins for interface packages that have no wheel (scripts/ros_shims): built only when
    # the environment lacks the real one, and rebuilt when their definitions change.
    for shim in tf2_msgs vision_msgs; do
        if [ ! -d "$VENV/share/$shim" ]; then
            rm -rf "$ROSDIR/install/share/$shim"
            cmake_pkg "$shim" "$ROOT/scripts/ros_shims/$shim"
        fi
    done
    # CMake refuses exported include folders (the venv's) inside the source folder: build the
    # interfaces from a staging copy instead of the repository root.
    rm -rf "$ROSDIR/src/qwen3vl_seg_ros" && mkdir -p "$ROSDIR/src/qwen3vl_seg_ros"
    cp -r msg srv CMakeLists.txt package.xml "$ROSDIR/src/qwen3vl_seg_ros/"
    cmake_pkg qwen3vl_seg_ros "$ROSDIR/src/qwen3vl_seg_ros"
    echo "$build_stamp" > "$ROSDIR/.build-stamp"
else
    log "ROS interfaces up to date"
fi

# --- 4. the Python package (editable) and the path to the generated messages --------------
if [ ! -f "$VENV/.editable-stamp" ] || [ "$(cat "$VENV/.editable-stamp")" != "$pip_stamp" ]; then
    log "installing qwen3vl_seg_ros in editable mode"
    mkdir -p "$ROSDIR"
    _ROS_WHEELS_BOOTSTRAP_COMPLETE=1 "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation \
        --disable-pip-version-check -e . --config-settings editable_mode=lenient >"$ROSDIR/pip-editable.log" 2>&1 \
        || { cat "$ROSDIR/pip-editable.log" >&2; exit 1; }
    echo "$pip_stamp" > "$VENV/.editable-stamp"
fi
# Generated Python messages live in .ros/install; a .pth file puts them on sys.path after the
# source tree (qwen3vl_seg_ros/__init__.py extends its __path__ to find msg/ and srv/ there).
PYVER="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
echo "$ROSDIR/install/lib/python$PYVER/site-packages" > "$SITE/zz_qwen3vl_seg_ros_interfaces.pth"

# --- 5. env.sh ------------------------------------------------------------------------------
cat > "$ROOT/env.sh" <<EOF
# Generated by scripts/setup.sh: source it to use ROS 2 (from PyPI) and this package.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export AMENT_PREFIX_PATH="$ROSDIR/install:$VENV"
export CMAKE_PREFIX_PATH="$ROSDIR/install:$VENV"
export LD_LIBRARY_PATH="$ROSDIR/install/lib:$VENV/lib:\$(ls -d "$SITE"/ros_*.libs 2>/dev/null | tr '\n' ':')\${LD_LIBRARY_PATH:-}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export ROS_AUTOMATIC_DISCOVERY_RANGE=\${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export PYTHONUNBUFFERED=1
EOF

# --- 6. smoke check ---------------------------------------------------------------------------
# shellcheck disable=SC1091
source "$ROOT/env.sh"
python -c "import rclpy, qwen3vl_seg_ros.msg, qwen3vl_seg_ros.srv, tf2_msgs.msg, vision_msgs.msg" \
    || { echo "[setup] the environment does not import; see messages above" >&2; exit 1; }
log "ready in $(( $(date +%s) - t0 )) s; use: source env.sh"
