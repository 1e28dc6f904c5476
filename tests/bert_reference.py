"""An independent sentence embedding for tests: BERT's forward pass in numpy, in float64.

It reads the checkpoint's safetensors and tokenizes with the ``tokenizers`` package, then does what
sentence-transformers does for all-MiniLM-L6-v2: the encoder (post-norm layers, exact erf GELU),
mean pooling over the tokens, L2 normalisation. Nothing here touches llama.cpp or GGUF, so
agreement with the server is evidence that conversion, tokenization and pooling are right.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


class BertReference:
    def __init__(self, checkpoint: Path):
        self.cfg = json.loads((checkpoint / "config.json").read_text())
        raw = load_file(str(checkpoint / "model.safetensors"))
        # Linear weights stored transposed once (x @ W.T), contiguous for the matmuls.
        self.w = {
            k.removeprefix("bert."): np.ascontiguousarray(
                v.T if v.ndim == 2 and ".encoder." in f".{k}" else v, dtype=np.float64
            )
            for k, v in raw.items()
        }
        self._cache: dict[str, np.ndarray] = {}
        self.tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def embed(self, text: str) -> np.ndarray:
        if text not in self._cache:
            self._cache[text] = self.embed_ids(self.tokenize(text))
        return self._cache[text]

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        w, eps = self.w, float(self.cfg["layer_norm_eps"])
        n_head = int(self.cfg["num_attention_heads"])
        n, d = len(ids), int(self.cfg["hidden_size"])
        dh = d // n_head
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        for layer in range(int(self.cfg["num_hidden_layers"])):
            p = f"encoder.layer.{layer}."

            def linear(y: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return y @ w[p + name + ".weight"] + w[p + name + ".bias"]

            def heads(y: np.ndarray) -> np.ndarray:
                return y.reshape(n, n_head, dh).transpose(1, 0, 2)

            q = heads(linear(x, "attention.self.query"))
            k = heads(linear(x, "attention.self.key"))
            v = heads(linear(x, "attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(1, 0, 2).reshape(n, d)
            x = _layer_norm(
                x + linear(context, "attention.output.dense"),
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                eps,
            )
            h = linear(x, "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = _layer_norm(
                x + linear(h, "output.dense"),
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
                eps,
            )
        pooled = x.mean(0)
        return pooled / np.linalg.norm(pooled)
