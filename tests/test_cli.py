import json

import pytest
from conftest import tiny_model

from flatquant import cli
from flatquant.config import FlatQuantConfig, preset


def _args(*argv):
    return cli.build_parser().parse_args(["quantize", *argv])


def test_options_are_generated_from_the_config_and_default_to_the_preset():
    cfg = cli.config_from_args(_args("--preset", "quick"))
    assert cfg == preset("quick")
    cfg = cli.config_from_args(_args("--w-bits", "8", "--no-smooth", "--w-group-size", "32", "--lr", "0.01"))
    assert (cfg.w_bits, cfg.smooth, cfg.w_group_size, cfg.lr) == (8, False, 32, 0.01)
    assert cfg.epochs == FlatQuantConfig().epochs
    cfg = cli.config_from_args(_args("--w-group-size", "none"))
    assert cfg.w_group_size is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--w-bits", "1"], "w_bits=1 is out of range"),
        (["--a-bits", "17"], "a_bits=17 is out of range"),
        (["--method", "gptq"], "method='gptq' is not one of"),
        (["--transform-init", "zeros"], "transform_init='zeros'"),
    ],
)
def test_bad_options_give_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.config_from_args(_args(*argv))


def test_the_accurate_preset_changes_only_rate_epochs_and_activation_symmetry():
    paper, accurate = preset("paper").to_dict(), preset("accurate").to_dict()
    changed = {k: (paper[k], v) for k, v in accurate.items() if paper[k] != v}
    assert changed == {"lr": (0.005, 0.01), "a_symmetric": (True, False), "epochs": (15, 60)}
    assert cli.config_from_args(_args("--preset", "accurate", "--epochs", "20")).epochs == 20  # flags still win


def test_unknown_preset_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["quantize", "--preset", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_missing_model_and_checkpoint_exit_with_code_2(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "missing.gguf"), "--eval-data"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_data_none_skips_and_an_unknown_text_fails_before_loading(tmp_path, monkeypatch, capsys):
    args = _args("--eval-data", "none")
    cli._check_eval_data(args)
    assert args.eval_data == []

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the evaluation text was checked")

    monkeypatch.setattr(cli, "load_model", no_load)
    missing = str(tmp_path / "nope.txt")
    assert cli.main(["quantize", "--output", str(tmp_path / "ck"), "--eval-data", "wiki", missing]) == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and "neither a known name" in err
    assert not (tmp_path / "ck").exists()


def test_quantize_and_eval_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(3000)))
    monkeypatch.setattr(cli, "load_model", lambda name, dtype=None: (tiny_model("mistral"), tokenizer))
    out, results = tmp_path / "ckpt", tmp_path / "results.json"
    common = ["--eval-data", str(text), "--eval-seqlen", "64", "--eval-windows", "8", "--device", "cpu", "--quiet"]
    argv = ["quantize", "--preset", "quick", "--seqlen", "64", "--nsamples", "4", "--epochs", "1"]
    argv += ["--calib-data", str(text), "--output", str(out), "--results-json", str(results), "--baselines"]
    assert cli.main(argv + common) == 0
    records = json.loads(results.read_text())
    assert [r["method"] for r in records] == ["fp", "rtn", "rotation", "flatquant"]
    assert [r["calib"] for r in records] == [None, None, None, str(text)]  # only the calibrated run names its text
    assert cli.main(["eval", "--checkpoint", str(out), "--results-json", str(results)] + common) == 0
    again = json.loads(results.read_text())[-1]
    assert again["text_ppl"] == records[-1]["text_ppl"]  # loading reproduces the perplexity exactly
    assert records[0]["text_ppl"] != records[-1]["text_ppl"]
    assert cli.main(argv + common) == 2  # the output exists: refused without --overwrite
    assert "exists" in capsys.readouterr().err
    gptq = ["--weight-method", "gptq", "--override", "down_proj:w8a8", "--overwrite", "--method", "rtn"]
    assert cli.main([a for a in argv if a != "--baselines"] + gptq + common) == 0
    last = json.loads(results.read_text())[-1]
    assert (last["method"], last["weights"], last["notes"]) == ("rtn", "gptq", "down_proj: W8A8")
    assert last["calib"] == str(text)  # GPTQ's Hessians come from the calibration text
    assert cli.main(["eval", "--checkpoint", str(out), "--results-json", str(results)] + common) == 0
    assert json.loads(results.read_text())[-1]["text_ppl"] == last["text_ppl"]


def test_gptq_with_stream_is_refused_before_any_work(tmp_path, capsys):
    argv = [
        "quantize",
        "--stream",
        "--weight-method",
        "gptq",
        "--model",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 2
    assert "--weight-method gptq needs a single process" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--head-bits", "8", "--head-group", "24"],
            "head_group=24 must be a multiple of 16 that divides the hidden size 64",
        ),
        (["--head-bits", "8", "--head-group", "-16"], "head_group=-16 must be a multiple of 16"),
        (["--head-group", "32"], "--head-group 32 applies to --head-bits 8 only"),
    ],
)
def test_pack_refuses_a_bad_head_group_before_calibrating(tmp_path, monkeypatch, capsys, extra, message):
    """A head group the 8-bit head cannot use fails as soon as the model's hidden size is known: no calibration
    runs (the quantize function is never reached) and no output is written."""
    monkeypatch.setattr(cli, "load_model", lambda name, dtype=None: (tiny_model("llama"), None))
    calibrated = []
    monkeypatch.setattr(cli, "_timed_quantize", lambda *a, **k: calibrated.append(1))
    argv = ["pack", "--output", str(tmp_path / "p"), "--device", "cpu", "--quiet", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not calibrated and not (tmp_path / "p").exists()


def test_eos_ids_come_from_the_generation_config_and_the_tokenizer(tmp_path):
    from types import SimpleNamespace

    from flatquant.loading import eos_token_ids

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=128001)) == [128001, 128009]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=3)) == [7, 3]
    (tmp_path / "generation_config.json").unlink()  # none: the tokenizer's alone
    assert eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=3)) == [3]
    assert eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=None)) == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["quantize"], "wiki-summaries"),
        (["quantize", "--preset", "accurate"], "wiki-summaries+technical+tiny"),
        (["quantize", "--preset", "accurate", "--calib-data", "my.txt"], "my.txt"),
        (["pack", "--output", "o", "--preset", "accurate"], "wiki-summaries+technical+tiny"),
        (["pack", "--output", "o", "--preset", "quick"], "wiki-summaries"),
    ],
)
def test_calibration_text_defaults_to_the_presets(monkeypatch, argv, expected):
    """Without --calib-data a command calibrates on its preset's text (the accurate preset's mixture); a named
    text always wins."""
    seen = []
    for name in ("cmd_quantize", "cmd_pack"):
        monkeypatch.setattr(cli, name, lambda args: seen.append(args.calib_data) or [])
    monkeypatch.setattr(cli, "_check_tasks", lambda args: None)
    assert cli.main(argv) == 0
    assert seen == [expected]


@pytest.mark.parametrize("tied", [False, True])
def test_pack_size_summary_counts_each_weight_once_and_names_the_head_option(tied):
    """The line `flatquant pack` prints: 16-bit bytes from the parameter count (a tied embedding once), and the
    --head-bits 8 hint only while a 16-bit head is a large share of the weights."""
    model = tiny_model("llama", tie_word_embeddings=tied)
    emb = model.get_input_embeddings().weight.numel()
    total, head = cli._sixteen_bit_bytes(model)
    assert total == 2 * sum(p.numel() for p in model.parameters())
    assert head == 2 * emb * (1 if tied else 2)
    line = cli._size_summary((total, head), total // 4, 16)
    assert "4.00x smaller than the weights at 16 bits" in line and "--head-bits 8" in line
    assert f"{cli._human_bytes(2 * head)} of them are the input embedding and lm_head, kept in 32 bits" in (
        cli._size_summary((total, head), total // 2, 16, stored_bits=32)
    )
    assert "--head-bits 8" not in cli._size_summary((total, head), total // 4, 8)  # already int8
    assert "--head-bits 8" not in cli._size_summary((total, total // 20), total // 4, 16)  # a small share
    assert cli._human_bytes(3 * 2**30) == "3.00 GiB" and cli._human_bytes(1536) == "1.50 KiB"


def test_long_cpu_calibrations_are_announced_with_their_size():
    paper, quick = preset("paper"), preset("quick")
    ratio = paper.nsamples * paper.seqlen * paper.epochs / (quick.nsamples * quick.seqlen * quick.epochs)
    warning = cli.slow_on_cpu(paper, "cpu")
    assert warning is not None and f"{ratio:.0f}x the work of --preset quick" in warning
    assert f"{paper.nsamples} x {paper.seqlen} tokens for {paper.epochs} epochs" in warning
    assert cli.slow_on_cpu(quick, "cpu") is None  # the demonstration itself
    assert cli.slow_on_cpu(paper, "cuda") is None and cli.slow_on_cpu(paper, "cuda:1") is None
    assert cli.slow_on_cpu(paper.replace(method="rtn"), "cpu") is None  # nothing is trained
