"""Every reader of a file vit_fast did not just write, fed mutated bytes of a valid file (bit flips, overwritten,
inserted and cut bytes): image files (predict's loader and training's ImageFolder loader), the dispatch policy
JSON, a run directory's summary.json and metrics.jsonl, and bench results. Each either reads the file or raises
its one documented error, which names the file; none crashes, hangs or raises anything else."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vit_fast.fileio import FileFormatError

HANG_S = 30  # far above any honest read of these tiny files, even on a loaded machine
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S) -> Iterator[None]:
    """Fail (instead of waiting forever) when the body runs longer than ``seconds``."""
    def timeout(*_args):
        raise AssertionError(f"the reader hung: still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def pil_limit(pixels: int) -> Iterator[None]:
    """A lower decompression-bomb limit: a flipped size field then costs megabytes, not gigabytes, on the shared
    machine (PIL's check is the same code whatever the limit)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with 1-4 edits: a bit flipped, a byte overwritten, bytes inserted, or the tail cut off."""
    out = bytearray(data)
    edits = st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
        st.tuples(st.just("set"), st.integers(0, 1 << 30), st.integers(0, 255)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("cut"), st.integers(0, 1 << 30)),
    )
    for edit in draw(st.lists(edits, min_size=1, max_size=4)):
        at = edit[1] % (len(out) + 1)
        if edit[0] == "flip" and at < len(out):
            out[at] ^= 1 << edit[2]
        elif edit[0] == "set" and at < len(out):
            out[at] = edit[2]
        elif edit[0] == "insert":
            out[at:at] = edit[2]
        elif edit[0] == "cut":
            del out[at:]
    return bytes(out)


JSON_VALUES = st.recursive(
    # integers stay small: a config claiming a 10**6-pixel-wide model is honest about its size, and building it
    # would take the shared machine's memory, not show a reader's bug
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(width=32) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


def _paths(node: object, at: tuple = ()) -> Iterator[tuple]:
    yield at
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*at, key))


@st.composite
def json_mutated(draw, doc: object) -> object:
    """``doc`` with 1-3 of its values (at any depth) replaced by a JSON value of any type, or removed: valid JSON
    of the wrong shape, the case byte edits rarely reach."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(list(_paths(doc))))
        if not at:
            doc = draw(JSON_VALUES)
            continue
        parent = doc
        for key in at[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[at[-1]]
        else:
            parent[at[-1]] = draw(JSON_VALUES)
    return doc


def any_mutation(doc: object) -> st.SearchStrategy[bytes]:
    text = json.dumps(doc, indent=1).encode()
    return st.one_of(mutated(text), json_mutated(doc).map(lambda d: json.dumps(d).encode()))


# ---- images ---------------------------------------------------------------------------------------------------

def _encoded(fmt: str, **save) -> bytes:
    rng = np.random.default_rng(len(fmt))
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    elif fmt == "PNG16":
        Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(buf, "PNG")
    else:
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, fmt, **save)
    return buf.getvalue()


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


SEEDS = {"png": _encoded("PNG"), "png+exif": _encoded("PNG", exif=_exif()), "jpeg": _encoded("JPEG", quality=90),
         "jpeg+exif": _encoded("JPEG", exif=_exif()), "gif": _encoded("GIF"), "bmp": _encoded("BMP"),
         "tiff": _encoded("TIFF"), "png16": _encoded("PNG16"), "webp": _encoded("WEBP")}


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_image_loaders_read_mutated_images_or_raise_their_error(tmp_path_factory, seed, data):
    from vit_fast.predict import ImageFiles, Preprocess, UnreadableImageError
    from vit_fast.train.data import read_image

    path = tmp_path_factory.getbasetemp() / f"fuzz.{seed.split('+')[0]}"
    path.write_bytes(data.draw(mutated(SEEDS[seed])))
    pre = Preprocess((8, 8), (0.5,) * 3, (0.25,) * 3, in_chans=3)
    with no_hang(), pil_limit(1 << 20), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on some damaged files (EXIF, truncated reads): not a failure
        try:
            x, note = pre.load(str(path))
        except UnreadableImageError as e:
            assert e.path == str(path) and str(e).startswith(f"{path}: not a readable image (")
        else:
            assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and bool(((x >= 0) & (x <= 1)).all())
            assert note is None or isinstance(note, str)
        item = ImageFiles([str(path)], pre)[0]  # what the DataLoader workers run: never raises
        assert (item["image"] is None) == (item["error"] is not None)
        try:
            image = read_image(str(path))
        except ValueError as e:
            assert str(e).startswith(f"{path}: not a readable image (")
        else:
            assert image.mode == "RGB"


def test_the_seed_images_themselves_load():
    """The fuzz starts from valid files: each seed loads (else the test above would fuzz nothing but errors)."""
    import tempfile

    from vit_fast.predict import Preprocess

    pre = Preprocess((8, 8), (0.5,) * 3, (0.25,) * 3, in_chans=3)
    with tempfile.TemporaryDirectory() as d:
        for name, blob in SEEDS.items():
            path = Path(d) / f"seed.{name.split('+')[0]}"
            path.write_bytes(blob)
            assert pre.load(str(path))[0].shape == (3, 8, 8), name


# ---- the dispatch policy --------------------------------------------------------------------------------------

def _policy_doc() -> dict:
    from vit_fast import policy

    doc = policy.new_document(policy.device_kind("cpu"), created="2026-01-01T00:00:00+00:00")
    measured = {b: {"median_ms": 1.0 / s, "speedup": s} for b, s in (("reference", 1.0), ("triton", 1.3))}
    doc["entries"] = [{"op": op, "dtype": "float32", "mode": mode, "bucket": [64, size],
                       "order": ["triton", "reference"], "measured": measured, "why": "fuzz"}
                      for op in ("attention", "layer_norm") for mode in ("fwd", "fwd+bwd") for size in (8, 32)]
    return doc


@FUZZ
@given(blob=any_mutation(_policy_doc()))
def test_a_mutated_policy_is_used_or_passed_over_with_a_warning_naming_it(tmp_path_factory, blob):
    from vit_fast import policy

    path = tmp_path_factory.getbasetemp() / "fuzz-policy.json"
    path.write_bytes(blob)
    policy.reset()
    with no_hang(), mock.patch.dict(os.environ, {policy.ENV: str(path)}), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            found = policy.found("cpu")
            if found.policy is None:
                assert any(issubclass(x.category, policy.PolicyWarning) and str(path) in str(x.message) for x in w)
            for key in [(e["op"], e["dtype"], e["mode"], tuple(e["bucket"])) for e in _policy_doc()["entries"]]:
                order, _gains, because = policy.choose("cpu", None, *key)
                assert order[-1] == "reference" and isinstance(because, str)
        finally:
            policy.reset()


# ---- a run directory: summary.json and metrics.jsonl ----------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from test_predict import _save_run

    import vit_fast

    run = _save_run(tmp_path_factory.mktemp("fuzzrun") / "run", vit_fast.create_model("vit_nano_patch2_8").eval())
    records = [{"kind": "train", "step": s, "epoch": 1, "loss": 2.0 / s, "acc": 0.5, "lr": 1e-3, "img_s": 900.0}
               for s in range(1, 4)] + [{"kind": "eval", "epoch": 1, "step": 3, "test_loss": 1.0, "test_top1": 0.5,
                                        "test_top5": 0.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@FUZZ
@given(data=st.data())
def test_a_mutated_run_summary_is_read_or_refused_naming_the_file(run_dir, data):
    from vit_fast.rundir import RunDirError, read_run

    summary = run_dir / "summary.json"
    original = summary.read_bytes()
    summary.write_bytes(data.draw(any_mutation(json.loads(original))))
    try:
        with no_hang():
            run = read_run(run_dir)
            facts = run.facts()
            assert isinstance(facts, dict)
            run.class_names(10)
            model = run.load_model()
            c = model.config
            if c.num_patches <= 256:  # a config may honestly ask for a big model: run only the small ones
                h, w = (c.img_size, c.img_size) if isinstance(c.img_size, int) else c.img_size
                assert model(torch.zeros(1, c.in_chans, h, w)).shape == (1, c.num_classes or c.embed_dim)
    except RunDirError as e:
        assert str(e).startswith((f"{summary}: ", f"{run_dir / 'model.safetensors'}: ")), str(e)
    finally:
        summary.write_bytes(original)


@FUZZ
@given(data=st.data())
def test_mutated_metrics_are_read_or_refused_naming_the_file(run_dir, data):
    from vit_fast.run_report import load_run
    from vit_fast.rundir import RunDirError

    metrics = run_dir / "metrics.jsonl"
    original = metrics.read_bytes()
    lines = original.decode().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = data.draw(json_mutated(json.loads(lines[i])).map(json.dumps))
    wrong_shape = "\n".join(lines).encode() + b"\n"
    metrics.write_bytes(data.draw(st.one_of(st.just(wrong_shape), mutated(original))))
    try:
        with no_hang():
            row = load_run(run_dir, measure=False)
            assert all(isinstance(r, dict) for r in row["records"])
    except RunDirError as e:
        assert str(e).startswith(f"{metrics}: "), str(e)
    finally:
        metrics.write_bytes(original)


# ---- bench results --------------------------------------------------------------------------------------------

def _results() -> dict:
    rows = [{"kind": "op", "name": "attention", "mode": mode, "dtype": "float32", "shape_label": "B2 N65", "provider":
             provider, "status": "ok", "median_ms": ms, "spread": 0.01}
            for mode in ("fwd", "fwd+bwd") for provider, ms in (("sdpa:math", 1.0), ("vit_fast:reference", 1.1))]
    rows.append({**rows[0], "provider": "vit_fast:triton", "status": "skipped", "median_ms": None, "spread": None})
    return {"schema": "vit_fast.bench/1", "environment": {"device": {"type": "cpu", "name": "fuzz cpu"}},
            "rows": rows}


@FUZZ
@given(blob=any_mutation(_results()))
def test_mutated_bench_results_compare_or_are_refused_naming_the_file(tmp_path_factory, blob):
    from vit_fast.bench import compare_results, format_comparison
    from vit_fast.bench.analysis import read_results

    path = tmp_path_factory.getbasetemp() / "fuzz-results.json"
    path.write_bytes(blob)
    with no_hang():
        try:
            doc = read_results(path)
        except FileFormatError as e:
            assert str(e).startswith(f"{path}: not a valid vit-fast bench results file"), str(e)
            return
        assert isinstance(format_comparison(compare_results(_results(), doc)), str)
        assert isinstance(format_comparison(compare_results(doc, doc)), str)


# ---- the same files, damaged by hand: truncated, bit-flipped, of the wrong type ---------------------------------

@pytest.mark.parametrize("damage", ["truncated", "bit flipped", "versions of the wrong type", "a list"])
def test_a_damaged_policy_is_passed_over_with_a_warning_naming_it(tmp_path, monkeypatch, damage):
    from vit_fast import policy

    good = json.dumps(_policy_doc())
    text = {"truncated": good[: len(good) // 2], "bit flipped": good.replace('"entries":', '"entries"\x3b', 1),
            "versions of the wrong type": json.dumps({**_policy_doc(), "versions": {"torch": 2.14}}),
            "a list": "[]"}[damage]
    path = tmp_path / "policy.json"
    path.write_text(text)
    monkeypatch.setenv(policy.ENV, str(path))
    policy.reset()
    try:
        with pytest.warns(policy.PolicyWarning, match=f"dispatch policy {path} .* is not used"):
            assert policy.found("cpu").policy is None
        assert policy.choose("cpu", None, "attention", "float32", "fwd", (64, 8))[0] == ("reference",)
    finally:
        policy.reset()


@pytest.mark.parametrize("damage, words", [
    (lambda t: t[: len(t) // 2], "invalid JSON"),
    (lambda t: t.replace('"rows":', '"rows"\x3b', 1), "invalid JSON"),
    (lambda t: json.dumps({**_results(), "rows": {"a": 1}}), "'rows' missing or not a list"),
    (lambda t: json.dumps({**_results(), "rows": [{**_results()["rows"][0], "median_ms": "1.0"}]}),
     "row 0 is 'ok' without a positive median_ms"),
    (lambda t: json.dumps({**_results(), "environment": {"device": "cpu"}}), "no environment.device"),
])
def test_damaged_bench_results_are_refused_naming_the_file_by_compare_and_bench(tmp_path, monkeypatch, capsys,
                                                                               damage, words):
    from vit_fast.bench.analysis import read_results

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_results()))
    bad.write_text(damage(json.dumps(_results(), indent=1)))
    with pytest.raises(FileFormatError, match=f"^{bad}: not a valid vit-fast bench results file: .*{words}"):
        read_results(bad)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compare

    assert compare.main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"compare: error: {bad}: ") and err.count("\n") == 1, err


def test_a_broken_image_in_an_image_folder_is_an_error_naming_it(tmp_path):
    from vit_fast.train.data import Augmentation, load_datasets

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / split / cls / "ok.png")
    broken = tmp_path / "val" / "dog" / "zz-broken.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    broken.write_bytes(buf.getvalue()[:300])
    (tmp_path / "val" / "cat" / "notes.jpg").write_text("not an image")
    _train, test, _info = load_datasets("imagefolder", tmp_path, 8, Augmentation())
    names = [Path(p).name for p, _ in test.base.samples]
    assert test[names.index("ok.png")][0].shape == (3, 8, 8)
    for name, path in (("notes.jpg", tmp_path / "val" / "cat" / "notes.jpg"), ("zz-broken.jpg", broken)):
        with pytest.raises(ValueError, match=f"^{path}: not a readable image"):
            test[names.index(name)]
