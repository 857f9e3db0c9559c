"""Protocol codec throughput on one core, side by side with ``json.loads`` in the same run.

    python -m bench.protocol_codec [--seconds 0.5] [--rounds 7] [--json out.json]

Measures, for the model card's first request example (as the SDKs send it, one task in an
array), decode + validate + normalise through :func:`protocol.codec.decode_client_frame`,
against plain ``json.loads`` of the same bytes (which checks nothing); and the encoding of one
image result frame, against ``json.dumps`` of the same dict. Reports the best of several rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.codec import decode_client_frame, encode_data
from protocol.frames import ImageResult, ImageTask
from protocol.models import default_catalogue

EXAMPLES = Path(__file__).parents[1] / "tests/protocol/fixtures/model_card_examples.json"


def rate(fn: Callable[[], object], seconds: float, rounds: int) -> float:
    """Calls per second: the best round, each round running about ``seconds``."""
    best = 0.0
    n = 1
    while True:  # calibrate a batch size that takes about a tenth of a round
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if (elapsed := time.perf_counter() - start) > seconds / 10:
            break
        n *= 2
    batches = max(1, round(seconds / elapsed))
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batches):
            for _ in range(n):
                fn()
        best = max(best, batches * n / (time.perf_counter() - start))
    return best


def run(seconds: float, rounds: int) -> dict[str, Any]:
    example = json.loads(EXAMPLES.read_text())[0]
    frame = json.dumps([example["request"]]).encode()
    catalogue = default_catalogue()
    [checked] = decode_client_frame(frame, catalogue)
    assert isinstance(checked, ImageTask)
    result_dict = example["response"]
    result = ImageResult(**result_dict)

    decode = rate(lambda: decode_client_frame(frame, catalogue), seconds, rounds)
    loads = rate(lambda: json.loads(frame), seconds, rounds)
    encode = rate(lambda: encode_data([result]), seconds, rounds)
    dumps = rate(lambda: json.dumps({"data": [result_dict]}).encode(), seconds, rounds)
    return {
        "frame_bytes": len(frame),
        "decode_validate_normalise_per_s": round(decode),
        "json_loads_per_s": round(loads),
        "decode_ratio_vs_json_loads": round(decode / loads, 2),
        "encode_result_per_s": round(encode),
        "json_dumps_per_s": round(dumps),
        "encode_ratio_vs_json_dumps": round(encode / dumps, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run(args.seconds, args.rounds)
    print(f"model card example 1, {figures['frame_bytes']} bytes, one core, best of {args.rounds}")
    print("| what | per second | ratio |")
    print("|---|---|---|")
    print(
        f"| decode + validate + normalise | {figures['decode_validate_normalise_per_s']:,} | "
        f"{figures['decode_ratio_vs_json_loads']}x json.loads |"
    )
    print(f"| json.loads alone | {figures['json_loads_per_s']:,} | 1.0 |")
    print(
        f"| encode one result frame | {figures['encode_result_per_s']:,} | "
        f"{figures['encode_ratio_vs_json_dumps']}x json.dumps |"
    )
    print(f"| json.dumps of the same dict | {figures['json_dumps_per_s']:,} | 1.0 |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
