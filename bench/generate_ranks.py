"""``probekit generate`` under torchrun: N ranks against one process, side by side in one run.

The same command (real GSM8k items, SmolLM2 fp32 on the CPU, one torch thread per process) runs
once as one process and once as ``torchrun --nproc-per-node N`` (no GPU), into two fresh folders;
the bench prints both wall times (process start to exit, model loading included), their ratio, the
CPU seconds all their processes used (the work done, whatever share of the machine other jobs
leave), and whether the ranks' merged folder holds the one-process files byte for byte (every
``gen-*.parquet``, ``results.parquet``, ``generate.json``). The order of the two runs alternates
over ``--reps`` repetitions, so load from other processes hits both alike.

On a machine with fewer free cores than ranks the ranks share them: the wall ratio then shows
how much of the machine the ranks got more than the speed-up they would have on their own cores.

Example:
    python bench/generate_ranks.py --ranks 2 --demos-from zero_shot,easy,hard --k 2 --n-test 12 \\
        --max-new-tokens 32 --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def cpu_children() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants, torchrun's ranks included
    return use.ru_utime + use.ru_stime


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one command (every process it started)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PROBEKIT_CACHE": os.environ.get("PROBEKIT_CACHE", str(REPO / "cache"))}
    c0, t0 = cpu_children(), time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, cpu_children() - c0
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return seconds, cpu


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.parquet")) + ["generate.json"]
    return names == sorted(p.name for p in b.glob("*.parquet")) + ["generate.json"] and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--demos-from", default="zero_shot,easy,hard")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()

    gen = ["generate", "--dataset", "gsm8k", "--data-dir", str(SHARED), "--demos-from", args.demos_from,
           "--k", str(args.k), "--draws", str(args.draws), "--n-test", str(args.n_test),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--dtype", "float32",
           "--device", "cpu", "--threads", "1", "--no-progress"]
    one_cmd = [sys.executable, "-m", "probekit.cli", *gen]
    ranks_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                 "-m", "probekit.cli", *gen]
    times: dict[str, list[float]] = {"one": [], "ranks": []}
    cpu: dict[str, list[float]] = {"one": [], "ranks": []}
    identical = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rep in range(args.reps):
            order = ["one", "ranks"] if rep % 2 == 0 else ["ranks", "one"]
            for mode in order:
                out = root / f"{mode}-{rep}"
                cmd = (one_cmd if mode == "one" else ranks_cmd) + ["--out", str(out)]
                wall, used = run(cmd, root)
                times[mode].append(wall)
                cpu[mode].append(used)
            identical.append(same_files(root / f"one-{rep}", root / f"ranks-{rep}"))
            print(f"rep {rep}: 1 process {times['one'][-1]:.1f} s wall ({cpu['one'][-1]:.1f} s CPU), {args.ranks} "
                  f"ranks {times['ranks'][-1]:.1f} s wall ({cpu['ranks'][-1]:.1f} s CPU), files identical: "
                  f"{identical[-1]}", flush=True)
    one, ranks = sum(times["one"]), sum(times["ranks"])
    print(f"1 process {one:.1f} s, {args.ranks} ranks {ranks:.1f} s (wall, model loading included): "
          f"{one / ranks:.2f}x; CPU {sum(cpu['one']):.1f} s vs {sum(cpu['ranks']):.1f} s; merged folder equals the "
          f"1-process folder byte for byte: {all(identical)}")


if __name__ == "__main__":
    main()
