"""Time one command at two commits, interleaved and repeated: is there a regression?

    .venv/bin/python benchmarks/compare_commits.py --base 585be96 --repeat 3 \\
        -- -m assy.cli eval $PWD/work/pool --model smollm2-135m --task perplexity \\
           --text $PWD/work/heldout.txt --max-tokens 1024 --json

Each commit is checked out once into a temporary git worktree; the command (arguments for
this venv's Python; give paths absolute) runs in a fresh process from that worktree (its
code first on ``sys.path``; the run checks which code it imported), alternating base / head ``--repeat`` times. Wall seconds and peak RSS (``ru_maxrss`` of the
child) are reported per run, with medians and the head / base ratio. The machines are
shared: read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worktree(rev: str, where: Path) -> Path:
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import assy, blockpool; print(assy.__file__, blockpool.__file__)"],
        cwd=path,
        env={**os.environ, "PYTHONPATH": str(path)},
        capture_output=True,
        text=True,
        check=True,
    )
    if not all(Path(f).resolve().is_relative_to(path.resolve()) for f in probe.stdout.split()):
        raise SystemExit(f"{rev}: imports code from outside its worktree: {probe.stdout}")
    return path


def _run(tree: Path, args: list[str]) -> dict:
    """One fresh process: wall seconds, its own peak RSS (wait4), its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        # cwd = the worktree: ``python -m`` puts the cwd first on sys.path
        proc = subprocess.Popen([sys.executable, *args], cwd=tree, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{stderr[-2000:]}")
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "output": last[:500]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then python arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with tempfile.TemporaryDirectory(prefix="assy-commits-") as tmp:
        trees = {"base": _worktree(args.base, Path(tmp)), "head": _worktree(args.head, Path(tmp))}
        try:
            runs: dict[str, list[dict]] = {"base": [], "head": []}
            for i in range(args.repeat):
                for label in ("base", "head") if i % 2 == 0 else ("head", "base"):
                    runs[label].append(_run(trees[label], command))
                    print(label, json.dumps(runs[label][-1]), file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    capture_output=True,
                )
    median = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    rss = {k: statistics.median(r["peak_rss_bytes"] for r in v) for k, v in runs.items()}
    result = {
        "command": command,
        "base": args.base,
        "head": args.head,
        "repeat": args.repeat,
        "loadavg": os.getloadavg(),
        "median_seconds": median,
        "ratio_head_to_base": median["head"] / median["base"],
        "median_peak_rss_bytes": rss,
        "runs": runs,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(
        f"median base {median['base']:.2f} s, head {median['head']:.2f} s, "
        f"ratio {result['ratio_head_to_base']:.3f}; peak RSS base {rss['base'] / 1e6:.0f} MB, "
        f"head {rss['head'] / 1e6:.0f} MB ({args.repeat} interleaved runs each)"
    )


if __name__ == "__main__":
    main()
