"""User images of any kind become (batch, 3, H, W) in [0, 1]; bad files get one clear line."""

import numpy as np
import pytest
import torch
from PIL import Image

from melfusion import images as img
from melfusion.cli import main


def test_exif_rotation_is_applied(tmp_path):
    # a 40x20 (wide) picture whose EXIF says "rotate 90": it is shown, and must be used, 20x40 (tall)
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    x = img.load_images(str(path))
    assert x.shape == (1, 3, 40, 20)
    top, bottom = x[0, :, :15].mean(dim=(1, 2)), x[0, :, -15:].mean(dim=(1, 2))
    assert top[2] > 0.8 and bottom[0] > 0.8  # blue (was left) is now on top


def test_sixteen_bit_grayscale_uses_the_full_range(tmp_path):
    arr = np.linspace(0, 65535, 32 * 16, dtype=np.uint16).reshape(16, 32)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    x = img.load_images(str(path))
    assert x.shape == (1, 3, 16, 32)
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])


def test_transparent_palette_image_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0)).convert("P")
    path = tmp_path / "clear.png"
    im.save(path, transparency=0)
    x = img.load_images(str(path))
    assert x.shape == (1, 3, 8, 8) and torch.allclose(x, torch.ones_like(x))


def test_grayscale_tensor_and_list_of_sizes():
    gray = torch.rand(1, 10, 12)
    x = img.load_images(gray)
    assert x.shape == (1, 3, 10, 12) and torch.equal(x[0, 0], x[0, 2])
    batch = img.load_images([torch.rand(3, 10, 12), Image.new("L", (30, 20), 128)])
    assert batch.shape == (2, 3, 10, 12)


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(img, "MAX_PIXELS", 32 * 32)
    with pytest.raises(ValueError, match=r"image: .*big.png.* is 64x64, over the 1024 pixel limit"):
        img.load_images(str(path))


def test_cli_empty_image_file_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert main(["generate", "--image", str(empty), "--text", "x", "--out", str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image" in err and "empty.png" in err and "is empty" in err
    assert not (tmp_path / "o.wav").exists()
