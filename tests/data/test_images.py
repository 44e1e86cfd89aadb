import numpy as np
import pytest
from PIL import Image

from fulora.data.images import image_info, load_image, resize_image
from fulora.errors import ImageLoadError


@pytest.mark.parametrize("src_mode", ["L", "RGB", "RGBA", "LA", "P", "I;16", "1", "CMYK"])
@pytest.mark.parametrize("out_mode", ["L", "RGB"])
def test_every_mode_loads(tmp_path, make_png, src_mode, out_mode):
    ext = ".jpg" if src_mode == "CMYK" else ".png"
    path = make_png(tmp_path / f"img{ext}", src_mode)
    img = load_image(path, out_mode)
    assert img.mode == out_mode and img.size == (64, 48)


def test_palette_with_transparency_composites_on_black(tmp_path):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.info["transparency"] = 1
    img.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_image(tmp_path / "p.png")).max() == 0


def test_16_bit_is_scaled_by_type_range(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = np.asarray(load_image(tmp_path / "x.png"))
    assert out.max() == 255 and out.min() == 0


def test_jpeg_loads_as_grayscale(tmp_path, make_png):
    path = make_png(tmp_path / "x.jpg", "RGB")
    assert load_image(path).mode == "L"


def test_truncated_png_names_the_file(tmp_path, make_png):
    path = make_png(tmp_path / "cut.png", "L", size=(256, 256))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_info(path) == ((256, 256), "L")  # the header alone looks fine
    with pytest.raises(ImageLoadError) as err:
        load_image(path, row=7)
    assert "cut.png" in str(err.value) and "row 7" in str(err.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"not an image at all", "not an image file"), (None, "does not exist")],
)
def test_bad_files(tmp_path, content, reason):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("method", ["stretch", "letterbox", "crop"])
def test_resize_methods(method):
    img = Image.fromarray(np.full((100, 150), 200, dtype=np.uint8), "L")
    out = resize_image(img, (64, 64), method)
    assert out.size == (64, 64)
    arr = np.asarray(out)
    if method == "letterbox":
        assert arr[0, 32] == 0 and arr[32, 32] == 200  # padded top, image in the middle
    else:
        assert arr.min() > 150
