"""codeserve: a local, OpenAI-compatible inference server for small code models."""

import os

__version__ = "0.1.0"

# llama.cpp's CPU backend, built with OpenMP, meets its threads at libgomp barriers between
# operations. Once a process runs more OpenMP threads than it has cores, libgomp spins only 100
# times before a waiting thread sleeps, and every engine past the first (an embedding model,
# another model) brings a thread team of its own: after one embeddings request the default model
# decoded several times slower, until the embedding model unloaded (bench.second_engine). ACTIVE
# makes that 1,000 spins; the spin count pins libgomp's own default for a single team (ACTIVE alone
# would spin minutes after each decode). libgomp reads both once, when llama_cpp first loads it,
# so they are set here, before any module imports llama_cpp; a user's own setting of either wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ["GOMP_SPINCOUNT"] = "300000"
