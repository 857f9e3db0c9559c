"""Renders docs/examples/: one 1K picture per aspect ratio of the catalogue, from the model
card's prompts. Run: .venv/bin/python docs/make_examples.py"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.provider.pool import RenderJob, render
from protocol.models import default_catalogue

ROOT = Path(__file__).parent
PROMPTS = [
    e["request"]["positivePrompt"]
    for e in json.loads(
        (ROOT.parent / "tests/protocol/fixtures/model_card_examples.json").read_text()
    )
]
PROMPTS.append("A saxophonist under a single spotlight from the left, smoke, gold, wet stage")


def main() -> None:
    model = default_catalogue().get("exactly:photo@extreme-contrast")
    assert model is not None
    for i, size in enumerate(s for s in model.sizes if s.tier == "1K"):
        data = render(RenderJob(PROMPTS[i], 1697510273 + i, size.width, size.height, "JPG", 88))
        name = f"{size.ratio.replace(':', 'x')}-{size.label}.jpg"
        (ROOT / "examples" / name).write_bytes(data)
        print(name, len(data))


if __name__ == "__main__":
    main()
