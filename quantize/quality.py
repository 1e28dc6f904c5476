"""What a rung costs: perplexity, KL divergence and top-1 agreement against F16, and speed.

Every rung evaluates the same token windows with logits for every position. The F16 rung goes
first; its log-probabilities are kept in a temporary ``.npy`` memory map (windows x ctx x vocab
float32) so each other rung is compared position by position without re-running F16 and
without holding it all in memory. KLD is KL(F16 || rung) in nats, averaged over positions.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantize.corpus import Corpus, make_windows
from quantize.errors import QuantizeError
from quantize.ladder import REFERENCE, Rung, available_cores

SPEED_PROMPT = 'def quicksort(items: list[int]) -> list[int]:\n    """Sort with quicksort."""\n'
_ROWS = 64  # rows of (position x vocab) handled at once in float64


@dataclass
class Quality:
    type: str
    n_params: int
    bpw: float
    load_s: float
    decode_tps: float
    ppl: float
    kld_mean: float
    kld_p99: float
    top1: float
    decode_runs: list[float] = field(default_factory=list)
    sample: str = ""


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = 512
    corpus_tokens: int = 2048
    threads: int = field(default_factory=available_cores)
    speed_tokens: int = 64
    speed_runs: int = 3


def _load(path: Path, cfg: EvalSettings):
    import llama_cpp

    start = time.perf_counter()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=max(cfg.ctx, 128 + cfg.speed_tokens),
            n_batch=cfg.ctx,
            n_ubatch=cfg.ctx,
            n_threads=cfg.threads,
            n_threads_batch=cfg.threads,
            n_gpu_layers=-1,  # as `codeserve serve` loads models; CPU builds ignore it
            logits_all=True,
            verbose=False,
        )
    except (ValueError, RuntimeError) as e:
        raise QuantizeError(f"{path}: llama.cpp could not load this rung: {e}") from None
    return llm, time.perf_counter() - start


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def _window_logits(llm, window: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(window)
    return llm.scores[: len(window)]


def _greedy(llm, prompt: list[int], n: int) -> tuple[list[int], float]:
    llm.reset()
    llm.eval(prompt)
    out = []
    start = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out, time.perf_counter() - start


def _decode_speed(llm, cfg: EvalSettings) -> tuple[list[float], str]:
    """Greedy decode of ``speed_tokens`` after a short code prompt; tokens/s per run."""
    prompt = llm.tokenize(SPEED_PROMPT.encode(), add_bos=True)
    _greedy(llm, prompt, 4)  # warm-up: the first decodes allocate buffers and fault pages in
    runs, generated = [], []
    for _ in range(cfg.speed_runs):
        generated, seconds = _greedy(llm, prompt, cfg.speed_tokens)
        runs.append(cfg.speed_tokens / seconds)
    eos = llm.token_eos()
    text_tokens = generated[: generated.index(eos)] if eos in generated else generated
    sample = llm.detokenize(text_tokens).decode("utf-8", errors="replace")
    return runs, SPEED_PROMPT + sample


def evaluate(
    rungs: list[Rung],
    corpus: Corpus,
    cfg: EvalSettings,
    progress: Callable[[str], None] = print,
) -> tuple[list[Quality], dict]:
    """Score every rung; returns results in ``rungs`` order and what was evaluated."""
    import llama_cpp

    ref_rung = next((r for r in rungs if r.type == REFERENCE), None)
    if ref_rung is None:
        raise QuantizeError(f"quality needs the {REFERENCE} rung as its reference")
    order = [ref_rung] + [r for r in rungs if r is not ref_rung]
    results: dict[str, Quality] = {}
    with tempfile.TemporaryDirectory(prefix="codeserve-quantize-") as tmp:
        ref = None
        windows: list[list[int]] = []
        for i, rung in enumerate(order, 1):
            llm, load_s = _load(rung.path, cfg)
            try:
                if ref is None:
                    bos = llm.token_bos() if llm._model.add_bos_token() else None
                    windows = make_windows(
                        corpus,
                        lambda s, llm=llm: llm.tokenize(s.encode(), add_bos=False),
                        cfg.ctx,
                        max(1, cfg.corpus_tokens // cfg.ctx),
                        bos if bos is not None and bos >= 0 else None,
                    )
                    ref = np.lib.format.open_memmap(
                        Path(tmp) / "reference-logprobs.npy",
                        mode="w+",
                        dtype=np.float32,
                        shape=(len(windows), cfg.ctx, llm.n_vocab()),
                    )
                elif llm.n_vocab() != ref.shape[2]:
                    raise QuantizeError(
                        f"{rung.path}: vocabulary of {llm.n_vocab()} tokens, "
                        f"the {REFERENCE} rung has {ref.shape[2]}"
                    )
                runs, sample = _decode_speed(llm, cfg)
                nll, kld, top1 = [], [], []
                for w, window in enumerate(windows):
                    logits = _window_logits(llm, window)
                    for lo in range(0, cfg.ctx, _ROWS):
                        logq = _log_softmax(logits[lo : lo + _ROWS])
                        targets = window[lo + 1 : lo + _ROWS + 1]
                        nll.append(-logq[np.arange(len(targets)), targets])
                        if rung is ref_rung:
                            ref[w, lo : lo + _ROWS] = logq
                            continue
                        logp = ref[w, lo : lo + _ROWS].astype(np.float64)
                        kld.append((np.exp(logp) * (logp - logq)).sum(axis=1))
                        top1.append(logp.argmax(axis=1) == logq.argmax(axis=1))
                all_kld = np.concatenate(kld) if kld else np.zeros(1)
                q = Quality(
                    type=rung.type,
                    n_params=int(llama_cpp.llama_model_n_params(llm.model)),
                    bpw=llama_cpp.llama_model_size(llm.model)
                    * 8
                    / llama_cpp.llama_model_n_params(llm.model),
                    load_s=load_s,
                    decode_tps=statistics.median(runs),
                    ppl=float(np.exp(np.concatenate(nll).mean())),
                    kld_mean=float(all_kld.mean()),
                    kld_p99=float(np.percentile(all_kld, 99)),
                    top1=float(np.concatenate(top1).mean()) if top1 else 1.0,
                    decode_runs=runs,
                    sample=sample,
                )
            finally:
                llm.close()
            results[rung.type] = q
            progress(
                f"quality: [{i}/{len(order)}] {q.type:<7} ppl {q.ppl:8.3f}  "
                f"kld {q.kld_mean:.5f}  top-1 {q.top1:7.2%}  {q.decode_tps:6.1f} tok/s"
            )
        del ref
    meta = {
        "corpus": corpus.name,
        "corpus_description": corpus.description,
        "ctx": cfg.ctx,
        "windows": len(windows),
        "tokens": len(windows) * cfg.ctx,
        "threads": cfg.threads,
        "speed_tokens": cfg.speed_tokens,
        "speed_runs": cfg.speed_runs,
    }
    return [results[r.type] for r in rungs], meta
