"""FIM token detection and prompt construction, on llama.cpp's real vocab-only GGUFs.

Families whose vocabularies do not ship with llama.cpp (Qwen2.5-Coder, CodeLlama, CodeGemma) are
checked against a small fake vocabulary: that part is pure logic.
"""

from __future__ import annotations

import llama_cpp
import pytest

from server.engine.binding import weights_of
from server.engine.fim import ExtraFile, FimTokens, build_fim_prompt, detect_fim
from server.engine.model import Vocabulary
from server.errors import ModelUnavailable


@pytest.fixture(scope="module")
def vocabs(vocab_dir):
    cache = {}

    def load(name: str):
        if name not in cache:
            llm = llama_cpp.Llama(
                str(vocab_dir / f"ggml-vocab-{name}.gguf"), vocab_only=True, verbose=False
            )
            cache[name] = (llm, Vocabulary(weights_of(llm)))
        return cache[name]

    return load


def text_tokenizer(llm):
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)


@pytest.mark.parametrize(
    "name, family, markers",
    [
        ("starcoder", "starcoder", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")),
        ("refact", "starcoder", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")),
        ("deepseek-coder", "deepseek", ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")),
    ],
)
def test_built_prompt_equals_the_pretemplated_text(vocabs, name, family, markers):
    llm, vocab = vocabs(name)
    fim = detect_fim(vocab, None, name)
    assert fim is not None and fim.family == family
    assert [vocab.token_text(i) for i in (fim.prefix, fim.suffix, fim.middle)] == list(markers)
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    ids = build_fim_prompt(fim, text_tokenizer(llm), prefix, suffix, budget=4096, bos=bos)
    pre, suf, mid = markers
    # What Continue sends: the template as text, tokenized with special tokens parsed.
    templated = llm.tokenize(
        f"{pre}{prefix}{suf}{suffix}{mid}".encode(), add_bos=bos is not None, special=True
    )
    assert ids == templated
    assert ids.count(fim.prefix) == ids.count(fim.suffix) == ids.count(fim.middle) == 1
    if bos is not None:
        assert ids[0] == bos


@pytest.mark.parametrize("name", ["starcoder", "deepseek-coder"])
def test_marker_lookalikes_in_user_text_stay_text(vocabs, name):
    llm, vocab = vocabs(name)
    fim = detect_fim(vocab, None, name)
    sneaky = "x = '" + vocab.token_text(fim.middle) + vocab.token_text(fim.suffix) + "'\n"
    ids = build_fim_prompt(fim, text_tokenizer(llm), sneaky, sneaky, budget=4096)
    assert ids.count(fim.middle) == 1 and ids.count(fim.suffix) == 1
    assert ids[-1] == fim.middle


def test_repository_context_with_file_separators(vocabs):
    llm, vocab = vocabs("starcoder")  # StarCoder2's vocabulary: <repo_name>, <file_sep>
    fim = detect_fim(vocab, None, "starcoder")
    assert fim.repo is not None and fim.file_sep is not None
    extra = [ExtraFile("util.py", "def helper():\n    return 1\n")]
    ids = build_fim_prompt(
        fim,
        text_tokenizer(llm),
        "x = ",
        "\n",
        budget=4096,
        extra=extra,
        filename="main.py",
        repo="demo",
    )
    assert ids[0] == fim.repo
    assert ids.count(fim.file_sep) == 2
    text = llm.detokenize(ids[: ids.index(fim.prefix)], special=True).decode()
    assert (
        text == "<repo_name>demo\n<file_sep>util.py\ndef helper():\n    return 1\n"
        "<file_sep>main.py\n"
    )
    # Too long for the budget: the other files go first, prefix and suffix stay whole.
    short = build_fim_prompt(
        fim, text_tokenizer(llm), "x = ", "\n", budget=12, extra=extra, filename="main.py"
    )
    assert fim.file_sep not in short and short[0] == fim.prefix


def test_vocabularies_without_fim_tokens(vocabs):
    for name in ("gpt-2", "llama-spm"):
        assert detect_fim(vocabs(name)[1], None, name) is None


def test_forced_family_must_exist_in_the_vocabulary(vocabs):
    with pytest.raises(ModelUnavailable, match='fim = "deepseek"'):
        detect_fim(vocabs("starcoder")[1], "deepseek", "m")
    forced = detect_fim(vocabs("starcoder")[1], "starcoder", "m")
    assert forced.family == "starcoder"


class FakeVocab:
    def __init__(self, tokens: list[str], fim_ids=(-1, -1, -1)):
        self.tokens = tokens
        self._fim = fim_ids

    def fim_ids(self):
        return self._fim

    def token_text(self, token: int) -> str:
        return self.tokens[token]

    def find(self, text: str):
        return self.tokens.index(text) if text in self.tokens else None


QWEN = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>"]


def test_qwen_codegemma_codellama_detection():
    assert detect_fim(FakeVocab(QWEN, (0, 1, 2)), None, "q") == FimTokens("qwen", 0, 1, 2, 3, 4)
    gemma = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"]
    assert detect_fim(FakeVocab(gemma, (0, 1, 2)), None, "g") == FimTokens(
        "codegemma", 0, 1, 2, None, 3
    )
    llama = ["▁<PRE>", "▁<SUF>", "▁<MID>"]
    assert detect_fim(FakeVocab(llama, (0, 1, 2)), None, "c").family == "codellama"
    # an old conversion without FIM metadata, fixed by naming the family in models.toml
    assert detect_fim(FakeVocab(QWEN), None, "q") is None
    assert detect_fim(FakeVocab(QWEN), "qwen", "q") == FimTokens("qwen", 0, 1, 2, 3, 4)


def test_truncation_keeps_the_cursor_neighbourhood():
    fim = FimTokens("qwen", 0, 1, 2, 3, 4)

    def tokenize(text):
        return [ord(c) for c in text]

    ids = build_fim_prompt(fim, tokenize, "a" * 100 + "NEAR", "near" + "z" * 100, budget=43)
    assert len(ids) == 43
    pre = ids[1 : ids.index(1)]
    suf = ids[ids.index(1) + 1 : -1]
    assert "".join(map(chr, pre)).endswith("NEAR") and "".join(map(chr, suf)).startswith("near")
    assert len(pre) == 30 and len(suf) == 10  # about 3:1
