"""``codeserve quantize`` on the real SmolLM2-135M (Q4_1, rebuilt to F16 first).

The ladder is built once per module with a tiny corpus (one 128-token window) and short speed
runs, which is enough to separate Q8_0 from Q2_K by an order of magnitude in KLD.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from quantize import convert
from quantize.cli import add_parser, main
from quantize.errors import QuantizeError
from quantize.ladder import LADDER, available_cores, build_ladder, parse_types
from quantize.pipeline import Options, run_ladder
from quantize.quality import EvalSettings
from quantize.registry import register
from quantize.source import inspect_gguf, model_stem
from server.registry import load_registry
from server.settings import ServerSettings
from server.store import ModelStore

TINY = EvalSettings(
    ctx=128, corpus_tokens=128, threads=available_cores(), speed_tokens=8, speed_runs=1
)
SIZE_ORDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def _models_toml(path: Path, model: Path) -> Path:
    path.write_text(
        f'# a comment that must survive\ndefault_model = "base"\n\n'
        f'[models."base"]\nsource = {{ path = "{model}" }}\n'
    )
    return path


@pytest.fixture(scope="module")
def ladder(model_path: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    models = _models_toml(root / "models.toml", model_path)
    lines: list[str] = []
    report = run_ladder(
        model_path,
        root / "out",
        Options(rebuild_f16=True, eval=TINY, register=models),
        progress=lines.append,
    )
    rows = {r["type"]: r for r in report["rungs"]}
    return root / "out", report, rows, models, lines


def test_every_rung_loads_and_generates(ladder):
    import llama_cpp

    out, _, rows, _, _ = ladder
    assert list(rows) == list(LADDER)
    for qtype, row in rows.items():
        llm = llama_cpp.Llama(str(out / row["file"]), n_ctx=128, n_threads=1, verbose=False)
        try:
            done = llm("def add(a, b):\n", max_tokens=4, temperature=0.0)
        finally:
            llm.close()
        assert done["usage"]["completion_tokens"] >= 1, qtype
        assert row["sample"].startswith("def quicksort"), qtype


def test_sizes_fall_down_the_ladder(ladder):
    out, _, rows, _, _ = ladder
    sizes = [rows[t]["size_bytes"] for t in SIZE_ORDER]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes
    assert max(r["size_bytes"] for r in rows.values()) == rows["F16"]["size_bytes"]
    for r in rows.values():
        assert (out / r["file"]).stat().st_size == r["size_bytes"]
    assert rows["F16"]["bpw"] == pytest.approx(16, abs=0.1)
    assert rows["Q8_0"]["bpw"] == pytest.approx(8.5, abs=0.1)


def test_q8_kld_is_far_below_q2(ladder):
    _, _, rows, _, _ = ladder
    assert rows["F16"]["kld_mean"] == 0 and rows["F16"]["top1"] == 1
    assert 0 < rows["Q8_0"]["kld_mean"] < rows["Q2_K"]["kld_mean"] / 5
    assert rows["Q8_0"]["top1"] > rows["Q2_K"]["top1"]
    for r in rows.values():
        assert r["ppl"] > 1 and r["decode_tps"] > 0 and r["load_s"] > 0


def test_report_files(ladder):
    out, report, _, _, _ = ladder
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rungs"] == report["rungs"]
    fields = {"type", "file", "size_bytes", "bpw", "ppl", "kld_mean", "kld_p99", "top1"}
    fields |= {"load_s", "decode_tps", "fallback_tensors"}
    assert all(fields <= set(r) for r in on_disk["rungs"])
    assert on_disk["source"]["rebuilt_from"] == "Q4_1"
    assert on_disk["evaluation"]["tokens"] == 128
    md = (out / "report.md").read_text()
    assert "| Type | Size (MiB) | BPW | PPL |" in md
    assert "rebuilt from Q4_1" in md
    assert sum(line.startswith("| Q") for line in md.splitlines()) == len(LADDER) - 1
    assert not list(out.glob("*.tmp"))


def test_rebuilt_f16_is_labelled_and_the_label_carries_into_rungs(ladder):
    out, _, rows, _, _ = ladder
    f16 = inspect_gguf(out / rows["F16"]["file"])
    assert (f16.file_type, f16.quantized, f16.rebuilt_from) == ("F16", False, "Q4_1")
    q8 = inspect_gguf(out / rows["Q8_0"]["file"])
    assert (q8.file_type, q8.rebuilt_from) == ("Q8_0", "Q4_1")


def test_progress_names_every_rung(ladder):
    _, _, _, _, lines = ladder
    assert any(line.startswith("rebuild:") for line in lines)
    for qtype in LADDER:
        assert any(line.startswith("quality:") and f" {qtype} " in line for line in lines)
        if qtype != "F16":
            assert any(line.startswith("quantize:") and f" {qtype} " in line for line in lines)


def test_registered_rungs_are_servable_by_name(ladder):
    out, _, rows, models, _ = ladder
    text = models.read_text()
    assert text.startswith("# a comment that must survive")
    registry = load_registry(models)
    store = ModelStore(registry, ServerSettings().cache_dir)
    for qtype, row in rows.items():
        cfg = registry.get(f"smollm2-135m-instruct-{qtype.lower()}")
        assert cfg is not None, qtype
        assert store.pull(cfg) == (out / row["file"]).resolve()
    # Registering again replaces the tool's block instead of duplicating its tables.
    register(models, "SmolLM2-135M-Instruct", [("smollm2-135m-instruct-f16", out / "x", "d")])
    again = models.read_text()
    assert again.count("# >>> codeserve quantize: SmolLM2-135M-Instruct") == 1
    assert set(tomllib.loads(again)["models"]) == {"base", "smollm2-135m-instruct-f16"}


def test_quantized_source_is_refused_without_a_flag(model_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QuantizeError, match=r"already quantized \(Q4_1\).*compounds"):
        run_ladder(model_path, out, Options(eval=TINY))
    assert not out.exists()


def test_cli_refusal_is_one_line_and_exit_2(model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(model_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("codeserve: ") and "--rebuild-f16" in err and "--force" in err


def test_force_requantizes_and_llama_cpp_refusal_leaves_nothing(model_path, tmp_path):
    stem = model_stem(model_path)
    assert stem == "SmolLM2-135M-Instruct"
    with pytest.raises(QuantizeError, match="requantizing from type q4_1 is disabled"):
        build_ladder(model_path, tmp_path, stem, ["Q4_0"], progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []
    (rung,) = build_ladder(model_path, tmp_path, stem, ["Q4_0"], requantize=True)
    assert rung.path.is_file() and inspect_gguf(rung.path).file_type == "Q4_0"
    assert [p.name for p in tmp_path.iterdir()] == [rung.path.name]


@pytest.mark.parametrize("keep", [0.5, 0.9999, 0.0])
def test_truncated_source_fails_clearly_and_writes_nothing(model_path, tmp_path, keep):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = model_path.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out"
    with pytest.raises(QuantizeError, match=r"truncated|not a readable GGUF"):
        run_ladder(bad, out, Options(rebuild_f16=True, eval=TINY))
    assert not out.exists()


def test_failure_after_quantizing_removes_what_this_run_wrote(model_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")

    def broken(*_args, **_kw):
        raise QuantizeError("simulated quality failure")

    monkeypatch.setattr("quantize.pipeline.evaluate", broken)
    with pytest.raises(QuantizeError, match="simulated"):
        run_ladder(model_path, out, Options(types="Q8_0", rebuild_f16=True, eval=TINY))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_hf_checkpoint_needs_torch_and_says_so(tmp_path, monkeypatch):
    hf = tmp_path / "tiny-model"
    hf.mkdir()
    out = tmp_path / "out"
    with pytest.raises(QuantizeError, match=r"no config\.json"):
        run_ladder(hf, out, Options(eval=TINY))
    (hf / "config.json").write_text("{}")
    monkeypatch.setattr(convert, "missing_modules", lambda: ["torch"])
    with pytest.raises(
        QuantizeError, match=r"needs torch, transformers and sentencepiece.*missing: torch"
    ):
        run_ladder(hf, out, Options(eval=TINY))
    assert not out.exists()


def _tiny_hf_checkpoint(gguf_path: Path, out: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, rebuilt from the GGUF's vocab so that
    llama.cpp's converter recognises it; no network needed."""
    import gguf
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    reader = gguf.GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>"
    ).save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)
    return out


def test_hf_checkpoint_converts_and_quantizes(model_path, tmp_path):
    for module in ("torch", "transformers", "sentencepiece", "tokenizers"):
        pytest.importorskip(module)
    hf = _tiny_hf_checkpoint(model_path, tmp_path / "tiny-llama")
    out = tmp_path / "out"
    report = run_ladder(hf, out, Options(types="Q8_0", eval=TINY), progress=lambda _: None)
    assert [r["type"] for r in report["rungs"]] == ["F16", "Q8_0"]
    assert report["source"]["source_type"] == "Hugging Face checkpoint"
    f16 = inspect_gguf(out / "tiny-llama-F16.gguf")
    assert (f16.file_type, f16.rebuilt_from) == ("F16", None)


def test_converter_is_fetched_from_the_sdist():
    target = convert.converter_dir(convert.default_cache_root(), progress=lambda _: None)
    assert (target / "convert_hf_to_gguf.py").is_file()
    assert (target / "conversion").is_dir() and (target / "gguf-py" / "gguf").is_dir()


def test_types_and_cli_parser():
    import argparse

    assert parse_types(None) == list(LADDER)
    assert parse_types("q2_k, Q8_0") == ["F16", "Q8_0", "Q2_K"]
    with pytest.raises(QuantizeError, match="unknown type"):
        parse_types("Q1_X")
    sub = argparse.ArgumentParser().add_subparsers()
    p = add_parser(sub)
    args = p.parse_args(["m.gguf", "--out", "d", "--types", "Q4_K_M", "--register"])
    assert (args.out, args.types, args.register, args.corpus) == (Path("d"), "Q4_K_M", "", "stdlib")
    assert args.func.__name__ == "run"
