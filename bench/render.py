"""Renderer throughput: one 1264x848 JPG at quality 95, on one core and through the pool.

    python -m bench.render [--images 20] [--json out.json]

Per image on one core (render + encode, in this process), then images/s through the provider's
process pool (one worker per core) with enough jobs in flight to keep it busy. Target: under
80 ms per 1K image on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from gateway.provider.pool import RenderJob, RenderPool, render

PROMPT = (
    "A cinematic high-fashion sports photograph of a lone fencer standing in a narrow concrete "
    "tunnel at night, harsh overhead floodlight, wet pavement, subtle mist"
)


async def pooled(images: int) -> tuple[float, int]:
    pool = RenderPool(max_queue=images)
    try:
        await pool.render(RenderJob(PROMPT, 0, 1264, 848, "JPG", 95))  # start the workers
        started = time.perf_counter()
        jobs = [RenderJob(PROMPT, seed, 1264, 848, "JPG", 95) for seed in range(images)]
        await asyncio.gather(*(pool.render(job) for job in jobs))
        return images / (time.perf_counter() - started), pool.workers
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    render(RenderJob(PROMPT, 0, 1264, 848, "JPG", 95))  # warm up
    times = []
    for seed in range(args.images):
        started = time.perf_counter()
        render(RenderJob(PROMPT, seed, 1264, 848, "JPG", 95))
        times.append((time.perf_counter() - started) * 1000)
    rate, workers = asyncio.run(pooled(args.images * 2))
    figures = {
        "one_core_ms_median": round(statistics.median(times), 1),
        "one_core_ms_p90": round(sorted(times)[int(len(times) * 0.9) - 1], 1),
        "pool_workers": workers,
        "pool_images_per_s": round(rate, 1),
    }
    print("| 1264x848 JPG q95 | figure |")
    print("|---|---|")
    print(f"| one core, median | {figures['one_core_ms_median']} ms |")
    print(f"| one core, p90 | {figures['one_core_ms_p90']} ms |")
    print(f"| pool of {workers} | {figures['pool_images_per_s']} images/s |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
