import json
import os
import sys

import pytest
from conftest import tiny_model

from flatquant import cli, report, zeroshot

DATA = os.path.join(os.path.dirname(__file__), "data", "zeroshot")
pytest.importorskip("lm_eval")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0")


@pytest.fixture
def tasks_dir(tmp_path):
    """The tiny task's YAML with its data file made absolute (the datasets library resolves it from the cwd)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    with open(os.path.join(DATA, "tiny_mc.yaml")) as f:
        text = f.read().replace("validation: tiny_mc.jsonl", f"validation: {os.path.join(DATA, 'tiny_mc.jsonl')}")
    (folder / "tiny_mc.yaml").write_text(text)
    return folder


def test_report_numbers_equal_what_lm_eval_returned(tmp_path, tasks_dir, monkeypatch, capsys):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(cli, "load_model", lambda name, dtype=None: (tiny_model("llama"), _tokenizer()))
    out, results = tmp_path / "report", tmp_path / "results.json"
    argv = ["eval", "--eval-data", "--tasks", "tiny_mc", "--tasks-path", str(tasks_dir), "--device", "cpu"]
    assert cli.main(argv + ["--quiet", "--results-json", str(results), "--report", str(out)]) == 0
    record = json.loads((out / "report.json").read_text())["records"][0]
    assert record == json.loads(results.read_text())[0]

    lm = HFLM(pretrained=tiny_model("llama"), tokenizer=_tokenizer(), batch_size=1, device="cpu")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    expected = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, log_samples=False)
    metrics = expected["results"]["tiny_mc"]
    assert record["zeroshot"]["tiny_mc"] == {
        "metric": "acc_norm",
        "value": metrics["acc_norm,none"],
        "stderr": metrics["acc_norm_stderr,none"],
    }
    assert record["paper_mean"] is None  # none of the paper's six tasks was run
    assert record["zeroshot_settings"]["tasks"] == ["tiny_mc"] and record["zeroshot_settings"]["num_fewshot"] == 0
    assert record["versions"]["lm-eval"] == lm_eval.__version__ and record["versions"]["torch"]
    assert record["device"] == "cpu" and record["config"] is None
    row = (out / "report.md").read_text().splitlines()[2]
    assert f"| {100 * metrics['acc_norm,none']:.2f} |" in row
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_scores_take_acc_norm_else_acc_and_average_the_paper_tasks():
    results = {
        "results": {
            "arc_easy": {"acc,none": 0.7, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.01},
            "winogrande": {"acc,none": 0.5, "acc_stderr,none": "N/A"},
            "mine": {"acc,none": 0.1},
        }
    }
    scores = zeroshot.task_scores(results)
    assert scores["arc_easy"] == {"metric": "acc_norm", "value": 0.6, "stderr": 0.01}
    assert scores["winogrande"] == {"metric": "acc", "value": 0.5, "stderr": None}
    assert zeroshot.paper_mean(scores) == pytest.approx(0.55)  # 'mine' is not a paper task
    assert zeroshot.paper_mean({"mine": scores["mine"]}) is None


def _write_run(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def test_report_renders_runs_side_by_side(tmp_path, monkeypatch, capsys):
    fp = {"model": "m/smol", "method": "fp", "w_bits": 16, "a_bits": 16, "kv_bits": 16, "wiki_ppl": 20.0}
    fp["zeroshot"] = {"piqa": {"metric": "acc_norm", "value": 0.6, "stderr": 0.01}}
    fp["paper_mean"] = 0.6
    fq = {"model": "m/smol", "method": "flatquant", "w_bits": 4, "a_bits": 4, "kv_bits": 4, "wiki_ppl": 22.5}
    fq["c4_ppl"], fq["config"] = 30.25, {"w_bits": 4}
    runs = [_write_run(tmp_path / "a.json", [fp]), _write_run(tmp_path / "b.json", [fq])]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no matplotlib: the plot is skipped, not an error
    assert cli.main(["report", *runs, "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    lines = table.splitlines()
    assert lines[0] == "| model | method | W/A/KV | wiki PPL | c4 PPL | piqa acc_norm | mean (6 tasks) |"
    assert lines[2] == "| smol | fp | 16/16/16 | 20.000 | – | 60.00 | 60.00 |"
    assert lines[3] == "| smol | flatquant | 4/4/4 | 22.500 | 30.250 | – | – |"
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["source"] for r in saved["records"]] == runs and saved["records"][1]["config"] == {"w_bits": 4}
    assert saved["report_environment"]["versions"]["flatquant"]
    assert sorted(os.listdir(tmp_path / "out")) == ["report.json", "report.md"]
    # a report renders again from its own JSON
    assert cli.main(["report", str(tmp_path / "out" / "report.json")]) == 0
    assert capsys.readouterr().out == table
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_task_fails_before_loading_the_model(tasks_dir, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for an unknown task")

    monkeypatch.setattr(cli, "load_model", no_load)
    argv = ["eval", "--eval-data", "--tasks", "tiny_mc", "no_such_task", "--tasks-path", str(tasks_dir)]
    assert cli.main(argv) == 2
    assert "unknown zero-shot task(s) ['no_such_task']" in capsys.readouterr().err


def test_missing_lm_eval_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'lm-eval>=0.4'"):
        zeroshot.run_tasks(tiny_model("llama"), _tokenizer(), ["piqa"])


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    report.atomic_write(str(tmp_path / "x" / "a.md"), "one")
    report.atomic_write(str(tmp_path / "x" / "a.md"), "two")
    assert os.listdir(tmp_path / "x") == ["a.md"] and (tmp_path / "x" / "a.md").read_text() == "two"


def test_report_draws_a_perplexity_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from flatquant.report import write_report

    records = [
        {"model": "m", "method": "fp", "w_bits": 16, "a_bits": 16, "kv_bits": 16, "wiki_ppl": 18.0, "c4_ppl": 29.3},
        {"model": "m", "method": "flatquant", "w_bits": 4, "a_bits": 4, "kv_bits": 4, "wiki_ppl": 23.9},
    ]
    paths = write_report(records, str(tmp_path))
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["perplexity.png", "report.json", "report.md"]
