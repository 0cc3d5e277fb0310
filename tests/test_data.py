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
