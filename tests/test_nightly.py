"""Unattended runs: reports, exit status, logs, one run at a time, kills and touches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline import synthetic
from pipeline.cli import convert
from pipeline.report import write_reports
from tests.conftest import REPO

STAGES = ["load", "flatten", "transform", "save_safetensors", "write_index", "write_config"]
THREE = "".join(f'[[checkpoint]]\nsource = "../ckpts/{n}.ckpt"\n\n' for n in ("a", "b", "c"))


def three_with_one_truncated(project) -> Path:
    project.checkpoint("a.ckpt", seed=1)
    broken = project.checkpoint("b.ckpt", seed=2)
    broken.write_bytes(broken.read_bytes()[:500_000])
    project.checkpoint("c.ckpt", seed=3)
    project.config(THREE)
    return broken


def test_batch_with_a_broken_checkpoint_converts_the_rest_and_reports(project):
    broken = three_with_one_truncated(project)
    result = project.doit()
    assert result.returncode == 2, result.stderr  # doit: a failure made later stages skip

    reason = (
        f"load: {broken}: is truncated or damaged (File is not a zip file); the download "
        "or copy probably stopped early; fetch it again"
    )
    report = project.report()
    assert report["status"] == "failed"
    assert [(row["name"], row["status"], row["reason"]) for row in report["checkpoints"]] == [
        ("a", "converted", None),
        ("b", "failed", reason),
        ("c", "converted", None),
    ]
    stages_b = report["checkpoints"][1]["stages"]
    assert {stage: record["status"] for stage, record in stages_b.items()} == {
        "load": "failed",
        "flatten": "skipped",
        "transform": "skipped",
        "save_safetensors": "skipped",
        "write_index": "skipped",
        "write_config": "skipped",
    }
    stages_a = report["checkpoints"][0]["stages"]
    assert all(stages_a[stage]["seconds"] >= 0 for stage in STAGES)
    assert stages_a["load"]["input_bytes"] == (project.root / "ckpts" / "a.ckpt").stat().st_size
    assert stages_a["save_safetensors"]["output_bytes"] == sum(
        path.stat().st_size
        for path in (
            project.output("a") / "model.safetensors",
            project.output("a") / "provenance.json",
            project.root / "build" / "a" / "saved.json",
        )
    )
    assert {
        key: report["totals"][key]
        for key in ("checkpoints", "converted", "up to date", "failed", "skipped")
    } == {"checkpoints": 3, "converted": 2, "up to date": 0, "failed": 1, "skipped": 0}

    summary = [
        line for line in result.stderr.splitlines() if "FAILED" in line or "run failed" in line
    ]
    assert len(summary) == 2
    assert "run failed in" in summary[0] and "2 converted, 0 up to date, 1 failed" in summary[0]
    assert summary[1].endswith(f"b run: FAILED: {reason}")
    markdown = (project.root / "reports" / "latest.md").read_text()
    assert "| b | failed | load: " in markdown
    assert len(list((project.root / "reports").glob("run-*.json"))) == 1


def test_exit_status_is_zero_when_everything_is_converted_or_up_to_date(project):
    project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    assert project.doit().returncode == 0
    assert project.report()["checkpoints"][0]["status"] == "up to date"


def test_reports_keep_the_last_thirty_runs(tmp_path):
    report = {
        "totals": {
            k: 0
            for k in ("checkpoints", "converted", "up to date", "failed", "skipped", "interrupted")
        },
        "started": "x",
        "status": "ok",
        "seconds": 0.0,
        "converter": "c",
        "errors": [],
        "checkpoints": [],
    }
    for second in range(32):
        write_reports(tmp_path, report, datetime(2026, 12, 3, 2, 0, second, tzinfo=timezone.utc))
    dated = sorted(path.name for path in tmp_path.glob("run-*.json"))
    assert len(dated) == 30 and dated[0] == "run-20261203T020002.000000Z.json"
    assert len(list(tmp_path.glob("run-*.md"))) == 30
    assert json.loads((tmp_path / "latest.json").read_text()) == report


def test_every_log_line_names_checkpoint_and_stage(project):
    three_with_one_truncated(project)
    project.doit()
    lines = (project.root / "logs" / "pipeline.log").read_text().splitlines()
    pattern = re.compile(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \d+ (DEBUG|INFO|WARNING|ERROR) +"
        r"(?P<checkpoint>\S+) (?P<stage>\S+): \S"
    )
    records = [line for line in lines if not line.startswith((" ", "Traceback"))]
    entries = [pattern.match(line) for line in records]
    assert entries and all(entries), [line for line in records if not pattern.match(line)][:3]
    stages = {(m["checkpoint"], m["stage"]) for m in entries}
    assert {("a", stage) for stage in STAGES} <= stages
    assert ("b", "load") in stages and ("-", "run") in stages
    assert any(" DEBUG " in line for line in lines)


def test_no_print_in_pipeline_code():
    offenders = [
        f"{path.name}:{n}"
        for path in sorted((REPO / "pipeline").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*print\(", line)
    ]
    assert offenders == []


def test_touched_checkpoint_is_hashed_once_and_not_reconverted(project):
    source = project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    log = project.root / "logs" / "pipeline.log"
    hashed = lambda: log.read_text().count(f"hashed {source} ")  # noqa: E731
    assert hashed() == 1
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    for run in range(2):
        result = project.doit()
        assert result.returncode == 0, result.stderr
        assert project.ran() == {"a": []}
        assert hashed() == 2, f"run {run}"


def test_touched_checkpoint_still_converts_when_settings_change(project):
    source = project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nbandwidth_id = 2\n')
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert project.ran() == {"a": ["transform", "save_safetensors", "write_config"]}


def test_changed_checkpoint_is_reconverted(project):
    """New weights under the same names: the plan stays, the tensors change."""
    source = project.checkpoint("a.ckpt", seed=1)
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    before = (project.output("a") / "model.safetensors").read_bytes()
    synthetic.write_tiny(source, seed=2)
    assert project.doit().returncode == 0
    assert project.ran() == {
        "a": ["load", "flatten", "save_safetensors", "write_index", "write_config"]
    }
    assert (project.output("a") / "model.safetensors").read_bytes() != before


def test_lightning_names_are_selectable(project):
    project.checkpoint("epoch=14-step=3000.ckpt")
    project.checkpoint("last.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/*.ckpt"\n')
    listed = project.doit("list", "--all").stdout.split()
    assert "write_config:epoch_14-step_3000" in listed and "write_config:last" in listed
    result = project.doit("write_config:epoch_14-step_3000")
    assert result.returncode == 0, result.stderr
    assert project.ran() == {
        "epoch_14-step_3000": ["load", "flatten", "transform", "save_safetensors", "write_config"]
    }


def test_dry_run_says_what_would_run_and_why_and_runs_nothing(project):
    project.checkpoint("a.ckpt", seed=1)
    project.checkpoint("b.ckpt", seed=2)
    project.config(
        '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n\n[[checkpoint]]\nsource = "../ckpts/b.ckpt"\n'
    )
    assert project.doit().returncode == 0
    project.config(
        '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nbandwidth_id = 1\n\n'
        '[[checkpoint]]\nsource = "../ckpts/b.ckpt"\n'
    )
    (project.output("b") / "index.json").unlink()
    before, state = project.snapshot(), (project.root / ".doit.db").read_bytes()

    result = project.doit("dry-run")

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "a: 4 stage(s) may run\n"
        "  load              up to date\n"
        "  flatten           up to date\n"
        "  transform         runs: its settings or code changed\n"
        "  save_safetensors  runs: its settings or code changed\n"
        "  write_index       waits on save_safetensors:a: runs if its output changes\n"
        "  write_config      waits on save_safetensors:a, transform:a: runs if its output changes\n"
        "b: 1 stage(s) may run\n"
        "  load              up to date\n"
        "  flatten           up to date\n"
        "  transform         up to date\n"
        "  save_safetensors  up to date\n"
        f"  write_index       runs: output missing: {project.output('b') / 'index.json'}\n"
        "  write_config      up to date\n"
    )
    assert project.snapshot() == before
    assert (project.root / ".doit.db").read_bytes() == state


def errors(messages: list[tuple[str, str]]) -> list[str]:
    return [message for level, message in messages if level == "ERROR"]


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def stalled(project, marker: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "stalled_doit.py"), str(marker), *args],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stalled_in_save(project, tmp_path) -> subprocess.Popen:
    """A one-checkpoint run, started and now waiting inside save_safetensors."""
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    marker = tmp_path / "stalled"
    process = stalled(project, marker)
    wait_for(marker, process)
    return process


def stopped_in_save(project, tmp_path, signum: int) -> int:
    """The exit status of a run sent `signum` while inside save_safetensors."""
    process = stalled_in_save(project, tmp_path)
    process.send_signal(signum)
    process.communicate(timeout=60)
    return process.returncode


def test_a_second_run_exits_at_once_naming_the_first(project, tmp_path):
    project.checkpoint("a.ckpt")
    first = stalled_in_save(project, tmp_path)
    try:
        state = (project.root / ".doit.db").read_bytes()
        started = time.monotonic()
        second = project.doit()
        assert time.monotonic() - started < 10
        assert second.returncode == 75
        assert f"pid {first.pid}," in second.stderr
        assert "this one stops without touching anything" in second.stderr
        assert (project.root / ".doit.db").read_bytes() == state
        assert project.doit("list").returncode == 0  # reading is never blocked
    finally:
        first.kill()
        first.communicate()


def test_a_run_killed_in_save_is_finished_by_the_next(project, tmp_path):
    source = project.checkpoint("a.ckpt")
    killed = stalled_in_save(project, tmp_path)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    output = project.output("a")
    assert [p.name for p in output.iterdir()] == [f".model.safetensors.tmp-{killed.pid}"]

    rerun = project.doit()

    assert rerun.returncode == 0, rerun.stderr
    assert project.ran() == {"a": ["save_safetensors", "write_index", "write_config"]}
    assert convert(source, tmp_path / "clean", 0, trusted=False) == 0
    for name in ("model.safetensors", "index.json", "config.json"):
        assert (output / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert sorted(p.name for p in output.iterdir()) == [
        "config.json",
        "index.json",
        "model.safetensors",
        "provenance.json",
    ]


def test_ctrl_c_still_writes_the_report(project, tmp_path):
    project.checkpoint("a.ckpt")
    assert stopped_in_save(project, tmp_path, signal.SIGINT) != 0
    report = project.report()
    assert report["status"] == "interrupted"
    row = report["checkpoints"][0]
    assert (row["status"], row["reason"]) == ("interrupted", "the run was stopped")
    assert row["stages"]["load"]["status"] == "ran"
    assert row["stages"]["save_safetensors"]["status"] == "interrupted"


def test_full_disk_names_the_folder_and_loses_nothing(tmp_path, tiny_path, monkeypatch, messages):
    import safetensors.torch

    assert convert(tiny_path, tmp_path / "a", 0, trusted=False) == 0
    assert convert(tiny_path, tmp_path / "b", 0, trusted=False) == 0
    before = {
        f: (tmp_path / f).read_bytes()
        for f in ("a/model.safetensors", "b/model.safetensors", "b/config.json", "b/index.json")
    }

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert convert(tiny_path, tmp_path / "b", 1, trusted=False) == 1
    assert errors(messages)[0] == (
        f"no space left on the device while writing into {tmp_path / 'b'}; "
        "free some space and run again (earlier outputs are intact)"
    )
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.json",
        "index.json",
        "model.safetensors",
        "provenance.json",
    ]


def test_earlier_output_stays_when_a_later_conversion_fails(project):
    source = project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    before = {p.name: p.read_bytes() for p in project.output("a").iterdir()}
    source.write_bytes(source.read_bytes()[:300_000])
    assert project.doit().returncode == 2
    assert {p.name: p.read_bytes() for p in project.output("a").iterdir()} == before


def test_foreign_safetensors_in_the_output_folder_is_an_error(tmp_path, tiny_path, messages):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert convert(tiny_path, tmp_path, 0, trusted=False) == 1
    assert errors(messages)[0] == (
        f"{tmp_path} already holds model-00001-of-00002.safetensors, "
        "model.safetensors, which this pipeline did not write; llama.cpp's "
        "converter would read them too. Move them away or set another output "
        "for this checkpoint"
    )


def test_someone_elses_folder_is_left_alone(project):
    from safetensors.torch import save_file

    project.checkpoint("a.ckpt")
    theirs = project.root / "theirs"
    theirs.mkdir()
    save_file({"w": torch.zeros(2)}, theirs / "model.safetensors")
    (theirs / "config.json").write_text('{"architectures": ["SomeoneElsesModel"]}')
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\noutput = "../theirs"\n')
    result = project.doit()
    assert result.returncode == 2
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    stages = project.report()["checkpoints"][0]["stages"]
    assert (stages["save_safetensors"]["status"], stages["write_config"]["status"]) == (
        "failed",
        "skipped",
    )


def test_a_checkpoint_replaced_behind_load_is_loaded_again(project):
    """load.json that no longer describes its source makes load run, whatever doit recorded."""
    project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    load_json = project.root / "build" / "a" / "load.json"
    recorded = json.loads(load_json.read_text())
    recorded.update(mtime_ns=recorded["mtime_ns"] - 1, sha256="0" * 64)
    load_json.write_text(json.dumps(recorded))
    dry = project.doit("dry-run")
    assert "  load              runs: the checkpoint changed since load read it\n" in dry.stdout
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert project.ran()["a"][0] == "load"


def test_damaged_tensor_bytes_are_caught(project, tmp_path, messages):
    source = project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    kept = json.loads((project.root / "build" / "a" / "load.json").read_text())["kept"]
    offset = next(entry["offset"] for entry in kept if entry["key"] == "head.out.weight")
    data = bytearray(source.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    assert convert(damaged, tmp_path / "out", 0, trusted=False) == 1
    assert errors(messages)[0] == (
        f"{damaged}: is damaged: the bytes of 'head.out.weight' fail their CRC check (zip "
        "record 'archive/data/"
        + errors(messages)[0].split("archive/data/")[1].split("'")[0]
        + "'); "
        "copy or download it again"
    )
    assert not (tmp_path / "out").exists()


def test_a_config_mistake_leaves_a_failed_report_and_a_log_line(project):
    project.checkpoint("a.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert project.doit().returncode == 0
    project.config('[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nbogus = 1\n')
    result = project.doit()
    assert result.returncode == 3
    report = project.report()
    assert (report["status"], report["checkpoints"]) == ("failed", [])
    assert report["errors"][0].endswith(
        "unknown key 'bogus' (allowed: bandwidth_id, name, output, "
        "output_root, sample, source, trusted)"
    )
    assert "unknown key 'bogus'" in (project.root / "logs" / "pipeline.log").read_text()
    assert result.stderr.count("unknown key 'bogus'") == 1


def test_a_task_named_after_its_file_is_refused(project):
    project.checkpoint("epoch=14-step=3000.ckpt")
    project.config('[[checkpoint]]\nsource = "../ckpts/*.ckpt"\n')
    result = project.doit("write_config:epoch=14-step=3000")
    assert result.returncode == 3
    assert "use write_config:epoch_14-step_3000 (see doit list --all)" in result.stderr
    assert not (project.root / "converted").exists()


def test_sigterm_ends_the_run_with_a_report(project, tmp_path):
    project.checkpoint("a.ckpt")
    assert stopped_in_save(project, tmp_path, signal.SIGTERM) == 143
    assert project.report()["status"] == "interrupted"
    assert list(project.output("a").iterdir()) == []


def test_writer_temp_files_of_a_killed_write_are_removed(tmp_path, tiny_path):
    from pipeline.files import WRITER_TEMP_AGE

    tmp_path.joinpath("out").mkdir()
    stale, fresh = tmp_path / "out" / ".tmpAb12Cd", tmp_path / "out" / ".tmpXy98Zw"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - WRITER_TEMP_AGE - 5
    os.utime(stale, (old, old))
    assert convert(tiny_path, tmp_path / "out", 0, trusted=False) == 0
    assert not stale.exists() and fresh.exists()


def test_replacing_another_checkpoints_conversion_warns(tmp_path, messages):
    for name in ("epoch=1-step=100.ckpt", "last.ckpt"):
        synthetic.write_tiny(tmp_path / name)
    assert convert(tmp_path / "epoch=1-step=100.ckpt", None, 0, trusted=False) == 0
    assert convert(tmp_path / "last.ckpt", None, 0, trusted=False) == 0
    assert [m for level, m in messages if level == "WARNING"] == [
        f"replacing the conversion of epoch=1-step=100.ckpt in {tmp_path}; give each "
        "checkpoint its own output folder to keep both"
    ]
