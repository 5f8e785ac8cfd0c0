"""Steady images/s of finished inference.py folder runs, against the model alone.

    python benchmarks/folder_rate.py <output_dir> [<output_dir> ...] [--model-only results.json]

A run's wall time includes its start-up (imports, the device, the backend trial or its cache, the model's
first calls), which on an accelerator can outlast the images themselves; so a whole-process time says
little about how many processes per GPU keep it busy. Each image's STAC item is the last file its finishing
writes, so the items' modification times are when images were done. With k processes (ranks in run.json),
the rate counts the images done after the k-th one, over the time since it: each process's first image,
which carries its warm-up, is left out.

`--model-only`: bench_inference.py's results.json (section 2, on the same tiles, width and TTA): the images/s
that the model alone allows in one process; each folder's rate is printed as a share of it (target >= 90 %).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import run_folder


def finish_times(run_dir: Path) -> tuple[list[float], int]:
    """When each done image of a run folder was finished (sorted, seconds) and how many ranks ran it."""
    images = run_folder.read_run(run_dir).get("images", {})
    done = {stem: r for stem, r in images.items() if r.get("status") == "done"}
    ranks = {rank for r in done.values() for rank in r.get("ranks", {"0": 0})}
    times = sorted(run_folder.stac_item_path(run_dir, stem).stat().st_mtime for stem in done)
    return times, max(1, len(ranks))


def steady_rate(times: list[float], processes: int) -> float | None:
    """Images/s after each of `processes` processes has done one image; None with too few images."""
    k = processes
    if len(times) < k + 2 or times[-1] <= times[k - 1]:
        return None
    return (len(times) - k) / (times[-1] - times[k - 1])


def _count(n: int, noun: str, plural: str) -> str:
    return f"{n} {noun if n == 1 else plural}"


def model_only_images_s(results: Path) -> float | None:
    """Images/s of the model alone, from bench_inference.py's section 2 (its last pair); None, said in a
    line, where the file has none (section 2 skipped or failed): the rates are still printed."""
    try:
        return float(json.loads(results.read_text())["pipeline_vs_model"][-1]["model_only_images_s"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        print(f"{results}: no model-only images/s (bench_inference.py section 2) in it")
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="inference.py output folders")
    ap.add_argument("--model-only", type=Path, help="bench_inference.py's results.json with section 2")
    args = ap.parse_args(argv)
    model = model_only_images_s(args.model_only) if args.model_only else None
    if model:
        print(f"model alone: {model:.2f} images/s ({args.model_only})")
    for run in args.runs:
        try:
            times, ranks = finish_times(run)
        except OSError as e:
            print(f"{e.filename}: missing, so {run} cannot be timed")
            continue
        rate = steady_rate(times, ranks)
        if not times:
            print(f"{run}: no finished images in its run.json")
        elif rate is None:
            print(f"{run}: {_count(len(times), 'image', 'images')} on {_count(ranks, 'process', 'processes')}: "
                  "too few to time after the warm-up")
        else:
            share = f", {100 * rate / model:5.1f} % of the model alone" if model else ""
            print(f"{run}: {_count(ranks, 'process', 'processes')}, {len(times)} images, steady {rate:.2f} "
                  f"images/s{share}")


if __name__ == "__main__":
    main()
