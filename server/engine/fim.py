"""Fill-in-the-middle: find a model's FIM tokens and build infill prompts from token ids.

Markers are inserted as token ids, and the user's prefix/suffix are tokenized with special-token
parsing off, so code that merely contains ``<|fim_prefix|>`` stays text. llama.cpp already resolves
the FIM ids of known vocabularies; the family only names the layout and the repository-level
tokens, and ``fim = "..."`` in models.toml can force a family whose tokens llama.cpp missed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.errors import ModelUnavailable


@dataclass(frozen=True)
class FimFamily:
    prefix: str
    suffix: str
    middle: str
    repo: tuple[str, ...] = ()  # spellings of the token that opens repo context: <repo>name\n
    file_sep: tuple[str, ...] = ()  # spellings of the token before each file: <sep>path\ncontent


FAMILIES: dict[str, FimFamily] = {
    "qwen": FimFamily(
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        repo=("<|repo_name|>",),
        file_sep=("<|file_sep|>",),
    ),
    # StarCoder2 spells them <repo_name>/<file_sep>; StarCoder 1 has <reponame> and no separator.
    "starcoder": FimFamily(
        "<fim_prefix>",
        "<fim_suffix>",
        "<fim_middle>",
        repo=("<repo_name>", "<reponame>"),
        file_sep=("<file_sep>",),
    ),
    "deepseek": FimFamily("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    "codellama": FimFamily("▁<PRE>", "▁<SUF>", "▁<MID>"),
    "codegemma": FimFamily(
        "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", file_sep=("<|file_separator|>",)
    ),
}


class Vocab(Protocol):
    def fim_ids(self) -> tuple[int, int, int]:
        """llama.cpp's (prefix, suffix, middle) ids; -1 where it found none."""
        ...

    def token_text(self, token: int) -> str: ...

    def find(self, text: str) -> int | None:
        """The id of the single special token spelled `text`, if the vocabulary has one."""
        ...


@dataclass(frozen=True)
class FimTokens:
    family: str
    prefix: int
    suffix: int
    middle: int
    repo: int | None = None
    file_sep: int | None = None


def _family_of(vocab: Vocab, prefix_id: int) -> str:
    text = vocab.token_text(prefix_id)
    if text == "<|fim_prefix|>":
        return "codegemma" if vocab.find("<|file_separator|>") is not None else "qwen"
    for name, fam in FAMILIES.items():
        if fam.prefix == text or fam.prefix.removeprefix("▁") == text:
            return name
    return "generic"


def detect_fim(vocab: Vocab, override: str | None, model: str) -> FimTokens | None:
    fam: FimFamily | None
    if override is not None:
        fam = FAMILIES[override]
        found = [vocab.find(t) for t in (fam.prefix, fam.suffix, fam.middle)]
        ids = [i for i in found if i is not None]
        if len(ids) < 3:
            raise ModelUnavailable(
                f'model {model!r}: fim = "{override}" in models.toml, but its vocabulary has no '
                f"{fam.prefix} / {fam.suffix} / {fam.middle} tokens"
            )
        family = override
        pre, suf, mid = ids
    else:
        pre, suf, mid = vocab.fim_ids()
        if min(pre, suf, mid) < 0:
            return None
        family = _family_of(vocab, pre)
        fam = FAMILIES.get(family)
    return FimTokens(
        family=family,
        prefix=pre,
        suffix=suf,
        middle=mid,
        repo=_first_found(vocab, fam.repo if fam else ()),
        file_sep=_first_found(vocab, fam.file_sep if fam else ()),
    )


def _first_found(vocab: Vocab, spellings: tuple[str, ...]) -> int | None:
    return next((i for i in map(vocab.find, spellings) if i is not None), None)


@dataclass(frozen=True)
class ExtraFile:
    filename: str
    text: str


Tokenize = Callable[[str], list[int]]


def build_fim_prompt(
    fim: FimTokens,
    tokenize: Tokenize,
    prefix: str,
    suffix: str,
    *,
    budget: int,
    bos: int | None = None,
    extra: Sequence[ExtraFile] = (),
    filename: str | None = None,
    repo: str = "project",
) -> list[int]:
    """[BOS] [repo-level context] PRE prefix SUF suffix MID, fitted into `budget` tokens.

    Repository context (other files, when the model has a file separator) goes first and is the
    first thing dropped when the prompt is too long; then the prefix loses its oldest tokens and
    the suffix its farthest, keeping them about 3:1, as llama.cpp's server does.
    """
    pre, suf = tokenize(prefix), tokenize(suffix)
    head = [bos] if bos is not None else []
    fixed = len(head) + 3
    context: list[int] = []
    if fim.file_sep is not None and (extra or filename):
        if fim.repo is not None:
            context += [fim.repo, *tokenize(repo + "\n")]
        for f in extra:
            context += [fim.file_sep, *tokenize(f.filename + "\n"), *tokenize(f.text)]
        context += [fim.file_sep, *tokenize((filename or "untitled") + "\n")]
    if fixed + len(context) + len(pre) + len(suf) > budget:
        context = []  # partial files would mislead more than they help
    space = max(budget - fixed, 0)
    if len(pre) + len(suf) > space:
        keep_suf = min(len(suf), space // 4)
        keep_pre = min(len(pre), space - keep_suf)
        keep_suf = min(len(suf), space - keep_pre)
        pre, suf = pre[len(pre) - keep_pre :], suf[:keep_suf]
    return [*head, *context, fim.prefix, *pre, fim.suffix, *suf, fim.middle]
