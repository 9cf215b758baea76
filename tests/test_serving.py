"""Batch prediction and the HTTP endpoint, end to end with a tiny classifier saved like the chain saves one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mfkit import predict, serve
from mfkit.cli import main
from mfkit.errors import MfkitError

TEXTS = ["win money now", "meeting at noon", "cheap pills online", "the report is attached", "free prize!!!"]


def test_the_threshold_decides_two_classes_and_temperature_softens(tiny_classifier_dir):
    predictor = predict.Predictor.load(tiny_classifier_dir)
    probs = predictor.probabilities(TEXTS, batch_size=2)
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1)
    cut = float(np.median(probs[:, 1]))
    predictor.threshold = cut
    predicted = predictor.predict(TEXTS)
    assert [p["label"] == "spam" for p in predicted] == list(probs[:, 1] >= cut)
    # the number is named for what it holds: p(spam), also where the label decided is ham
    assert {p["positive_label"] for p in predicted} == {"spam"}
    assert [p["p_positive"] for p in predicted] == pytest.approx(probs[:, 1].tolist(), abs=1e-6)
    assert all(set(p) == {"label", "positive_label", "p_positive"} for p in predicted)
    predictor.temperature = 10.0
    assert np.abs(predictor.probabilities(TEXTS)[:, 1] - 0.5).max() < np.abs(probs[:, 1] - 0.5).max()
    (tiny_classifier_dir / predict.SERVING_CONFIG).write_text(
        json.dumps({"threshold": 0.9, "max_length": 16})
    )
    try:
        saved = predict.Predictor.load(tiny_classifier_dir)
        assert saved.threshold == 0.9 and saved.max_length == 16
        assert predict.Predictor.load(tiny_classifier_dir, threshold=0.2).threshold == 0.2
    finally:
        (tiny_classifier_dir / predict.SERVING_CONFIG).unlink()


def test_predict_file_adds_the_label_and_named_probability_equal_to_the_predictor(
    tiny_classifier_dir, tmp_path
):
    source = tmp_path / "mails.csv"
    pd.DataFrame({"id": range(5), "body": TEXTS}).to_csv(source, index=False)
    out = tmp_path / "out" / "pred.jsonl"
    code = main(
        [
            "predict",
            str(tiny_classifier_dir),
            "--input",
            str(source),
            "--output",
            str(out),
            "--text-column",
            "body",
        ]
    )
    assert code == 0
    rows = pd.read_json(out, lines=True)
    expected = predict.Predictor.load(tiny_classifier_dir).predict(TEXTS)
    assert rows["label"].tolist() == [e["label"] for e in expected]
    assert rows["positive_label"].tolist() == ["spam"] * 5
    assert rows["p_positive"].to_numpy() == pytest.approx([e["p_positive"] for e in expected], abs=1e-6)
    assert "probability" not in rows.columns
    assert rows["id"].tolist() == list(range(5))


@pytest.mark.parametrize(
    ("content", "name", "args", "message"),
    [
        ("", "empty.csv", [], "is empty"),
        ("text\n", "header.csv", [], "no rows"),
        ("body\nhello\n", "other.csv", [], "no column 'text'"),
        ("id,text\n1,hello\n2,\n", "blank.csv", [], "empty text in row(s) 2"),
        ('{"text": "a"}\n', "ok.txt", [], "unknown file type"),
    ],
)
def test_bad_input_files_stop_with_one_message_and_write_nothing(
    tiny_classifier_dir, tmp_path, capsys, content, name, args, message
):
    source = tmp_path / name
    source.write_text(content)
    out = tmp_path / "pred.csv"
    assert (
        main(["predict", str(tiny_classifier_dir), "--input", str(source), "--output", str(out), *args]) == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".pred.csv*"))


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    with pytest.raises(MfkitError, match="not a saved classifier"):
        predict.Predictor.load(tmp_path)


@pytest.fixture(scope="module")
def server(tiny_classifier_dir):
    with serve.running_server(
        tiny_classifier_dir, "--max-texts", "4", "--max-chars", "200", "--max-wait-ms", "20"
    ) as url:
        yield url


def test_the_endpoint_answers_like_the_predictor(server, tiny_classifier_dir):
    import urllib.request

    with urllib.request.urlopen(f"{server}/health", timeout=30) as answer:
        health = json.loads(answer.read())
    assert health["status"] == "ok" and health["labels"] == ["ham", "spam"]
    assert (
        health["positive_label"] == "spam"
        and serve.get_json(f"{server}/health")["labels"] == health["labels"]
    )
    status, body = serve.post_json(f"{server}/predict", {"texts": TEXTS[:3]})
    expected = predict.Predictor.load(tiny_classifier_dir).predict(TEXTS[:3])
    assert status == 200 and [p["label"] for p in body["predictions"]] == [e["label"] for e in expected]
    assert [p["p_positive"] for p in body["predictions"]] == pytest.approx(
        [e["p_positive"] for e in expected], abs=1e-5
    )
    assert all(p["positive_label"] == "spam" for p in body["predictions"])


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"texts": []}, 422),
        ({"texts": ["a"] * 5}, 413),
        ({"texts": ["x" * 201]}, 413),
        ({"text": "a"}, 422),
        ({"texts": [3]}, 422),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, payload, status):
    code, body = serve.post_json(f"{server}/predict", payload)
    assert code == status and body.get("detail")
    assert serve.post_json(f"{server}/predict", {"texts": ["still there?"]})[0] == 200


def test_concurrent_clients_are_batched_and_measured(server):
    import urllib.request

    def batches_run() -> int:
        with urllib.request.urlopen(f"{server}/health", timeout=30) as answer:
            return json.loads(answer.read())["batches_run"]

    before = batches_run()
    report = serve.load_test(server, TEXTS, clients=8, requests_per_client=3)
    assert report["requests"] == 24 and report["failed"] == 0
    assert 0 < report["p50_ms"] <= report["p99_ms"] and report["requests_per_s"] > 0
    assert batches_run() - before < 24  # fewer forward passes than requests: concurrent texts shared batches


def test_more_classes_name_the_probability_of_the_predicted_label():
    predictor = predict.Predictor(model=None, tokenizer=None, labels=["a", "b", "c"])
    predictor.probabilities = lambda texts, batch_size=32: np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    assert predictor.predict(["x", "y"]) == [{"label": "b", "p_label": 0.5}, {"label": "a", "p_label": 0.6}]
