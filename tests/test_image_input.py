"""`vit-fast predict` on the odd image files users have: a corpus made here (nothing downloaded) of broken files,
which are skipped and reported, and unusual but valid ones, which are converted correctly; EXIF orientation;
the exit status when something was skipped."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_predict import _save_run

import vit_fast
from vit_fast.cli import main
from vit_fast.predict import EXIT_SKIPPED, Preprocess, UnreadableImageError

NANO = "vit_nano_patch2_8"
RGB8 = Preprocess((8, 8), (0.0,) * 3, (1.0,) * 3, in_chans=3)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def decompression_bomb(path: Path, side: int = 20_000) -> None:
    """A 400-megapixel grayscale PNG of zeros in under 2 MB: over PIL's limit of 2 x 89.5 megapixels."""
    co = zlib.compressobj(1)
    rows = (b"\0" * (side + 1)) * 500  # each row: filter type 0, then its pixels
    idat = b"".join(co.compress(rows) for _ in range(side // 500)) + co.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))


def make_corpus(folder: Path) -> dict[str, np.ndarray | str]:
    """Each file's expected RGB pixels (H, W, 3) as uint8, or the words its skip reason must hold."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected: dict[str, np.ndarray | str] = {}
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["truncated.jpg"] = "truncated"
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = "cannot identify image file"
    (folder / "notes.jpg").write_text("a text file with an image's name\n")
    expected["notes.jpg"] = "cannot identify image file"
    decompression_bomb(folder / "bomb.png")
    expected["bomb.png"] = "decompression bomb"

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 17)  # 16-bit gray: PIL would clip it to 255
    Image.fromarray(deep).save(folder / "deep16.png")
    expected["deep16.png"] = np.repeat(np.rint(deep / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    cmyk = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected["cmyk.tif"] = np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)
    colors = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    index = rng.integers(0, 4, (8, 8), dtype=np.uint8)
    palette = Image.fromarray(index, "P")
    palette.putpalette(colors.flatten().tolist() + [0] * (768 - 12))
    palette.save(folder / "palette.png")
    expected["palette.png"] = colors[index]
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = rgba[..., :3]  # the color channels as they are, as training's loader reads them
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "one.png")
    expected["one.png"] = np.broadcast_to(np.array([10, 200, 30], np.uint8), (8, 8, 3))
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expected["anim.gif"] = np.broadcast_to(np.array([255, 0, 0], np.uint8), (8, 8, 3))
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("corpus") / "images"
    return folder, make_corpus(folder)


def test_each_file_of_the_corpus_is_converted_right_or_refused_with_its_reason(corpus):
    folder, expected = corpus
    for name, want in expected.items():
        if isinstance(want, str):
            with pytest.raises(UnreadableImageError, match=want) as info:
                RGB8.load(str(folder / name))
            assert info.value.path == str(folder / name) and str(info.value).startswith(f"{folder / name}: ")
            continue
        x, note = RGB8.load(str(folder / name))
        got = torch.round(x * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert x.shape == (3, 8, 8) and np.abs(got.astype(int) - want.astype(int)).max() <= 1, name
    assert RGB8.load(str(folder / "anim.gif"))[1] == "first of 3 frames"
    assert RGB8.load(str(folder / "deep16.png"))[1] == "converted grayscale to RGB; 16-bit samples scaled to 8 bits"
    gray = Preprocess((8, 8), (0.0,), (1.0,), in_chans=1)
    x, _ = gray.load(str(folder / "deep16.png"))
    assert np.array_equal(torch.round(x[0] * 255).to(torch.uint8).numpy(), expected["deep16.png"][..., 0])


def test_predict_on_the_corpus_reports_every_skip_and_exits_65_or_0_with_skip_bad(corpus, tmp_path, capsys):
    folder, expected = corpus
    model = vit_fast.create_model(NANO, in_chans=3).eval()
    run = _save_run(tmp_path / "run", model, dataset="cifar10")
    common = [str(run), str(folder), "--workers", "0", "--no-progress", "--top-k", "2"]
    for flags, status in (([], EXIT_SKIPPED), (["--skip-bad"], 0)):
        out = tmp_path / f"p{status}.jsonl"
        rc = main(["predict", *common, "--out", str(out), *flags])
        captured = capsys.readouterr()
        assert rc == status, captured.err
        recs = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
        assert sorted(recs) == sorted(expected)
        for name, want in expected.items():
            if isinstance(want, str):
                assert want in recs[name]["error"] and "top" not in recs[name], recs[name]
                assert f"{name}" in captured.out and "skipped: not a readable image" in captured.out
            else:
                assert len(recs[name]["top"]) == 2 and "error" not in recs[name]
        assert "6 of 10 images predicted; 4 skipped (not readable)" in captured.err
        assert ("exit status 65" in captured.err) == (status == EXIT_SKIPPED)


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)  # 8 wide, 16 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    wide = Preprocess((8, 16), (0.0,) * 3, (1.0,) * 3, in_chans=3)  # H 8, W 16: the displayed shape
    x, note = wide.load(str(tmp_path / "turned.png"))
    assert note is None
    assert torch.equal(torch.round(x * 255).to(torch.uint8).permute(1, 2, 0), torch.from_numpy(np.rot90(pixels, -1)
                                                                                             .copy()))
    plain, _ = wide.load(str(tmp_path / "plain.png"))  # no tag: taken as stored (and so squeezed to 8x16)
    assert not torch.equal(plain, x)

    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    Image.fromarray(np.rot90(pixels, -1).copy()).save(tmp_path / "upright.jpg", quality=100)
    jpeg, _ = wide.load(str(tmp_path / "turned.jpg"))
    upright, _ = wide.load(str(tmp_path / "upright.jpg"))
    assert (jpeg - upright).abs().mean() < 0.03  # the same picture, up to JPEG's blocks


def test_exit_status_when_inputs_are_missing_all_bad_or_fine(tmp_path, capsys):
    run = _save_run(tmp_path / "run", vit_fast.create_model(NANO).eval())
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("L", (8, 8), 100).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    common = ["--workers", "0", "--no-progress"]
    cases = [
        ([str(good)], 0, None),
        ([str(good), str(tmp_path / "missing.png")], EXIT_SKIPPED, "1 input(s) matched no image file"),
        ([str(good), str(tmp_path / "missing.png"), "--skip-bad"], 0, "1 input(s) matched no image file"),
        ([str(bad)], 1, "0 of 1 images predicted"),
        ([str(bad), "--skip-bad"], 1, "0 of 1 images predicted"),  # nothing predicted is never a success
    ]
    for argv, status, message in cases:
        rc = main(["predict", str(run), *argv, *common])
        err = capsys.readouterr().err
        assert rc == status, (argv, err)
        assert message is None and err == "" or message in err, (argv, err)


def test_folders_take_regular_files_only(tmp_path):
    import os

    from vit_fast.predict import find_images

    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a.png")
    os.mkfifo(tmp_path / "imgs" / "pipe.png")  # opening it would block the reader forever
    files, problems = find_images([str(tmp_path / "imgs"), str(tmp_path / "imgs" / "pipe.png")])
    assert files == [str(tmp_path / "imgs" / "a.png")]
    assert problems == [f"{tmp_path / 'imgs' / 'pipe.png'}: not a regular file"]
