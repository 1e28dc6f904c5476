"""A BERT checkpoint (safetensors + tokenizer.json) → GGUF, without torch.

llama.cpp's ``convert_hf_to_gguf.py`` (class ``BertModel``) imports torch and transformers, which
codeserve does not install. This module writes the same file with the libraries it is built on:
``gguf`` (llama.cpp's own writer, metadata and special-token logic), ``safetensors``' numpy API
for the weights and ``tokenizers`` (the engine behind transformers' fast tokenizers) for the
vocabulary. What it writes, and in which order, follows that converter: architecture ``bert``, the
hyper-parameters, non-causal attention, the sentence-transformers pooling type, a WordPiece
vocabulary in llama.cpp's "phantom space" form with token types, and the special token ids.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np

OutType = Literal["f16", "f32"]

# Bumped when the written file changes, so caches of older conversions are not reused.
FORMAT_VERSION = 1
# What the model store writes. F16 halves the file and the weights' memory traffic against F32,
# for no difference in the embeddings that matters (tests/test_embeddings.py holds the F16 file
# to an F64 numpy reference); it is also llama.cpp's converter default.
OUTTYPE: OutType = "f16"

ARCHITECTURES = ("BertModel", "BertForMaskedLM")

# llama.cpp names pre-tokenizers by hashing the token ids of this text (get_vocab_base_pre).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The WordPiece entries of llama.cpp's table. bert-base-uncased's vocabulary (bge-small,
# all-MiniLM) hashes like jina-v2-en; the table lists that hash for "bert-bge" first and
# "jina-v2-en" later, and the later match is what the converter writes. llama.cpp ignores the
# name for WordPiece vocabularies, but a file that reads like the converter's is easier to trust.
_PRE_TOKENIZERS = {
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
}

_SKIPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_ALWAYS_F32 = (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)


class ConversionError(ValueError):
    """The checkpoint is not one this converter can write faithfully."""


def convert_bert(checkpoint: Path, out: Path, *, outtype: OutType = OUTTYPE) -> None:
    """Write ``checkpoint`` (a sentence-transformers/Hugging Face BERT directory) to ``out``."""
    hparams = json.loads((checkpoint / "config.json").read_text())
    arch = (hparams.get("architectures") or [""])[0]
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{checkpoint}: architecture {arch!r} is not one of {ARCHITECTURES}")
    if hparams.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{checkpoint}: only absolute position embeddings are supported")
    ftype = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32
    block_count = int(hparams["num_hidden_layers"])
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    _add_tensors(writer, checkpoint, block_count, ftype)
    _add_metadata(writer, checkpoint)
    _add_parameters(writer, checkpoint, hparams, block_count, ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, checkpoint, hparams)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def checkpoint_tensor_name(name: str) -> str | None:
    """The converter's name for a checkpoint tensor before mapping; None: left out of the GGUF."""
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    # Only the encoder is needed for embeddings: no pooler, no masked-LM or NSP heads.
    if name in _SKIPPED or name.startswith(("cls.predictions", "cls.seq_relationship")):
        return None
    return name


def gguf_tensor_name(name: str, block_count: int) -> str:
    """llama.cpp's name for a (filtered) checkpoint tensor, e.g. blk.0.attn_q.weight."""
    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, block_count).get_name(
        name, try_suffixes=(".weight", ".bias")
    )
    if mapped is None:
        raise ConversionError(f"cannot map tensor {name!r}")
    return mapped


def _tensor_type(
    new_name: str, n_dims: int, ftype: gguf.LlamaFileType
) -> gguf.GGMLQuantizationType:
    # llama.cpp keeps norms, 1-D tensors, biases and the position/token-type tables in F32.
    if n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if any(new_name == gguf.TENSOR_NAMES[key] + ".weight" for key in _ALWAYS_F32):
        return gguf.GGMLQuantizationType.F32
    if ftype == gguf.LlamaFileType.ALL_F32:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16


def _add_tensors(
    writer: gguf.GGUFWriter, checkpoint: Path, block_count: int, ftype: gguf.LlamaFileType
) -> None:
    from safetensors import safe_open  # numpy framework: no torch

    parts = sorted(checkpoint.glob("model*.safetensors"))
    if not parts:
        raise ConversionError(f"{checkpoint}: no model*.safetensors")
    for part in parts:
        with safe_open(str(part), framework="np") as f:
            for raw_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = checkpoint_tensor_name(raw_name)
                if name is None:
                    continue
                data = f.get_tensor(raw_name)
                if data.dtype not in (np.float16, np.float32):
                    data = data.astype(np.float32)
                new_name = gguf_tensor_name(name, block_count)
                qtype = _tensor_type(new_name, data.ndim, ftype)
                writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _add_metadata(writer: gguf.GGUFWriter, checkpoint: Path) -> None:
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, checkpoint, None, total)
    if meta.name is None:
        meta.name = checkpoint.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)


def _add_parameters(
    writer: gguf.GGUFWriter,
    checkpoint: Path,
    hparams: dict[str, Any],
    block_count: int,
    ftype: gguf.LlamaFileType,
) -> None:
    writer.add_block_count(block_count)
    writer.add_context_length(int(hparams["max_position_embeddings"]))
    writer.add_embedding_length(int(hparams["hidden_size"]))
    writer.add_feed_forward_length(int(hparams["intermediate_size"]))
    writer.add_head_count(int(hparams["num_attention_heads"]))
    if "num_key_value_heads" in hparams:
        writer.add_head_count_kv(int(hparams["num_key_value_heads"]))
    writer.add_layer_norm_eps(float(hparams["layer_norm_eps"]))
    writer.add_file_type(ftype)
    writer.add_causal_attention(False)
    if (pooling := pooling_type(checkpoint)) is not None:
        writer.add_pooling_type(pooling)


def pooling_type(checkpoint: Path) -> gguf.PoolingType | None:
    """The sentence-transformers Pooling module's mode (modules.json), as llama.cpp reads it."""
    modules_file = checkpoint / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    path = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    if path is None:
        return None
    cfg = json.loads((checkpoint / path / "config.json").read_text())
    if cfg.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if cfg.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if cfg.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    modes = {
        "mean": gguf.PoolingType.MEAN,
        "cls": gguf.PoolingType.CLS,
        "lasttoken": gguf.PoolingType.LAST,
    }
    if (mode := cfg.get("pooling_mode")) in modes:
        return modes[mode]
    raise ConversionError(f"{checkpoint}: only MEAN, CLS and LAST pooling are supported")


def _looks_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def vocab_base(checkpoint: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name, as the converter's get_vocab_base gives them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    # transformers encodes without the file's truncation/padding unless asked; so must the hash.
    tok.no_truncation()
    tok.no_padding()
    chkhsh = sha256(str(tok.encode(_CHKTXT).ids).encode()).hexdigest()
    if (tokpre := _PRE_TOKENIZERS.get(chkhsh)) is None:
        raise ConversionError(
            f"{checkpoint}: tokenizer not recognised (pre-tokenizer hash {chkhsh}); llama.cpp's "
            "converter would refuse it too"
        )
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ConversionError(f"{checkpoint}: token ids exceed vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                ids = tok.encode(token, add_special_tokens=False).ids
                token = tok.decode(ids, skip_special_tokens=False)
            if added[i].special or _looks_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, toktypes, tokpre


def _phantom(token: str, toktype: int) -> str:
    # llama.cpp's WordPiece marks word starts with U+2581 instead of continuations with "##".
    if toktype == gguf.TokenType.CONTROL:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def _add_vocab(writer: gguf.GGUFWriter, checkpoint: Path, hparams: dict[str, Any]) -> None:
    tokens, toktypes, tokpre = vocab_base(checkpoint, int(hparams["vocab_size"]))
    writer.add_token_type_count(int(hparams.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(tokpre)
    writer.add_token_list([_phantom(t, k) for t, k in zip(tokens, toktypes, strict=True)])
    writer.add_token_types(toktypes)
    gguf.SpecialVocab(checkpoint, n_vocab=len(tokens)).add_to_gguf(writer)
