"""Measure the pipeline against the old one-off script, on full-size checkpoints.

    .venv/bin/python tests/benchmarks/benchmark.py [--runs 5] [--work bench-work]

Needs about 16 GB of free disk under --work and writes tests/benchmarks/results.md.
Every figure is a median of --runs runs (case 2 and 5: of --batch-runs), and the two
sides of each comparison run alternately in the same invocation, so that a noisy
neighbour weighs on both. Files stay in the page cache between runs (24 GB of RAM);
"cold" means no doit state and no intermediates.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OLD_SCRIPT = HERE / "old_script.py"


@dataclass
class Sample:
    seconds: float
    max_rss_mib: float


def measure(command: list[str], cwd: Path) -> Sample:
    """Wall time and peak RSS of one process (its own, not its children's)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return Sample(seconds, usage.ru_maxrss / 1024)


def median(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.seconds for s in samples),
                  statistics.median(s.max_rss_mib for s in samples))


class Project:
    """A doit project folder converting the given checkpoints."""

    def __init__(self, root: Path, sources: list[Path]) -> None:
        self.root = root
        shutil.rmtree(root, ignore_errors=True)
        (root / "configs").mkdir(parents=True)
        shutil.copy(REPO / "dodo.py", root / "dodo.py")
        text = "".join(f'[[checkpoint]]\nsource = "{s}"\nname = "{s.stem}"\n\n' for s in sources)
        (root / "configs" / "bench.toml").write_text(text)

    def make_cold(self) -> None:
        for name in ("build", "converted", "reports", "logs"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for path in self.root.glob(".doit.db*"):
            path.unlink()

    def run(self, *args: str) -> Sample:
        return measure([sys.executable, "-m", "doit", *args], self.root)

    def imports_torch(self) -> bool:
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "doit"],
                                cwd=self.root, capture_output=True, text=True)
        return any(line.rstrip().endswith("| torch") for line in result.stderr.splitlines())


def baseline(work: Path, sources: list[Path]) -> Sample:
    out = work / "baseline-out"
    shutil.rmtree(out, ignore_errors=True)
    return measure([sys.executable, str(OLD_SCRIPT), str(out), *map(str, sources)], work)


def generate(work: Path) -> dict[str, Path]:
    """The checkpoints, each written by a child process.

    NOTE: not in this process: Linux carries a parent's peak RSS into the children it
    forks, so a parent that once held a 2 GB checkpoint would inflate every figure.
    """
    files = {f"large-{seed}": work / "ckpts" / f"large-{seed}.ckpt" for seed in range(4)}
    files["large-0-no-optimizer"] = work / "ckpts" / "large-0-no-optimizer.ckpt"
    for name, path in files.items():
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            seed = name.split("-")[1]
            extra = ["--no-optimizer"] if "no-optimizer" in name else []
            subprocess.run([sys.executable, "-m", "pipeline", "sample", str(path), "--seed",
                            seed, *extra], check=True, cwd=REPO, stderr=subprocess.DEVNULL)
    return files


def case_single(work: Path, files: dict, runs: int) -> dict:
    project = Project(work / "single", [files["large-0"]])
    ours, theirs = [], []
    for _ in range(runs):
        project.make_cold()
        ours.append(project.run())
        theirs.append(baseline(work, [files["large-0"]]))
    return {"ours": ours, "baseline": theirs}


def case_batch(work: Path, files: dict, runs: int) -> dict:
    sources = [files[f"large-{seed}"] for seed in range(4)]
    project = Project(work / "batch", sources)
    ours, theirs = [], []
    for _ in range(runs):
        project.make_cold()
        ours.append(project.run())
        theirs.append(baseline(work, sources))
    return {"ours": ours, "baseline": theirs}


def case_optimizer(work: Path, files: dict, runs: int) -> dict:
    full = Project(work / "with-optimizer", [files["large-0"]])
    bare = Project(work / "without-optimizer", [files["large-0-no-optimizer"]])
    with_states, without = [], []
    for _ in range(runs):
        full.make_cold()
        bare.make_cold()
        with_states.append(full.run())
        without.append(bare.run())
    return {"with": with_states, "without": without}


def case_noop(work: Path, files: dict, runs: int) -> dict:
    """20 configured checkpoints: hard links to the four generated files."""
    links = work / "links"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir()
    sources = []
    for index in range(20):
        link = links / f"run-{index:02d}.ckpt"
        os.link(files[f"large-{index % 4}"], link)
        sources.append(link)
    project = Project(work / "noop", sources)
    project.make_cold()
    first = project.run()
    noop = [project.run() for _ in range(runs)]
    imports_torch = project.imports_torch()
    for link in sources:
        os.utime(link)
    touched = project.run()
    after_touch = [project.run() for _ in range(runs)]
    return {"first": first, "noop": noop, "imports_torch": imports_torch,
            "touched": touched, "after_touch": after_touch}


def case_parallel(work: Path, files: dict, runs: int) -> dict:
    project = Project(work / "parallel", [files[f"large-{seed}"] for seed in range(4)])
    one, two = [], []
    for _ in range(runs):
        project.make_cold()
        one.append(project.run("-n", "1"))
        project.make_cold()
        two.append(project.run("-n", "2"))
    return {"n1": one, "n2": two}


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Linux {platform.release()}; "
            f"Python {platform.python_version()}, torch {metadata.version('torch')}")


def fmt(sample: Sample) -> str:
    return f"{sample.seconds:.2f} s, {sample.max_rss_mib:.0f} MiB"


def verdict(ok: bool, text: str) -> str:
    return ("met" if ok else "MISSED") + f" ({text})"


def report(results: dict, args: argparse.Namespace) -> str:
    single, batch = results["single"], results["batch"]
    s_ours, s_base = median(single["ours"]), median(single["baseline"])
    b_ours, b_base = median(batch["ours"]), median(batch["baseline"])
    wall_ratio = s_ours.seconds / s_base.seconds
    rss_ratio = s_ours.max_rss_mib / s_base.max_rss_mib
    per_ours = (b_ours.seconds - s_ours.seconds) / 3
    per_base = (b_base.seconds - s_base.seconds) / 3
    opt = results["optimizer"]
    o_with, o_without = median(opt["with"]), median(opt["without"])
    opt_diff = abs(o_with.seconds - o_without.seconds) / o_without.seconds
    rss_diff = abs(o_with.max_rss_mib - o_without.max_rss_mib) / o_without.max_rss_mib
    noop = results["noop"]
    n_noop, n_after = median(noop["noop"]), median(noop["after_touch"])
    par = results["parallel"]
    n1, n2 = median(par["n1"]), median(par["n2"])
    speedup = n1.seconds / n2.seconds

    def samples(items: list[Sample]) -> str:
        return ", ".join(f"{s.seconds:.2f}" for s in items)

    lines = [
        "# Benchmark results",
        "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- Command: `{' '.join(['.venv/bin/python', 'tests/benchmarks/benchmark.py'] + sys.argv[1:])}`",
        f"- Runs: {args.runs} for cases 1, 3 and 4; {args.batch_runs} for cases 2 and 5. "
        "Figures are medians; wall time and peak RSS are of the whole process "
        "(`doit` for the pipeline, `tests/benchmarks/old_script.py` for the baseline).",
        "- Checkpoints: full-size synthetic large-320-24k-4096 (1.9 GB each, 248 MiB of "
        "decoder), in the page cache; cold = no doit state, no intermediates.",
        "",
        "| case | pipeline | baseline / other | ratio | target |",
        "|---|---|---|---|---|",
        f"| 1. one checkpoint, cold | {fmt(s_ours)} | {fmt(s_base)} | wall {wall_ratio:.2f}x, "
        f"RSS {rss_ratio:.2f}x | {verdict(wall_ratio <= 0.5, 'wall <= 0.5x')}; "
        f"{verdict(rss_ratio <= 0.25, 'RSS <= 0.25x')} |",
        f"| 2. four checkpoints, one process | {fmt(b_ours)}; {per_ours:.2f} s per extra "
        f"checkpoint | {fmt(b_base)}; {per_base:.2f} s per extra checkpoint | "
        f"{per_ours / per_base:.2f}x | {verdict(per_ours / per_base <= 0.25, 'per checkpoint <= 0.25x')} |",
        f"| 3. with / without optimizer states | {fmt(o_with)} | {fmt(o_without)} | wall "
        f"{opt_diff:.0%} apart, RSS {rss_diff:.0%} apart | "
        f"{verdict(opt_diff <= 0.10, 'within 10%')} |",
        f"| 4. no-op over 20 converted checkpoints | {n_noop.seconds:.2f} s "
        f"(torch imported: {'yes' if noop['imports_torch'] else 'no'}) | after `touch` of all "
        f"20: first run {noop['touched'].seconds:.2f} s (hashes each once), then "
        f"{n_after.seconds:.2f} s | | {verdict(n_noop.seconds < 1 and n_after.seconds < 1 and not noop['imports_torch'], 'under 1 s, no torch')} |",
        f"| 5. four checkpoints, `-n 2` vs `-n 1` | {n2.seconds:.2f} s | {n1.seconds:.2f} s | "
        f"{speedup:.2f}x throughput | {verdict(speedup >= 1.5, '>= 1.5x')} |",
        "",
        "Samples (wall seconds, in run order):",
        "",
        f"- case 1 pipeline: {samples(single['ours'])}; baseline: {samples(single['baseline'])}",
        f"- case 2 pipeline: {samples(batch['ours'])}; baseline: {samples(batch['baseline'])}",
        f"- case 3 with: {samples(opt['with'])}; without: {samples(opt['without'])}",
        f"- case 4 first conversion of the 20: {noop['first'].seconds:.2f}; no-op: "
        f"{samples(noop['noop'])}; after touch: {samples(noop['after_touch'])}",
        f"- case 5 -n 1: {samples(par['n1'])}; -n 2: {samples(par['n2'])}",
        "",
        "Per extra checkpoint (case 2) is (four-checkpoint run - one-checkpoint run) / 3, "
        "both medians from this invocation: the cost once start-up is paid.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--cases", default="single,batch,optimizer,noop,parallel")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = generate(args.work)
    cases = {"single": (case_single, args.runs), "batch": (case_batch, args.batch_runs),
             "optimizer": (case_optimizer, args.runs), "noop": (case_noop, args.runs),
             "parallel": (case_parallel, args.batch_runs)}
    results = {}
    for name in args.cases.split(","):
        function, runs = cases[name]
        print(f"case {name} ...", flush=True)
        results[name] = function(args.work, files, runs)
    if set(results) == set(cases):
        text = report(results, args)
        args.out.write_text(text)
        print(text)
    else:
        for name, value in results.items():
            print(name, {k: (median(v) if isinstance(v, list) else v) for k, v in value.items()})


if __name__ == "__main__":
    main()
