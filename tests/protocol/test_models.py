from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from protocol.models import Catalogue, load_catalogue
from tests.protocol.conftest import MODEL

SOURCE = Path(__file__).parents[2] / "protocol/catalogue/exactly-photo-extreme-contrast.toml"


def test_the_packaged_catalogue(catalogue: Catalogue) -> None:
    assert catalogue.airs == [MODEL]
    model = catalogue.get(MODEL)
    assert model is not None
    assert len(model.sizes) == 15
    assert {s.tier for s in model.sizes} == {"1K", "2K", "4K"}
    assert model.size_of(1264, 848) is not None and model.size_of(848, 848) is None
    assert catalogue.get("nope") is None and len(catalogue) == 1


@pytest.mark.parametrize(
    ("size", "n", "cost"),
    [
        ((1264, 848), 1, 0.195),
        ((1264, 848), 3, 0.585),
        ((2048, 2048), 20, 3.9),
        ((5096, 3392), 1, 0.338),
        ((4096, 4096), 2, 0.676),
    ],
)
def test_price(catalogue: Catalogue, size: tuple[int, int], n: int, cost: float) -> None:
    model = catalogue.get(MODEL)
    assert model is not None
    assert model.price(*size, n) == cost


def test_price_of_an_unknown_size_is_a_bug(catalogue: Catalogue) -> None:
    model = catalogue.get(MODEL)
    assert model is not None
    with pytest.raises(ValueError, match="not a size"):
        model.price(1, 1, 1)


def test_a_model_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(SOURCE.read_text().replace(MODEL, "a:b@c"))
    (tmp_path / "b.toml").write_text(SOURCE.read_text())
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_catalogue(tmp_path).airs == ["a:b@c", MODEL]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (('default_size = "1024x1024"', 'default_size = "1x1"'), "default_size"),
        (("4K = 0.338\n", ""), "no cost for tier"),
        (('task_type = "imageInference"', 'task_type = "video"'), "task_type"),
        (("max_reference_images = 1", "max_reference_images = -1"), "max_reference_images"),
        (("slug =", "colour = 1\nslug ="), "colour"),
    ],
)
def test_bad_catalogue_entries_fail_loudly(
    tmp_path: Path, edit: tuple[str, str], error: str
) -> None:
    (tmp_path / "bad.toml").write_text(SOURCE.read_text().replace(*edit))
    with pytest.raises((msgspec.ValidationError, ValueError), match=error):
        load_catalogue(tmp_path)
