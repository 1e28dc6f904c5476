"""A loaded model: weights, vocabulary, detokenizer and what the server needs to know of it.

One ``Model`` is shared by whatever runs it: the batched engine builds its context on it, the
simple engine wraps the weights its ``Llama`` loaded, the FIM detector reads its vocabulary, and
a draft model is checked against it.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from server.engine import binding
from server.engine.base import KV_BYTES_PER_ELEMENT, ModelInfo
from server.engine.fim import detect_fim
from server.errors import ModelUnavailable
from server.registry import ModelConfig

log = logging.getLogger(__name__)


class Vocabulary:
    """Tokenizer and detokenizer of loaded weights (also a vocab-only GGUF's)."""

    def __init__(self, weights: Any):
        import llama_cpp

        self._lib = llama_cpp
        self.weights = weights
        self.vocab = binding.vocab_ptr(weights)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.adds_bos = binding.adds_bos(weights)
        self.piece = lru_cache(maxsize=None)(self._piece)
        self.is_eog = lru_cache(maxsize=None)(self._is_eog)
        self._eog: tuple[int, ...] | None = None

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return binding.tokenize(
            self.weights, text.encode(), add_bos=add_bos and self.adds_bos, special=special
        )

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return bytes(buf.raw[:n])

    def token_text(self, token: int) -> str:
        return binding.token_text(self.weights, token)

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (what ``ignore_eos`` bans)."""
        if self._eog is None:
            self._eog = tuple(t for t in range(self.n_vocab) if self._is_eog(t))
        return self._eog

    # The FIM detector's view of the vocabulary (server.engine.fim.Vocab).
    def fim_ids(self) -> tuple[int, int, int]:
        lib, v = self._lib, self.vocab
        return lib.llama_vocab_fim_pre(v), lib.llama_vocab_fim_suf(v), lib.llama_vocab_fim_mid(v)

    def find(self, text: str) -> int | None:
        ids = binding.tokenize(self.weights, text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self.token_text(ids[0]) == text else None


class Model(Vocabulary):
    """Weights and vocabulary of one GGUF, with its ``ModelInfo`` and KV sizing."""

    def __init__(self, weights: Any, path: Path, cfg: ModelConfig, *, owned: bool):
        super().__init__(weights)
        self.path = path
        self.cfg = cfg
        self._owned = owned  # False: a Llama owns the weights and frees them
        self.ptr = binding.model_ptr(weights)
        self.metadata = binding.metadata(weights)
        bos = int(self._lib.llama_vocab_bos(self.vocab))
        eos = int(self._lib.llama_vocab_eos(self.vocab))
        self.kv_bytes_per_token = self._kv_bytes_per_token(cfg.kv_cache)
        self.info = ModelInfo(
            n_ctx=cfg.n_ctx,
            n_vocab=self.n_vocab,
            chat_template=cfg.chat_template or self.metadata.get("tokenizer.chat_template"),
            bos_token=self.token_text(bos) if bos != -1 else "",
            eos_token=self.token_text(eos) if eos != -1 else "",
            size_bytes=path.stat().st_size,
            kv_cache_bytes=int(self.kv_bytes_per_token * cfg.n_ctx),
            bos_id=bos if self.adds_bos and bos != -1 else None,
            fim=detect_fim(self, cfg.fim, cfg.name),
        )

    @classmethod
    def load(cls, path: Path, cfg: ModelConfig) -> Model:
        """Weights only; engines create the contexts they need on them."""
        try:
            weights = binding.load_weights(
                str(path), n_gpu_layers=cfg.n_gpu_layers, kv_overrides=cfg.kv_overrides or None
            )
        except (ValueError, RuntimeError) as e:
            raise ModelUnavailable(
                f"model {cfg.name!r}: llama.cpp could not load {path} "
                f"(n_gpu_layers={cfg.n_gpu_layers}): {e}"
            ) from e
        return cls(weights, path, cfg, owned=True)

    @classmethod
    def of_llama(cls, llm: Any, path: Path, cfg: ModelConfig) -> Model:
        """The model inside a ``llama_cpp.Llama`` (which keeps owning it)."""
        return cls(binding.weights_of(llm), path, cfg, owned=False)

    def close(self) -> None:
        if self._owned:
            binding.close_weights(self.weights)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return int(self._lib.llama_model_n_layer(self.ptr))

    def _kv_bytes_per_token(self, kv_cache: str) -> float:
        lib, meta = self._lib, self.metadata
        arch = meta.get("general.architecture", "")
        n_head = lib.llama_model_n_head(self.ptr)
        head_dim = lib.llama_model_n_embd(self.ptr) // max(n_head, 1)
        k_dim = int(meta.get(f"{arch}.attention.key_length", head_dim))
        v_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
        per_token = lib.llama_model_n_layer(self.ptr) * lib.llama_model_n_head_kv(self.ptr)
        return float(per_token * (k_dim + v_dim) * KV_BYTES_PER_ELEMENT[kv_cache])
