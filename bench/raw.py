"""The in-process baseline: llama-cpp-python's `Llama` with codeserve's settings, no server."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.client import Sample
from bench.harness import Target
from server.engine.base import ggml_kv_type


class RawLlama:
    def __init__(self, t: Target):
        import llama_cpp

        type_ = ggml_kv_type(t.kv_cache)
        self.llm = llama_cpp.Llama(
            str(t.path),
            n_ctx=t.n_ctx,
            n_batch=t.n_batch,
            n_ubatch=t.n_batch,
            n_threads=t.threads,
            n_threads_batch=t.threads,
            type_k=type_,
            type_v=type_,
            flash_attn=t.flash_attn,
            verbose=False,
        )

    def stream(self, body: dict, count: Callable[[str], int] | None = None) -> Sample:
        """Timed as bench.client.stream times a server, tokens counted the same way."""
        t0 = time.perf_counter()
        first = None
        texts: list[str] = []
        for chunk in self.llm.create_completion(
            body["prompt"],
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            stop=body.get("stop"),
            stream=True,
        ):
            if text := chunk["choices"][0]["text"]:
                texts.append(text)
                if first is None:
                    first = time.perf_counter() - t0
        end = time.perf_counter() - t0
        return Sample.of(first if first is not None else end, end, texts, None, count)
