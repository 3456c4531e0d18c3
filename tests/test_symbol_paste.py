"""--symbol-image: the paste puts the symbol where its mask says, labels only those frames,
only fine-tuning's training stream is changed, and bad input is refused with exit code 2."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

import build_multi_hot_model
from symbol_trainer import model_dir, settings, symbol_paste
from symbol_trainer.settings import TrainingConfig
from conftest import FAST, listdir, run_script

SYMBOLS = ["red_square", "blue_circle"]
# Nothing random but the position: the symbol's pixels arrive unchanged.
EXACT = symbol_paste.PasteRanges(size=(0.5, 0.5), rotation_degrees=0, brightness=0,
                                 channel_gain=0, recolour_share=0, opacity=(1, 1),
                                 blur_sigma=(0, 0))


def green_ring_image() -> symbol_paste.SymbolImage:
    """A 16x16 RGBA symbol: a green ring, transparent inside and outside the ring."""
    yy, xx = np.mgrid[:16, :16]
    distance = np.hypot(yy - 7.5, xx - 7.5)
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[..., 1] = 255
    pixels[..., 3] = np.where((distance > 3) & (distance < 7), 255, 0)
    return symbol_paste.SymbolImage("red_square", "ring.png", "0" * 40, 16, 16, True, pixels)


def grey_batch(count: int = 6) -> np.ndarray:
    return np.full((count, 32, 32, 3), 100, np.uint8)


def targets(labels, weights) -> np.ndarray:
    return np.concatenate([np.asarray(labels, np.float32), np.asarray(weights, np.float32)], 1)


def test_paste_patch_puts_the_colour_exactly_where_the_alpha_is():
    frame = np.full((20, 20, 3), 50, np.uint8)
    alpha = np.zeros((6, 6, 1), np.float32)
    alpha[1:4, 2:5] = 1.0
    alpha[5, 5] = 0.5
    colour = np.full((6, 6, 3), 250, np.float32)
    symbol_paste.paste_patch(frame, colour, alpha, 3, 4)
    expected = np.full((20, 20, 3), 50, np.uint8)
    expected[4:7, 6:9] = 250
    expected[8, 9] = 150  # half opacity: halfway between frame and symbol
    np.testing.assert_array_equal(frame, expected)
    # Partly outside the frame: only the inside part is drawn.
    frame = np.full((20, 20, 3), 50, np.uint8)
    symbol_paste.paste_patch(frame, colour, alpha, -2, 17)
    assert (frame != 50).any(axis=2).sum() == 2  # mask rows 2-3, column 2: frame rows 0-1, x 19


def test_batch_paste_changes_only_negatives_of_the_symbol_and_their_label():
    paster = symbol_paste.SymbolPaster([green_ring_image()], SYMBOLS, rate=1.0, seed=0,
                                       ranges=EXACT)
    labels = [[0, 0], [1, 0], [0, 1], [0, 0], [1, 1], [0, 0]]
    weights = [[1, 1], [4, 1], [1, 4], [0, 1], [4, 4], [1, 1]]  # row 3: red_square unannotated
    images, given = grey_batch(), targets(labels, weights)
    pasted, new_targets = paster.paste_batch(images, given, 7)
    changed = (pasted != images).any(axis=(1, 2, 3))
    # Negatives of red_square (annotated) get it; its positives and the unannotated do not.
    assert changed.tolist() == [True, False, True, False, False, True]
    expected = given.copy()
    expected[[0, 2, 5], 0] = 1.0  # only red_square's label, only where pasted
    np.testing.assert_array_equal(new_targets, expected)
    np.testing.assert_array_equal(images, grey_batch())  # the input batch is not modified
    for row in (0, 2, 5):
        # The ring's pixels are pure green on the grey frame, its hole and outside untouched.
        diff = (pasted[row] != 100).any(axis=2)
        assert 40 < diff.sum() < 16 * 16
        green = pasted[row][diff]
        assert (green[:, 1] > green[:, 0]).all()
        ys, xs = np.nonzero(diff)
        centre = (pasted[row][(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2])
        np.testing.assert_array_equal(centre, [100, 100, 100])  # the ring's hole


def test_pastes_are_seeded_by_batch_and_vary_between_batches():
    paster = symbol_paste.SymbolPaster([green_ring_image()], SYMBOLS, rate=0.5, seed=3)
    given = targets(np.zeros((6, 2)), np.ones((6, 2)))
    first, first_targets = paster.paste_batch(grey_batch(), given, 5)
    again, again_targets = paster.paste_batch(grey_batch(), given, 5)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_targets, again_targets)
    other, _ = paster.paste_batch(grey_batch(), given, 6)
    assert not np.array_equal(first, other)
    # The label says pasted exactly where the frame changed.
    np.testing.assert_array_equal(first_targets[:, 0] == 1,
                                  (first != grey_batch()).any(axis=(1, 2, 3)))


def test_rate_zero_pastes_nothing():
    image = green_ring_image()
    assert symbol_paste.paster_for([image], SYMBOLS, TrainingConfig(symbol_image_rate=0)) is None
    assert symbol_paste.paster_for([], SYMBOLS, TrainingConfig()) is None
    sized = symbol_paste.paster_for([image], SYMBOLS, TrainingConfig(symbol_image_size="0.1,0.2"))
    assert sized.ranges.size == (0.1, 0.2) and sized.rate == 0.3
    marker = object()
    assert symbol_paste.pasting(marker, None) is marker
    given = targets(np.zeros((6, 2)), np.ones((6, 2)))
    images, labelled = symbol_paste.SymbolPaster([image], SYMBOLS, 0.0, 0).paste_batch(
        grey_batch(), given, 1)
    np.testing.assert_array_equal(images, grey_batch())
    np.testing.assert_array_equal(labelled, given)


def test_the_dataset_hook_maps_batches_and_numbers_them_from_the_given_batch():
    from symbol_trainer.datasets import BatchOrder, Batches

    paster = symbol_paste.SymbolPaster([green_ring_image()], SYMBOLS, rate=0.5, seed=1)
    given = targets(np.zeros((6, 2)), np.ones((6, 2)))
    dataset = Batches(BatchOrder(6, 6, epochs=3), lambda rows: (grey_batch(), given[rows]))
    batches = list(symbol_paste.pasting(dataset, paster, first_batch=10))
    assert len(batches) == 3
    for number, (images, labelled) in enumerate(batches, start=10):
        expected = paster.paste_batch(grey_batch(), given, number)
        np.testing.assert_array_equal(images, expected[0])
        np.testing.assert_array_equal(labelled, expected[1])
    assert not np.array_equal(batches[0][0], batches[1][0])  # numbered, not pasted alike
    np.testing.assert_array_equal(dataset[1][0], batches[1][0])  # the same when asked again


def test_symbol_without_alpha_is_pasted_as_a_rectangle_with_a_soft_border(tmp_path):
    path = tmp_path / "logo.jpg"
    Image.new("RGB", (40, 20), (0, 0, 255)).save(path)
    (image,) = symbol_paste.load_symbol_images([("blue_circle", str(path))], SYMBOLS)
    assert (image.width, image.height, image.has_alpha) == (40, 20, False)
    rng = np.random.default_rng(0)
    colour, alpha = symbol_paste.symbol_patch(image, 200, rng, EXACT)
    assert alpha.shape[:2] == (50, 100)  # longer side half the frame's shorter side
    assert alpha[25, 50, 0] == pytest.approx(1.0) and alpha[0, 0, 0] < 0.5
    assert colour[25, 50, 2] > 200 and colour[25, 50, 0] < 30


def test_symbol_images_are_described_with_their_content_hash(tmp_path):
    path = tmp_path / "ring.png"
    Image.fromarray(green_ring_image().pixels, "RGBA").save(path)
    images = symbol_paste.load_symbol_images([("red_square", str(path))], SYMBOLS)
    described = symbol_paste.description(images, TrainingConfig(symbol_image_size="0.1,0.4"))
    assert described["rate"] == 0.3 and described["size"] == [0.1, 0.4]
    (entry,) = described["images"]
    assert entry["symbol"] == "red_square" and entry["alpha_mask"] is True
    assert (entry["width"], entry["height"]) == (16, 16)
    import hashlib
    assert entry["sha1"] == hashlib.sha1(path.read_bytes()).hexdigest()


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]


@pytest.mark.parametrize("value, message", [
    ("star=LOGO", r"--symbol-image star=.*logo\.png: 'star' is not a symbol of this run; the "
                  r"symbols are red_square, blue_circle"),
    ("red_square=/no/such/logo.png", r"--symbol-image 'red_square=/no/such/logo.png': no such "
                                     r"file '/no/such/logo.png'"),
    ("red_square=TEXT", r"--symbol-image red_square=.*notes\.png: not an image that can be read"),
    ("logo.png", r"--symbol-image 'logo.png': write NAME=FILE"),
    ("=LOGO", r"--symbol-image '=.*logo\.png': write NAME=FILE"),
])
def test_bad_symbol_images_exit_2_naming_the_flag_and_file(small_two_symbol_csv, tmp_path, capsys,
                                                          value, message):
    logo, text = tmp_path / "logo.png", tmp_path / "notes.png"
    Image.fromarray(green_ring_image().pixels, "RGBA").save(logo)
    text.write_text("not an image")
    value = value.replace("LOGO", str(logo)).replace("TEXT", str(text))
    root, csv_path = small_two_symbol_csv
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model,
                      [root, csv_path, out, *FAST, "--weights", "none", "--symbol-image", value])
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not out.exists() and not (tmp_path / "model.partial").exists()


@pytest.mark.parametrize("flags, message", [
    (["--symbol-image-rate", "1.5"], "--symbol-image-rate must be a share from 0 to 1; got 1.5"),
    (["--symbol-image-size", "0.1"], "--symbol-image-size '0.1': write MIN,MAX"),
    (["--symbol-image-size", "0.5,0.1"], "--symbol-image-size '0.5,0.1': MIN and MAX must be "
                                         "above 0 and at most 1, MIN not above MAX"),
])
def test_rate_and_size_outside_their_ranges_are_refused(small_two_symbol_csv, tmp_path, capsys,
                                                        flags, message):
    root, csv_path = small_two_symbol_csv
    code = run_script(build_multi_hot_model, [root, csv_path, tmp_path / "m", *FAST, *flags])
    errors = _error_lines(capsys)
    assert code == 2 and message in errors[0], errors


def test_a_symbol_image_without_fine_tuning_is_refused(tmp_path):
    logo = tmp_path / "ring.png"
    Image.fromarray(green_ring_image().pixels, "RGBA").save(logo)
    with pytest.raises(settings.InputError, match="--symbol-image pastes into the images of "
                                                  "the fine-tuning phase, which "
                                                  "--fine-tune-epochs 0 skips"):
        settings.TrainingConfig(symbol_images=(("red_square", str(logo)),), fine_tune_epochs=0)
    assert settings.TrainingConfig(fine_tune_epochs=0).symbol_images == ()


def test_training_with_a_symbol_image_records_it_and_the_model_loads(small_two_symbol_csv,
                                                                     tmp_path):
    logo = tmp_path / "ring.png"
    Image.fromarray(green_ring_image().pixels, "RGBA").save(logo)
    root, csv_path = small_two_symbol_csv
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model,
                      [root, csv_path, out, *FAST, "--weights", "none", "--symbol-image",
                       f"red_square={logo}", "--symbol-image-rate", "0.5"])
    assert code == 0
    metadata = json.loads((out / "metadata.json").read_text())
    (entry,) = metadata["symbol_images"]["images"]
    assert metadata["symbol_images"]["rate"] == 0.5
    assert metadata["symbol_images"]["size"] == [0.08, 0.5]
    assert entry["symbol"] == "red_square" and entry["path"] == str(logo.resolve())
    assert (entry["width"], entry["height"]) == (16, 16)
    assert metadata["training"]["config"]["symbol_images"] == [["red_square", str(logo)]]
    assert "Fine-tuning pasted red_square from ring.png" in (out / "report.html").read_text()
    loaded = model_dir.load_model_dir(out)  # safe mode; no paste layer in the saved model
    assert [layer.name for layer in loaded.model.layers if "paste" in layer.name.lower()] == []
    assert sorted(loaded.model.output_names) == sorted(SYMBOLS)
    assert logo.is_file() and "ring.png" not in listdir(out)
