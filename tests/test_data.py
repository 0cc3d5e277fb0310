import json

import pytest
import torch

from flatquant import data


def test_eval_windows_drop_the_tail_and_respect_the_limit():
    ids = torch.arange(10).unsqueeze(0)
    assert data.eval_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.eval_windows(ids, 3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than one window of seqlen=11"):
        data.eval_windows(ids, 11)


def test_calibration_windows_are_seeded_slices():
    ids = torch.arange(1000).unsqueeze(0)
    a = data.calibration_windows(ids, 5, 16, seed=0)
    assert a.shape == (5, 16)
    assert torch.equal(a, data.calibration_windows(ids, 5, 16, seed=0))
    assert not torch.equal(a, data.calibration_windows(ids, 5, 16, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 15, dtype=a.dtype))  # contiguous text
    with pytest.raises(ValueError, match="not more than seqlen=1000"):
        data.calibration_windows(ids, 5, 1000)


def test_local_text_strips_doc_markers_and_json_summaries(tmp_path):
    t = tmp_path / "a.utf8"
    t.write_text('<doc id="1" title="x">\nHello world\n</doc>\n<doc id="2">\nSecond\n</doc>\n')
    assert data.load_text(str(t)) == "Hello world\nSecond\n"
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"A": {"extract": "first"}, "B": {"extract": "second"}}))
    assert data.load_text(str(j)) == "first\n\nsecond"


def test_unknown_dataset_is_named_in_the_error():
    with pytest.raises(ValueError, match="'no-such-text' is neither a known name"):
        data.load_text("no-such-text")


def test_offline_texts_are_found_when_installed():
    try:
        text = data.load_text("c4")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(text) > 100_000 and "<doc" not in text


class _CharTokenizer:
    """One id per character: a text's ids say which text a window came from."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        class _Out:
            input_ids = torch.tensor([[ord(c) for c in text]])

        return _Out()


def test_calibration_mixture_draws_shares_from_each_text_and_shuffles(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("".join(chr(97 + i % 13) for i in range(400)))  # a..m, in order
    b.write_text("".join(chr(110 + i % 13) for i in range(300)))  # n..z
    c.write_text("c" * 50)
    tok = _CharTokenizer()
    # one text (even one with a '+' in its name): exactly the windows of calibration_windows
    plus = tmp_path / "x+y.txt"
    plus.write_text("".join(chr(65 + i % 26) for i in range(500)))
    for spec in (str(a), str(plus)):
        one = data.calibration_mixture(tok, spec, 6, 16, seed=3)
        assert torch.equal(one, data.calibration_windows(tok(open(spec).read()).input_ids, 6, 16, seed=3))
    one_a = data.calibration_mixture(tok, str(a), 6, 16, seed=3)
    # a listed twice: two shares of 8 windows, b one share; every window comes from a single text
    mix = data.calibration_mixture(tok, f"{a}+{b}+{a}", 8, 16, seed=0)
    assert mix.shape == (8, 16)
    source = ["a" if int(w[0]) < 110 else "b" for w in mix]
    assert sorted(source) == ["a"] * 6 + ["b"] * 2  # 8 * 2 // 3 = 5 and 8 // 3 = 2, the remainder to the first
    for w, text in zip(mix.tolist(), source, strict=True):  # each window a contiguous slice of its text
        base = 97 if text == "a" else 110
        assert all((y - base) == (x - base + 1) % 13 for x, y in zip(w, w[1:], strict=False))
    assert source != sorted(source)  # shuffled: batches mix the texts
    assert torch.equal(mix, data.calibration_mixture(tok, f"{a}+{b}+{a}", 8, 16, seed=0))
    assert data.mixture_parts(f"{a}+{b}+{a}") == {str(a): 2, str(b): 1}
    with pytest.raises(ValueError, match="has 50 tokens, not more than seqlen=64"):
        data.calibration_mixture(tok, f"{a}+{c}", 4, 64)
    with pytest.raises(ValueError, match="empty part"):
        data.mixture_parts(f"{a}++{b}")
    with pytest.raises(ValueError, match=f"nsamples=1 leaves calibration text '{b}' of the mixture .* no window"):
        data.calibration_mixture(tok, f"{a}+{b}", 1, 16)
    with pytest.raises(ValueError, match="'nope' is neither a known name.*'\\+' separates texts"):
        data.calibration_mixture(tok, f"{a}+nope", 4, 16)
    # one text listed twice (or with spaces) is that text alone
    for spec in (f"{a}+{a}", f" {a}"):
        assert torch.equal(data.calibration_mixture(tok, spec, 6, 16, seed=3), one_a)
