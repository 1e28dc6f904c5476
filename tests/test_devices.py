"""The start-up placement report: which backend, how many layers offloaded, device memory."""

from __future__ import annotations

from pathlib import Path

from bench.harness import loaded_libraries
from server.engine.devices import list_devices, offloaded_layers, report_load


def test_devices_of_this_build():
    devices = list_devices()
    cpu = [d for d in devices if d.kind == "cpu"]
    assert cpu and cpu[0].total_bytes > 0


def test_reading_the_devices_loads_no_second_copy_of_ggml():
    list_devices()
    # The wheel ships libggml.so and libggml.so.0 as separate files: one process should map one.
    stems = [Path(p).name.split(".so")[0] for p in loaded_libraries()]
    assert "libggml" in stems and "libggml-base" in stems
    assert len(stems) == len(set(stems)), loaded_libraries()


def test_offloaded_layers():
    assert offloaded_layers(-1, 30, gpu_build=True) == 30
    assert offloaded_layers(12, 30, gpu_build=True) == 12
    assert offloaded_layers(99, 30, gpu_build=True) == 30
    assert offloaded_layers(-1, 30, gpu_build=False) == 0


def test_report_on_a_cpu_only_build():
    import llama_cpp

    line = report_load("m", list_devices(), -1, 30, llama_cpp.llama_supports_gpu_offload())
    if not llama_cpp.llama_supports_gpu_offload():
        assert "backend CPU" in line and "0/30 layers" in line
    else:
        assert "layers offloaded" in line and "MiB" in line
