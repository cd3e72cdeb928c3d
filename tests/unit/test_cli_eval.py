"""`quept eval` on a tiny model folder: the JSON schema, the table, and one-line errors."""

import json

import pytest
from tiny_lm import tiny_folder, tiny_model, tiny_text
from typer.testing import CliRunner

from quept_core.eval.baselines.llmc import undivided_widths
from service.cli import app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return tiny_text(tmp_path_factory.mktemp("text") / "text.txt", words=400)


def run(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_json_has_one_row_per_method_and_precision(model_dir, text_file):
    result = run("--text", text_file, "--model", model_dir, "--precision", "fp,w3,w8", "--method", "rtn",
                 "--seqlen", 64, "--max-tokens", 256, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"model", "seqlen", "tokens", "results", "skipped"}
    assert data["seqlen"] == 64 and data["tokens"] == 256
    rows = data["results"]
    assert [(r["precision"], r["method"]) for r in rows] == [("fp", "fp"), ("w3", "rtn"), ("w8", "rtn")]
    assert all(set(r) == {"precision", "method", "ppl", "storage_bits", "note"} for r in rows)
    fp, w3, w8 = (r["ppl"] for r in rows)
    assert abs(w8 - fp) < abs(w3 - fp)
    assert rows[0]["storage_bits"] == 16.0
    assert rows[1]["storage_bits"] == pytest.approx(3 + 24 / 64)


def test_table_states_the_grid(model_dir, text_file):
    result = run("--text", text_file, "--model", model_dir, "--precision", "fp", "--seqlen", 64)
    assert result.exit_code == 0, result.output
    assert "integer zero-point" in result.stdout and "w4 g64" in result.stdout
    assert "seqlen 64 over 384 tokens" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "{missing}"], "error: --text: file not found"),
    (["--precision", "w9"], "error: --precision: unknown entry 'w9'; allowed: all, fp, w3, w4, w5, w6, w7, w8, mixed:"),
    (["--precision", "auto"], "error: --precision: unknown entry 'auto'"),
    (["--method", "awq"], "error: --method: unknown method 'awq'; allowed: quept, rtn, gptq"),
    (["--seqlen", "5000"], "error: --seqlen 5000 is larger than the text (400 tokens); allowed: 2..400"),
])
def test_errors_are_one_line_and_name_the_field(model_dir, text_file, tmp_path, args, message):
    args = [a.replace("{missing}", str(tmp_path / "missing.txt")) for a in args]
    base = {"--text": str(text_file), "--model": str(model_dir), "--method": "rtn"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = run(*[x for pair in base.items() for x in pair])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message)
    assert errors[0] == result.stderr.strip().splitlines()[-1]


def test_baselines_without_their_package_are_skipped_with_a_message(model_dir, text_file, monkeypatch):
    from quept_core.eval.baselines import llmc
    from quept_core.io import llamacpp

    monkeypatch.setattr(llmc, "available", lambda: False)
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    result = run("--text", text_file, "--model", model_dir, "--precision", "fp,w4", "--method",
                 "rtn,llmc-gptq,llamacpp-q4_k_m", "--seqlen", 64, "--max-tokens", 128, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(r["precision"], r["method"]) for r in data["results"]] == [("fp", "fp"), ("w4", "rtn")]
    assert data["skipped"] == [
        ("llmc-gptq skipped: llm-compressor is not installed (install the baselines extra: "
         "bash deploy/install-baselines.sh)"),
        ("llamacpp-q4_k_m skipped: llama-cpp-python is not installed (install the baselines extra: "
         "bash deploy/install-baselines.sh)"),
    ]


def test_llamacpp_rows_need_a_gguf_model(model_dir, text_file):
    pytest.importorskip("llama_cpp")
    result = run("--text", text_file, "--model", model_dir, "--method", "llamacpp-q8_0", "--seqlen", 64)
    assert result.exit_code == 0, result.output
    assert "llamacpp-q8_0 skipped: llama.cpp rows need a GGUF model" in result.stdout


def test_llmc_rows_at_each_width(model_dir, text_file, tmp_path):
    pytest.importorskip("llmcompressor")
    calib_text = tiny_text(tmp_path / "calib.txt", words=2048, seed=1)  # the fast preset's 8 x 256 tokens
    result = run("--text", text_file, "--model", model_dir, "--precision", "w4,w7,w8,mixed:5", "--method",
                 "llmc-gptq-act,llmc-awq", "--calib-text", calib_text, "--seqlen", 64, "--max-tokens", 128,
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["results"]
    assert [(r["precision"], r["method"]) for r in rows] == [
        ("w4", "llmc-gptq-act"), ("w8", "llmc-gptq-act"), ("w4", "llmc-awq"), ("w8", "llmc-awq")]
    # w7's groups of 128 do not divide the tiny model's 64 columns: a message, not llm-compressor's error.
    assert data["skipped"] == [
        f"{method} {precision} skipped: " + reason
        for method in ("llmc-gptq-act", "llmc-awq")
        for precision, reason in (
            ("w7", ("llm-compressor needs groups that divide every row, and groups of 128 do not divide rows of "
                    "64 columns")),
            ("mixed:5.00", "llm-compressor rows are uniform bit-widths only"))]
    assert rows[0]["storage_bits"] == pytest.approx(4 + 24 / 64)
    assert all(1 < r["ppl"] < 1e4 for r in rows)


def test_llmc_widths_whose_groups_do_not_divide_a_row_are_found_without_llm_compressor():
    model = tiny_model()  # linears of 64 (q, k, v, o, gate, up) and 128 (down) columns
    assert undivided_widths(model, 128) == [64]
    assert undivided_widths(model, 64) == []
    assert undivided_widths(model, -1) == []
    assert undivided_widths(model, 48) == [64, 128]
