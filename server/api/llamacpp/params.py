"""llama-server request fields → the core's request types, or a 400 naming the field.

llama-server samples with the chain its ``samplers`` field lists, in that order. codeserve's
engines run penalties → top_k → top_p → min_p → temperature; a request may leave any of them out
(that sampler is then neutral) but not reorder them. Samplers codeserve does not have are
accepted only while their parameter leaves them inactive, except ``infill`` (see
``NOT_APPLIED``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from server.api.llamacpp.protocol import GenerationFields
from server.core.line_rules import IndentFloor, LineDeadline, LineRule
from server.engine.base import Engine, SamplingParams
from server.errors import InvalidRequest, Unsupported

# Our chain, in the order the engines apply it; llama-server's default order agrees.
ORDER = ("penalties", "top_k", "top_p", "min_p", "temperature")
DEFAULT_SAMPLERS = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typ_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
_BY_CHAR = {
    "e": "penalties",
    "d": "dry",
    "s": "top_n_sigma",
    "k": "top_k",
    "y": "typ_p",
    "p": "top_p",
    "m": "min_p",
    "x": "xtc",
    "t": "temperature",
    "i": "infill",
}
# Samplers codeserve lacks, and the field that must leave them inactive.
_INACTIVE_UNLESS: dict[str, tuple[str, Callable[[GenerationFields], bool]]] = {
    "dry": ("dry_multiplier", lambda b: b.dry_multiplier == 0),
    "top_n_sigma": ("top_n_sigma", lambda b: b.top_n_sigma <= 0),
    "typ_p": ("typical_p", lambda b: b.typical_p >= 1),
    "xtc": ("xtc_probability", lambda b: b.xtc_probability <= 0),
}
# Accepted but not applied: llama.cpp's infill sampler (merges tokens sharing a prefix, prefers
# ending the fill) is in every llama.vscode / llama.vim request; refusing it would refuse those
# editors. It shows as absent from the answer's generation_settings.samplers.
NOT_APPLIED = frozenset({"infill"})
_RANDOM_SEEDS = (-1, 0xFFFFFFFF)


def samplers(body: GenerationFields) -> list[str]:
    """The chain the request asks for, by llama.cpp's sampler names."""
    if body.samplers is None:
        return list(DEFAULT_SAMPLERS)
    if isinstance(body.samplers, str):
        unknown = sorted(set(body.samplers) - set(_BY_CHAR))
        if unknown:
            raise InvalidRequest(
                f"unknown sampler letter(s) {', '.join(unknown)}; known: "
                + ", ".join(f"{c}={n}" for c, n in _BY_CHAR.items()),
                param="samplers",
            )
        return [_BY_CHAR[c] for c in body.samplers]
    known = set(_BY_CHAR.values())
    unknown = [s for s in body.samplers if s not in known]
    if unknown:
        raise InvalidRequest(
            f"unknown sampler(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            param="samplers",
        )
    return list(body.samplers)


def sampling(body: GenerationFields) -> tuple[SamplingParams, list[str]]:
    """The engine's sampling parameters, and the samplers that will really run, in order."""
    chain = samplers(body)
    for name in chain:
        if name in _INACTIVE_UNLESS:
            field, inactive = _INACTIVE_UNLESS[name]
            if not inactive(body):
                raise Unsupported(
                    f"the {name} sampler is not supported; set {field} to leave it inactive or "
                    f"drop {name!r} from samplers",
                    param=field,
                )
    ours = [s for s in chain if s in ORDER]
    if len(set(ours)) != len(ours) or ours != sorted(ours, key=ORDER.index):
        raise Unsupported(
            f"samplers run in the order {' > '.join(ORDER)}; a request may leave some out but "
            f"not reorder or repeat them (got {' > '.join(ours)})",
            param="samplers",
        )
    if body.mirostat != 0:
        raise Unsupported("mirostat sampling is not supported; send mirostat 0", param="mirostat")
    if "temperature" in ours and body.dynatemp_range > 0:
        raise Unsupported(
            "dynamic temperature is not supported; send dynatemp_range 0", param="dynatemp_range"
        )
    if body.min_keep > 1:
        raise Unsupported("min_keep above 1 is not supported", param="min_keep")
    penalties = "penalties" in ours and body.repeat_last_n != 0
    if penalties and body.repeat_last_n != 64 and _penalising(body):
        raise Unsupported(
            "penalties look at the last 64 tokens; send repeat_last_n 64 (or 0 to disable them)",
            param="repeat_last_n",
        )
    temperature = max(body.temperature, 0.0) if "temperature" in ours else 1.0
    params = SamplingParams(
        temperature=temperature,
        top_k=max(body.top_k, 0) if "top_k" in ours else 0,
        top_p=body.top_p if "top_p" in ours else 1.0,
        min_p=body.min_p if "min_p" in ours else 0.0,
        repeat_penalty=body.repeat_penalty if penalties else 1.0,
        frequency_penalty=body.frequency_penalty if penalties else 0.0,
        presence_penalty=body.presence_penalty if penalties else 0.0,
        seed=None if body.seed in _RANDOM_SEEDS else body.seed & 0xFFFFFFFF,
    )
    applied = [s for s in chain if s not in NOT_APPLIED and s not in _INACTIVE_UNLESS]
    return params, applied


def _penalising(body: GenerationFields) -> bool:
    return body.repeat_penalty != 1.0 or body.frequency_penalty != 0 or body.presence_penalty != 0


def refuse_unsupported(body: GenerationFields) -> None:
    """Fields that change the answer in ways codeserve cannot honour yet."""
    constraint(body)
    if body.lora:
        raise Unsupported("LoRA adapters are not supported", param="lora")
    if body.post_sampling_probs and body.n_probs > 0:
        raise Unsupported(
            "post-sampling probabilities are not supported; codeserve reports n_probs from the "
            "model's raw distribution (post_sampling_probs false)",
            param="post_sampling_probs",
        )


def constraint(body: GenerationFields) -> str | None:
    """The GBNF grammar every choice must match, from ``grammar`` or ``json_schema``.

    The one place the shared grammar module plugs in. llama-server's ``grammar`` is GBNF with a
    root rule ``root``, which the engines take as it is (one that does not parse is their 400);
    ``json_schema`` needs the schema-to-grammar conversion and is refused until it exists.
    """
    if body.json_schema is not None:
        raise Unsupported(
            "json_schema is not supported yet; send a GBNF grammar", param="json_schema"
        )
    return body.grammar or None


def logit_bias(body: GenerationFields, engine: Engine) -> tuple[tuple[int, float], ...]:
    """llama-server's ``logit_bias``: [[token or text, bias], ...] or {"token or text": bias};
    a bias of ``false`` bans the token; text stands for each of its tokens."""
    if body.logit_bias is None:
        return ()
    pairs: list[tuple[Any, Any]]
    if isinstance(body.logit_bias, dict):
        pairs = list(body.logit_bias.items())
    else:
        if not all(isinstance(p, list) and len(p) == 2 for p in body.logit_bias):
            raise InvalidRequest(
                "logit_bias entries must be [token id or text, bias] pairs", param="logit_bias"
            )
        pairs = [(p[0], p[1]) for p in body.logit_bias]
    n_vocab = engine.info.n_vocab
    out: list[tuple[int, float]] = []
    for key, bias in pairs:
        if bias is False:
            value = -math.inf
        elif isinstance(bias, int | float) and not isinstance(bias, bool):
            value = float(bias)
        else:
            raise InvalidRequest(
                f"logit_bias for {key!r} must be a number or false", param="logit_bias"
            )
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < n_vocab:
                raise InvalidRequest(
                    f"logit_bias token {key} is outside the vocabulary [0, {n_vocab})",
                    param="logit_bias",
                )
            out.append((key, value))
        elif isinstance(key, str):
            out.extend((t, value) for t in engine.tokenize(key, add_bos=False, special=False))
        else:
            raise InvalidRequest("logit_bias keys must be token ids or text", param="logit_bias")
    return tuple(out)


def line_rules(body: GenerationFields) -> Callable[[], list[LineRule]] | None:
    """n_indent and t_max_predict_ms as the core's line rules; None when neither is set.

    llama-server ignores t_max_prompt_ms (its parsing is commented out, "TODO: implement"), and
    so does codeserve: prompts are evaluated whole.
    """
    if body.n_indent <= 0 and body.t_max_predict_ms <= 0:
        return None

    def make() -> list[LineRule]:
        rules: list[LineRule] = []
        if body.n_indent > 0:
            rules.append(IndentFloor(body.n_indent))
        if body.t_max_predict_ms > 0:
            rules.append(LineDeadline(body.t_max_predict_ms / 1e3))
        return rules

    return make
