"""The one module that touches llama-cpp-python's private internals.

``llama_cpp.Llama`` hides the pieces a server needs (a weights handle without a context, a
multi-sequence context, the batch it decodes, a logits row), so they are reached through
``llama_cpp._internals`` and ``Llama``'s underscored members here and nowhere else: a version bump
of llama-cpp-python is one diff in this file. Everything else uses llama.cpp's C API as
llama-cpp-python exports it publicly (``llama_cpp.llama_*``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np


def load_weights(
    path: str, *, n_gpu_layers: int, kv_overrides: dict[str, Any] | None = None
) -> Any:
    """Weights and vocabulary without a context (``_internals.LlamaModel``); ValueError if the
    file cannot be loaded."""
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
    keep: list[Any] = []
    if kv_overrides:
        params.kv_overrides = _kv_override_array(kv_overrides, keep)
    weights = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    weights._codeserve_keep = keep  # type: ignore[attr-defined]  # must outlive the load
    return weights


def _kv_override_array(overrides: dict[str, Any], keep: list[Any]) -> Any:
    """llama.cpp's --override-kv as the NULL-key-terminated array ``Llama`` builds."""
    import llama_cpp

    arr: Any = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
    for i, (k, v) in enumerate(overrides.items()):
        arr[i].key = k.encode()
        if isinstance(v, bool):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            arr[i].value.val_bool = v
        elif isinstance(v, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = v
        elif isinstance(v, float):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            arr[i].value.val_f64 = v
        elif isinstance(v, str):
            encoded = v.encode()
            if len(encoded) > 127:
                raise ValueError(f"kv override {k!r}: string values are limited to 127 bytes")
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            offset: int = llama_cpp.llama_model_kv_override_value.val_str.offset  # type: ignore[attr-defined]
            ctypes.memmove(ctypes.addressof(arr[i].value) + offset, encoded.ljust(128, b"\0"), 128)
        else:
            raise ValueError(f"kv override {k!r}: unsupported value {v!r}")
    arr[len(overrides)].key = b"\0"
    keep.append(arr)
    return arr


def weights_of(llm: Any) -> Any:
    """The weights handle inside a ``llama_cpp.Llama``."""
    return llm._model


def model_ptr(weights: Any) -> Any:
    return weights.model


def vocab_ptr(weights: Any) -> Any:
    return weights.vocab


def metadata(weights: Any) -> dict[str, str]:
    return dict(weights.metadata())


def token_text(weights: Any, token: int) -> str:
    return str(weights.token_get_text(token))


def adds_bos(weights: Any) -> bool:
    return bool(weights.add_bos_token())


def tokenize(weights: Any, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
    return list(weights.tokenize(text, add_bos=add_bos, special=special))


def close_weights(weights: Any) -> None:
    weights.close()


def ggml_function(name: str) -> Any:  # a ctypes function, or None
    """A function of ggml's C API (which llama-cpp-python does not bind), from the ggml libraries
    llama_cpp's libllama was loaded with, or None where the platform's symbol lookup through a
    library does not reach its dependencies. Opening ``libggml.so`` by its path instead loads a
    second copy of ggml beside the one libllama uses (the wheel's ``.so`` and ``.so.0`` are
    separate files), with its own backend registry."""
    from llama_cpp import llama_cpp as lib

    return getattr(lib._lib, name, None)


# Row views kept by BatchContext.logits: a step's rows sit at the same addresses step after step
# (llama.cpp reallocates its output buffer only when a batch wants more rows than ever before).
_ROW_VIEWS = 1024


def _logits_ith() -> Any:
    """``llama_get_logits_ith`` returning the row's address; on a CPU-only build called without
    releasing the GIL (with a GPU backend the call waits for the device to finish the step, and
    the event loop must run meanwhile)."""
    from llama_cpp import llama_cpp as lib

    factory = ctypes.CFUNCTYPE if lib.llama_supports_gpu_offload() else ctypes.PYFUNCTYPE
    proto = factory(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
    return proto(("llama_get_logits_ith", lib._lib))


class BatchContext:
    """A llama.cpp context that decodes many sequences in one batch (unified KV buffer)."""

    def __init__(
        self,
        weights: Any,
        *,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        threads: int,
        kv_type: int,
        flash_attn: bool,
    ):
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        # One more sequence than the slots: a scratch sequence where chunk reuse parks cells
        # while it evaluates the tokens before them (server.engine.chunk_reuse).
        params.n_seq_max = n_seq + 1
        self.scratch_seq = n_seq
        # One KV buffer for all sequences. Per-sequence streams would keep attention from scanning
        # the others' cells, but measured on SmolLM2 F16 (2 cores) their steps cost ~1.5x as much
        # once slots are reused and whenever fewer than all slots decode (bench/results/).
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = kv_type
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self._lib = llama_cpp
        self._ctx = _internals.LlamaContext(model=weights, params=params, verbose=False)
        self.ptr = self._ctx.ctx
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        # Whether cells may move to other positions (seq_add): RoPE models, not M-RoPE ones.
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.memory))
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # Read once per token between two decodes, where everything Python touches is cold (the
        # step streamed the weights through the caches): the public wrapper's extra call layer,
        # a GIL release and a new ndarray per row cost more than the call itself there.
        self._logits_ith = _logits_ith()
        self._rows: dict[int, np.ndarray] = {}  # views of logits rows by address
        self._n_batch = n_batch
        self.threads = (threads, threads)
        self._small_step = 1
        self._applied = self.threads

    def set_threads(self, threads: tuple[int, int], small_step: int = 1) -> None:
        """CPU threads for the next decodes: (steps of up to ``small_step`` tokens, larger
        batches). llama.cpp itself tells only one token from several."""
        self.threads = threads
        self._small_step = small_step

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants logits) entries."""
        small, large = self.threads
        threads = (small, small if len(entries) <= self._small_step else large)
        if threads != self._applied:
            self._lib.llama_set_n_threads(self.ptr, *threads)
            self._applied = threads
        b = self._batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        rc = self._lib.llama_decode(self.ptr, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, index: int, n_vocab: int) -> np.ndarray:
        """Row ``index`` of the last decode's logits, as a view the next decode overwrites."""
        addr = self._logits_ith(self.ptr, index)
        if not addr:
            raise RuntimeError(f"llama.cpp has no logits for batch entry {index}")
        row = self._rows.get(addr)
        if row is None or len(row) != n_vocab:
            if len(self._rows) >= _ROW_VIEWS:
                self._rows.clear()
            row = np.frombuffer(
                memoryview((ctypes.c_float * n_vocab).from_address(addr)), np.float32
            )
            self._rows[addr] = row
        return row

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        self._lib.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Move a sequence's cells in [p0, p1) by ``delta`` positions; llama.cpp re-rotates their
        keys at the next decode. A cell shared with other sequences moves for them too."""
        self._lib.llama_memory_seq_add(self.memory, seq, p0, p1, delta)

    def save_seq(self, seq: int) -> bytes:
        """One sequence's state (its KV cells), as llama.cpp serialises it."""
        size = self._lib.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ptr, buf, size, seq)
        return bytes(buf)[:written]

    def restore_seq(self, seq: int, state: bytes) -> bool:
        """Load a saved state into sequence ``seq`` (empty beforehand); False if it did not fit."""
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return bool(self._lib.llama_state_seq_set_data(self.ptr, buf, len(state), seq))

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self._ctx.close()  # type: ignore[no-untyped-call]


# -- a ``Llama``'s own context, for the simple engine and speculative decoding ------------------


def llama_logits_row(llm: Any, index: int, n_vocab: int) -> np.ndarray:
    """Row ``index`` (-1: the last) of the logits of the last decode of a ``Llama``."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(index), shape=(n_vocab,))


def llama_seq_rm(llm: Any, p0: int, p1: int = -1) -> bool:
    """Remove cells [p0, p1) of every sequence from a ``Llama``'s KV cache."""
    return bool(llm._ctx.kv_cache_seq_rm(-1, p0, p1))


def llama_decode(llm: Any, tokens: Sequence[int], base: int) -> None:
    """Evaluate tokens at positions base.. in a ``Llama``'s context, logits for every row."""
    llm._batch.set_batch(list(tokens), base, logits_all=True)
    llm._ctx.decode(llm._batch)
