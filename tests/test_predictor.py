"""The serving path: optimize_for_inference on CPU (an explicit dtype runs eagerly and says why; no dtype measures
the CPU paths, on copies, and the predictor says what it picked), a predictor shared by threads, and, on a GPU,
CUDA graphs per batch-size bucket whose outputs equal the eager model's."""

from __future__ import annotations

import threading

import pytest
import torch

import vit_fast
from vit_fast import cpu_features, cpu_paths
from vit_fast.cpu_paths import Candidate, Runner
from vit_fast.predictor import Predictor, optimize_for_inference


def _model(device: str = "cpu") -> torch.nn.Module:
    return vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).to(device)


def test_cpu_falls_back_to_eager_and_says_why():
    m = _model().train()
    p = optimize_for_inference(m, dtype=torch.float32, batch_sizes=(4, 1))
    assert isinstance(p, Predictor) and not p.graphed
    assert "CUDA graphs need a CUDA device" in p.why_not_graphed and "eager" in repr(p)
    assert p.buckets == (1, 4) and not m.training and not any(q.requires_grad for q in m.parameters())
    x = torch.randn(6, 3, 32, 32)  # larger than every bucket: eager runs it whole
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=0, atol=0)
    assert p.bucket_for(1) == 1 and p.bucket_for(3) == 4 and p.bucket_for(9) == 4


def test_cast_and_quantized_models():
    m = _model()
    p = optimize_for_inference(m, dtype=torch.float64, batch_sizes=(2,), cuda_graphs=False)
    assert p.why_not_graphed.startswith("cuda_graphs=False")
    x = torch.randn(2, 3, 32, 32)
    assert p(x).dtype == torch.float64  # inputs follow the predictor's dtype
    q = vit_fast.quantize(_model(), "int8")
    with pytest.raises(ValueError, match="float32"):
        optimize_for_inference(q, dtype=torch.bfloat16)
    pq = optimize_for_inference(q, batch_sizes=(2,))
    with torch.no_grad():
        torch.testing.assert_close(pq(x), q(x), rtol=0, atol=0)


def test_bad_requests():
    with pytest.raises(ValueError, match="positive"):
        optimize_for_inference(_model(), batch_sizes=(0,))
    p = optimize_for_inference(_model(), dtype=torch.float32, batch_sizes=(1,))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        p(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="search=True measures the CPU paths of a float32, unquantized model"):
        optimize_for_inference(vit_fast.quantize(_model(), "int8"), search=True)


class _Shared:
    """A static-shape path with state shared between calls, as a compiled graph's buffers are: it writes its
    input into one buffer, yields, and reads the buffer back. Unserialised threads see each other's images."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.buf = model, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.buf = x.clone()
        threading.Event().wait(0.001)
        return self.model(self.buf)


def _fake_paths(monkeypatch, tmp_path) -> None:
    """Candidates the test controls: fp32 (slowed down) and a faster static-shape one with shared state."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_features, "cpu_features",
                        lambda: cpu_features.CpuFeatures("Fake CPU", frozenset({"avx2"}), source="test"))

    cost = [0.0]  # what the search's timer reads: each fake path says what its calls cost (a shared machine's
    monkeypatch.setattr(cpu_paths, "_median_ms", lambda fn: (fn(), cost[0])[1])  # clock would be noise)

    def costing(ms, fn):
        def run(x):
            cost[0] = ms
            return fn(x)

        return run

    def fp32(model, calibration):
        return Runner(costing(4.0, model), torch.float32)

    def shared(model, calibration):
        return Runner(costing(1.0, _Shared(model)), torch.float32, static_shapes=True)

    monkeypatch.setattr(cpu_paths, "candidates", lambda: [Candidate("fp32", "slowed", fp32),
                                                          Candidate("shared", "static, shared state", shared)])


def test_cpu_search_runs_copies_and_says_what_it_picked(monkeypatch, tmp_path, capsys):
    _fake_paths(monkeypatch, tmp_path)
    m = _model().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = optimize_for_inference(m, batch_sizes=(4, 1))
    assert m.training and all(q.requires_grad for q in m.parameters())  # the caller's model is left as it was
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert p.pick.picks == {1: "shared", 4: "shared"} and "measured CPU paths B1: shared, B4: shared" in repr(p)
    assert "batch 4: shared" in p.explain() and "fp32" in p.explain()
    assert "vit_fast: CPU inference path batch 1: shared, batch 4: shared" in capsys.readouterr().err
    m.eval()
    with torch.no_grad():
        for n in (1, 3, 4, 9):  # padded up to a bucket, or chunked by the largest
            x = torch.randn(n, 3, 32, 32)
            torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)


def test_predictor_is_safe_to_call_from_threads(monkeypatch, tmp_path):
    _fake_paths(monkeypatch, tmp_path)
    p = optimize_for_inference(_model(), batch_sizes=(2,), verbose=False)
    assert p.pick.picks == {2: "shared"}
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(8)]
    alone = [p(x) for x in inputs]
    errors, results = [], {}

    def serve(i: int) -> None:
        try:
            results[i] = [p(inputs[i]) for _ in range(15)]
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, alone[i], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("quantized", [False, True])
def test_graphs_equal_eager_on_gpu(quantized):
    from vit_fast.quantization import supported_formats

    if quantized and supported_formats("cuda")["fp8"] is not None:
        pytest.skip(supported_formats("cuda")["fp8"])
    torch.manual_seed(0)
    m = _model("cuda").eval().to(torch.bfloat16)
    if quantized:
        m = vit_fast.quantize(m, "fp8")
    p = optimize_for_inference(m, dtype=torch.bfloat16, batch_sizes=(1, 4, 8))
    assert p.graphed and p.why_not_graphed is None
    with torch.no_grad():
        for n in (1, 3, 4, 8, 11):
            x = torch.randn(n, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
            out = p(x)
            assert out.shape == (n, m.num_classes)
            if n in p.buckets:  # the same kernels on the same shapes: bitwise the eager result
                torch.testing.assert_close(out, m(x), rtol=0, atol=0)
            else:  # padded up to a bucket (or chunked): each image's logits are computed independently
                b = p.bucket_for(n) if n <= p.buckets[-1] else p.buckets[-1]
                pad = torch.cat([x, x.new_zeros((-n) % b, *x.shape[1:])])
                eager = torch.cat([m(c) for c in pad.split(b)])[:n]
                torch.testing.assert_close(out, eager, rtol=0, atol=0)
        # a replay sees new inputs, and its result is not overwritten by the next one
        a = p(torch.ones(1, 3, 32, 32, device="cuda", dtype=torch.bfloat16))
        b = p(-torch.ones(1, 3, 32, 32, device="cuda", dtype=torch.bfloat16))
        assert not torch.equal(a, b)
