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
import re
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
    hash_wait: float = 0.0  # seconds load stages spent waiting for the source's sha256


def measure(command: list[str], cwd: Path) -> Sample:
    """Wall time and peak RSS of one process (its own, not its children's)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return Sample(seconds, usage.ru_maxrss / 1024)


def median(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.seconds for s in samples),
        statistics.median(s.max_rss_mib for s in samples),
        statistics.median(s.hash_wait for s in samples),
    )


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
        sample = measure([sys.executable, "-m", "doit", *args], self.root)
        log = self.root / "logs" / "pipeline.log"
        waits = re.findall(r"waited ([0-9.]+) s for the source's sha256", log.read_text())
        sample.hash_wait = sum(map(float, waits))
        self.make_logs_fresh()
        return sample

    def make_logs_fresh(self) -> None:
        shutil.rmtree(self.root / "logs", ignore_errors=True)

    def imports_torch(self) -> bool:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "doit"],
            cwd=self.root,
            capture_output=True,
            text=True,
        )
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
            subprocess.run(
                [sys.executable, "-m", "pipeline", "sample", str(path), "--seed", seed, *extra],
                check=True,
                cwd=REPO,
                stderr=subprocess.DEVNULL,
            )
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
    return {
        "first": first,
        "noop": noop,
        "imports_torch": imports_torch,
        "touched": touched,
        "after_touch": after_touch,
    }


def case_parallel(work: Path, files: dict, runs: int) -> dict:
    project = Project(work / "parallel", [files[f"large-{seed}"] for seed in range(4)])
    one, two = [], []
    for _ in range(runs):
        project.make_cold()
        one.append(project.run("-n", "1"))
        project.make_cold()
        two.append(project.run("-n", "2"))
    return {"n1": one, "n2": two}


def case_hash(work: Path, files: dict, runs: int) -> dict:
    """The sha256 of one checkpoint alone, as the load stage computes it."""
    from pipeline.hashing import HASH_PROGRAM

    command = [sys.executable, "-I", "-S", "-c", HASH_PROGRAM]
    return {
        "with": [measure(command + [str(files["large-0"])], work) for _ in range(runs)],
        "without": [
            measure(command + [str(files["large-0-no-optimizer"])], work) for _ in range(runs)
        ],
    }


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Linux {platform.release()}; "
        f"Python {platform.python_version()}, torch {metadata.version('torch')}"
    )


def verdict(ok: bool, target: str) -> str:
    return f"{target}: {'met' if ok else 'MISSED'}"


def report(results: dict, args: argparse.Namespace) -> str:
    """results.md: the figures, each target's verdict, and the samples behind them."""
    single, batch, opt = results["single"], results["batch"], results["optimizer"]
    noop, par, sha = results["noop"], results["parallel"], results["hash"]
    s_ours, s_base = median(single["ours"]), median(single["baseline"])
    b_ours, b_base = median(batch["ours"]), median(batch["baseline"])
    o_with, o_without = median(opt["with"]), median(opt["without"])
    n_noop, n_after = median(noop["noop"]), median(noop["after_touch"])
    n1, n2 = median(par["n1"]), median(par["n2"])
    h_with, h_without = median(sha["with"]), median(sha["without"])

    wall = s_ours.seconds / s_base.seconds
    wall_unhashed = (s_ours.seconds - s_ours.hash_wait) / s_base.seconds
    rss = s_ours.max_rss_mib / s_base.max_rss_mib
    per_ours = (b_ours.seconds - s_ours.seconds) / 3
    per_base = (b_base.seconds - s_base.seconds) / 3
    per_unhashed = (b_ours.seconds - b_ours.hash_wait - s_ours.seconds + s_ours.hash_wait) / 3
    apart = abs(o_with.seconds - o_without.seconds) / o_without.seconds
    apart_unhashed = abs(
        (o_with.seconds - o_with.hash_wait) - (o_without.seconds - o_without.hash_wait)
    ) / (o_without.seconds - o_without.hash_wait)
    rss_apart = abs(o_with.max_rss_mib - o_without.max_rss_mib) / o_without.max_rss_mib
    speedup = n1.seconds / n2.seconds
    noop_ok = n_noop.seconds < 1 and n_after.seconds < 1 and not noop["imports_torch"]

    def row(*cells: str) -> str:
        return "| " + " | ".join(cells) + " |"

    def seconds(items: list[Sample]) -> str:
        return ", ".join(f"{item.seconds:.2f}" for item in items)

    command = " ".join([".venv/bin/python tests/benchmarks/benchmark.py", *sys.argv[1:]])
    lines = [
        "# Benchmark results",
        "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- Command: `{command}`",
        f"- Runs: {args.runs} for cases 1, 3 and 4; {args.batch_runs} for cases 2 and 5, the "
        "two sides alternating. Figures are medians. Wall time and peak RSS are of the whole "
        "process: `doit` for the pipeline, `tests/benchmarks/old_script.py` (the old "
        "script's load, select, rename and save_file) for the baseline.",
        "- Checkpoints: full-size synthetic large-320-24k-4096, 1.9 GB each (0.8 GB without "
        "optimizer states), 248 MiB of decoder; in the page cache. Cold: no doit state, no "
        "intermediates.",
        f"- The sha256 that outputs record, alone: {h_with.seconds:.2f} s for 1.9 GB, "
        f'{h_without.seconds:.2f} s for 0.8 GB. "waiting" below is the time load stages '
        "spent waiting for it after their own work was done (from logs/pipeline.log).",
        "",
        row("case", "pipeline", "baseline or other side", "result", "target"),
        row(*["---"] * 5),
        row(
            "1. one checkpoint, cold",
            f"{s_ours.seconds:.2f} s ({s_ours.hash_wait:.2f} s waiting), "
            f"{s_ours.max_rss_mib:.0f} MiB",
            f"{s_base.seconds:.2f} s, {s_base.max_rss_mib:.0f} MiB",
            f"wall {wall:.2f}x ({wall_unhashed:.2f}x without waiting), RSS {rss:.2f}x",
            f"{verdict(wall <= 0.5, 'wall <= 0.5x')}; {verdict(rss <= 0.25, 'RSS <= 0.25x')}",
        ),
        row(
            "2. four checkpoints in one run",
            f"{b_ours.seconds:.2f} s ({b_ours.hash_wait:.2f} s waiting): {per_ours:.2f} s per "
            f"extra checkpoint ({per_unhashed:.2f} s without waiting)",
            f"{b_base.seconds:.2f} s: {per_base:.2f} s per extra checkpoint",
            f"{per_ours / per_base:.2f}x ({per_unhashed / per_base:.2f}x without waiting)",
            verdict(per_ours / per_base <= 0.25, "<= 0.25x"),
        ),
        row(
            "3. with / without optimizer states",
            f"{o_with.seconds:.2f} s ({o_with.hash_wait:.2f} s waiting), "
            f"{o_with.max_rss_mib:.0f} MiB",
            f"{o_without.seconds:.2f} s ({o_without.hash_wait:.2f} s waiting), "
            f"{o_without.max_rss_mib:.0f} MiB",
            f"wall {apart:.0%} apart ({apart_unhashed:.0%} without waiting), RSS "
            f"{rss_apart:.0%} apart",
            verdict(apart <= 0.10, "within 10%"),
        ),
        row(
            "4. no-op over 20 converted checkpoints",
            f"{n_noop.seconds:.2f} s; torch imported: {'yes' if noop['imports_torch'] else 'no'}",
            f"after `touch` of all 20: {noop['touched'].seconds:.2f} s once (each hashed "
            f"once), then {n_after.seconds:.2f} s",
            "",
            verdict(noop_ok, "under 1 s, no torch, no re-hash"),
        ),
        row(
            "5. four checkpoints, `-n 2` against `-n 1`",
            f"{n2.seconds:.2f} s",
            f"{n1.seconds:.2f} s",
            f"{speedup:.2f}x throughput",
            verdict(speedup >= 1.5, ">= 1.5x"),
        ),
        "",
        "Per extra checkpoint (case 2) is (four-checkpoint run - one-checkpoint run) / 3, both "
        "medians of this invocation: the cost once start-up is paid.",
        "",
        "Why a target is missed, and by how much the sha256 alone accounts for: see README.md "
        "beside this file.",
        "",
        "Samples (wall seconds, in run order):",
        "",
        f"- case 1: pipeline {seconds(single['ours'])}; baseline {seconds(single['baseline'])}",
        f"- case 2: pipeline {seconds(batch['ours'])}; baseline {seconds(batch['baseline'])}",
        f"- case 3: with {seconds(opt['with'])}; without {seconds(opt['without'])}",
        f"- case 4: first conversion of the 20 {noop['first'].seconds:.2f}; no-op "
        f"{seconds(noop['noop'])}; after touch {seconds(noop['after_touch'])}",
        f"- case 5: -n 1 {seconds(par['n1'])}; -n 2 {seconds(par['n2'])}",
        f"- sha256 alone: 1.9 GB {seconds(sha['with'])}; 0.8 GB {seconds(sha['without'])}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--cases", default="hash,single,batch,optimizer,noop,parallel")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = generate(args.work)
    cases = {
        "hash": (case_hash, args.runs),
        "single": (case_single, args.runs),
        "batch": (case_batch, args.batch_runs),
        "optimizer": (case_optimizer, args.runs),
        "noop": (case_noop, args.runs),
        "parallel": (case_parallel, args.batch_runs),
    }
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
