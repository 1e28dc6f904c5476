"""Fill-in-the-middle prompts for any dialect: text before and after the cursor → token ids."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.base import Engine
from server.engine.fim import ExtraFile, build_fim_prompt
from server.errors import Unsupported


def fim_prompt(
    engine: Engine,
    prefix: str,
    suffix: str,
    *,
    max_tokens: int | None,
    extra: Sequence[ExtraFile] = (),
    filename: str | None = None,
    suffix_param: str = "suffix",
    n_ctx: int | None = None,
) -> list[int]:
    """Token ids for a fill-in-the-middle request (``prefix`` before the cursor, ``suffix`` after).

    ``suffix_param`` names the request field in the 400 a model without FIM tokens answers;
    ``n_ctx`` narrows the context the prompt must fit (a client's smaller window).
    """
    fim = engine.info.fim
    if fim is None:
        raise Unsupported(
            "this model has no fill-in-the-middle tokens, so it cannot complete with a suffix; "
            "use a code model (e.g. qwen2.5-coder-1.5b) or send a prompt without suffix",
            param=suffix_param,
        )
    n_ctx = min(n_ctx or engine.info.n_ctx, engine.info.n_ctx)
    reserve = min(max_tokens if max_tokens is not None else n_ctx // 4, n_ctx // 2)
    return build_fim_prompt(
        fim,
        lambda text: engine.tokenize(text, add_bos=False, special=False),
        prefix,
        suffix,
        budget=n_ctx - max(reserve, 1),
        bos=engine.info.bos_id,
        extra=list(extra),
        filename=filename,
    )
