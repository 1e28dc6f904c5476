"""What llama.cpp runs on: ggml's backend devices (CPU, CUDA, Metal, ...) and their memory.

llama-cpp-python does not bind ggml's device registry, so it is read through ctypes from the
libggml already loaded by llama_cpp (``binding.ggml_function``). Used for the start-up report:
backend, device, layers offloaded, and device memory used by the load (free memory before minus
after).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from server.engine.binding import ggml_function

log = logging.getLogger(__name__)

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str
    free_bytes: int
    total_bytes: int


def list_devices() -> list[Device]:
    symbols = (
        "ggml_backend_dev_count",
        "ggml_backend_dev_get",
        "ggml_backend_dev_name",
        "ggml_backend_dev_description",
        "ggml_backend_dev_type",
        "ggml_backend_dev_memory",
    )
    fns = [ggml_function(symbol) for symbol in symbols]
    if any(fn is None for fn in fns):
        return []
    count, get, dev_name, description, kind, memory = fns
    count.restype = ctypes.c_size_t
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    for fn in (dev_name, description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    kind.restype, kind.argtypes = ctypes.c_int, [ctypes.c_void_p]
    memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    devices = []
    for i in range(count()):
        dev = get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            Device(
                name=dev_name(dev).decode(),
                description=description(dev).decode(),
                kind=_TYPES.get(kind(dev), "other"),
                free_bytes=free.value,
                total_bytes=total.value,
            )
        )
    return devices


def offloaded_layers(n_gpu_layers: int, n_layer: int, gpu_build: bool) -> int:
    if not gpu_build:
        return 0
    return n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)


def report_load(
    model: str, before: list[Device], n_gpu_layers: int, n_layer: int, gpu_build: bool
) -> str:
    after = {d.name: d for d in list_devices()}
    accelerators = [d for d in before if d.kind != "cpu"]
    layers = offloaded_layers(n_gpu_layers, n_layer, gpu_build)
    if not accelerators:
        line = (
            f"model {model}: backend CPU, 0/{n_layer} layers offloaded (no GPU backend in "
            "this llama.cpp build)"
        )
    else:
        parts = []
        for d in accelerators:
            used = d.free_bytes - after.get(d.name, d).free_bytes
            parts.append(
                f"{d.name} ({d.description}): {used / 2**20:.0f} MiB used by this "
                f"model, {after.get(d.name, d).free_bytes / 2**20:.0f} of "
                f"{d.total_bytes / 2**20:.0f} MiB free"
            )
        line = f"model {model}: {layers}/{n_layer} layers offloaded; " + "; ".join(parts)
    log.info(line)
    return line
