import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from mfkit.errors import MfkitError
from mfkit.representations import embed, maps, pool, separation


def test_pool_reads_the_first_the_mean_and_the_last_real_token():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # rows [0,1,2] and [3,4,5]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "cls").squeeze(-1).tolist() == [0, 3]
    assert pool(hidden, mask, "mean").squeeze(-1).tolist() == [0.5, 4.0]  # the padded 2 is left out
    assert pool(hidden, mask, "last").squeeze(-1).tolist() == [1, 5]
    with pytest.raises(MfkitError, match="pooling"):
        pool(hidden, mask, "max")


def test_embed_returns_rows_in_order_with_their_labels():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = BertForSequenceClassification(config).train()
    ids = torch.randint(5, 50, (6, 4))
    batches = [
        {"input_ids": ids[:4], "labels": torch.tensor([0, 1, 0, 1])},
        {"input_ids": ids[4:], "labels": torch.tensor([1, 1])},
    ]
    vectors, labels = embed(model, batches)
    assert vectors.shape == (6, 16) and labels.tolist() == [0, 1, 0, 1, 1, 1]
    assert model.training  # left as it was
    model.eval()
    with torch.no_grad():
        first = model.bert(input_ids=ids[:1]).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(vectors[0], first, atol=1e-5)


def test_separation_tells_separated_classes_from_mixed_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    apart = (
        rng.normal(size=(80, 8)) + (2 * labels[:, None] - 1) * 3.0
    )  # centres at -3 and +3 in every dimension
    mixed = rng.normal(size=(80, 8))
    good = separation(apart[::2], labels[::2], apart[1::2], labels[1::2])
    bad = separation(mixed[::2], labels[::2], mixed[1::2], labels[1::2])
    assert good["knn_accuracy"] == 1.0 and good["probe_accuracy"] == 1.0 and good["silhouette"] > 0.5
    assert bad["knn_accuracy"] < 0.8 and abs(bad["silhouette"]) < 0.1
    with pytest.raises(MfkitError, match="two classes"):
        separation(apart, np.zeros(80), apart, labels)


def test_maps_are_two_dimensional_for_every_row():
    vectors = np.random.default_rng(0).normal(size=(20, 8))
    pictures = maps(vectors)
    assert set(pictures) == {"PCA", "t-SNE"} and all(p.shape == (20, 2) for p in pictures.values())
