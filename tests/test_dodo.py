"""The doit task graph: what runs, what does not, read from the run's report."""

from __future__ import annotations

import shutil

from pipeline.cli import convert
from tests.conftest import REPO

STAGES = ["load", "flatten", "transform", "save_safetensors", "write_index", "write_config"]
TWO = '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n\n[[checkpoint]]\nsource = "../ckpts/b.ckpt"\n'


def two_checkpoints(project):
    project.checkpoint("a.ckpt", seed=1)
    project.checkpoint("b.ckpt", seed=2)
    project.config(TWO)


def test_task_list(project):
    two_checkpoints(project)
    result = project.doit("list", "--all", "--sort=definition")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["sample"] + [
        name for stage in STAGES for name in (stage, f"{stage}:a", f"{stage}:b")
    ]
    docs = dict(
        line.split(None, 1) for line in result.stdout.splitlines() if ":" not in line.split()[0]
    )
    assert docs == {
        "sample": "Generate the synthetic checkpoints that config entries ask for with `sample`.",
        "load": "Open each checkpoint safely, find its state dict, keep the decoder's tensors.",
        "flatten": "Give every kept tensor its canonical name (prefixes like module. removed).",
        "transform": "Apply the rename, reshape and bandwidth-row rules; read the decoder's sizes.",
        "save_safetensors": (
            "Write model.safetensors (and provenance.json) into each output folder."
        ),
        "write_index": "Write index.json (total size and weight map) beside model.safetensors.",
        "write_config": "Write config.json for llama.cpp, every size read from the checkpoint.",
    }


def test_second_run_executes_and_rewrites_nothing(project):
    two_checkpoints(project)
    first = project.doit()
    assert first.returncode == 0, first.stderr
    assert project.ran() == {"a": STAGES, "b": STAGES}
    before = project.snapshot()
    second = project.doit()
    assert second.returncode == 0, second.stderr
    assert project.ran() == {"a": [], "b": []}
    assert [row["status"] for row in project.report()["checkpoints"]] == ["up to date"] * 2
    assert project.snapshot() == before


def test_bandwidth_edit_reruns_one_checkpoint_from_transform(project):
    two_checkpoints(project)
    assert project.doit().returncode == 0
    config_before = (project.output("a") / "config.json").read_bytes()
    project.config(TWO.replace('a.ckpt"\n', 'a.ckpt"\nbandwidth_id = 1\n', 1))
    result = project.doit()
    assert result.returncode == 0, result.stderr
    # index.json depends only on the file's size, which the new row does not change
    assert project.ran() == {"a": ["transform", "save_safetensors", "write_config"], "b": []}
    assert (project.output("a") / "config.json").read_bytes() == config_before


def own_copy_of_the_package(project) -> None:
    """A copy of pipeline/ beside the project's dodo.py, which doit imports first."""
    shutil.copytree(
        REPO / "pipeline", project.root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )


def test_identical_output_stops_the_rerun(project):
    """A stage whose code changed reruns; when its output is unchanged, nothing after it does."""
    two_checkpoints(project)
    own_copy_of_the_package(project)
    assert project.doit().returncode == 0
    flatten = project.root / "pipeline" / "stages" / "flatten.py"
    flatten.write_text(flatten.read_text() + "\n# a comment changes the code, not the output\n")
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert project.ran() == {"a": ["flatten"], "b": ["flatten"]}


def test_code_change_reruns_that_stage(project):
    two_checkpoints(project)
    own_copy_of_the_package(project)
    assert project.doit().returncode == 0
    module = project.root / "pipeline" / "stages" / "hf_config.py"
    module.write_text(
        module.read_text().replace("dims.hf_config()", '{**dims.hf_config(), "extra": 1}')
    )
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert project.ran() == {"a": ["write_config"], "b": ["write_config"]}
    assert '"extra": 1' in (project.output("a") / "config.json").read_text()


def test_one_stage_for_one_checkpoint(project):
    """config.json comes after the model it describes: what it needs runs first."""
    two_checkpoints(project)
    result = project.doit("write_config:b")
    assert result.returncode == 0, result.stderr
    assert project.ran() == {
        "b": ["load", "flatten", "transform", "save_safetensors", "write_config"]
    }
    assert sorted(p.name for p in project.output("b").iterdir()) == [
        "config.json",
        "model.safetensors",
        "provenance.json",
    ]
    assert not project.output("a").exists()


def test_one_stage_for_every_checkpoint(project):
    two_checkpoints(project)
    assert project.doit().returncode == 0
    (project.output("a") / "config.json").unlink()
    result = project.doit("write_config")
    assert result.returncode == 0, result.stderr
    assert project.ran() == {"a": ["write_config"], "b": []}


def test_clean_removes_what_the_tasks_made(project):
    two_checkpoints(project)
    assert project.doit().returncode == 0
    result = project.doit("clean")
    assert result.returncode == 0, result.stderr
    assert [p for p in (project.root / "converted").rglob("*") if p.is_file()] == []
    assert (
        sorted(
            p.name for p in (project.root / "build").rglob("*.json") if p.parent.name in ("a", "b")
        )
        == []
    )


def test_config_mistake_stops_the_run_before_any_work(project):
    two_checkpoints(project)
    project.config(TWO + '\n[[checkpoint]]\nsource = "../ckpts/missing.ckpt"\n')
    result = project.doit()
    assert result.returncode == 3
    assert "team.toml: [[checkpoint]] #3 (source '../ckpts/missing.ckpt'): source" in result.stderr
    assert not (project.root / "converted").exists()
    assert not (project.root / "build" / "a").exists()


def test_configs_folder_from_the_command_line(project):
    project.checkpoint("a.ckpt")
    (project.root / "other").mkdir()
    (project.root / "other" / "x.toml").write_text(
        '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nname = "x"\n'
    )
    project.config('[[checkpoint]]\nsource = "../ckpts/missing.ckpt"\n')
    result = project.doit("configs=other")
    assert result.returncode == 0, result.stderr
    assert project.ran() == {"x": STAGES}


def test_two_worker_processes(project):
    """Actions are module-level functions with plain arguments: doit's process pool runs them."""
    two_checkpoints(project)
    project.checkpoint("c.ckpt", seed=3)
    project.config(TWO + '\n[[checkpoint]]\nsource = "../ckpts/c.ckpt"\n')
    result = project.doit("-n", "2")
    assert result.returncode == 0, result.stderr
    assert project.ran() == {"a": STAGES, "b": STAGES, "c": STAGES}
    serial = project.root / "serial"
    for name in ("a", "b", "c"):
        assert convert(project.root / "ckpts" / f"{name}.ckpt", serial / name, 0, False) == 0
        for artifact in ("model.safetensors", "index.json", "config.json"):
            assert (project.output(name) / artifact).read_bytes() == (
                serial / name / artifact
            ).read_bytes()
