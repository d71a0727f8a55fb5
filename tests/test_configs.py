"""Reading configs/*.toml: resolution rules, and every mistake named before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.configs import Entry, check_command_line, read_configs, task_name
from pipeline.errors import ConfigError


@pytest.fixture
def layout(tmp_path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "ckpts").mkdir()
    for name in ("a.ckpt", "b.ckpt", "epoch=14-step=3000.ckpt"):
        (tmp_path / "ckpts" / name).write_bytes(b"x")
    return tmp_path


def write(layout: Path, text: str, name: str = "team.toml") -> Path:
    path = layout / "configs" / name
    path.write_text(text)
    return path


def read(layout: Path) -> list[Entry]:
    return read_configs(layout / "configs", layout)


def test_defaults_globs_and_relative_paths(layout):
    write(
        layout,
        """
[defaults]
bandwidth_id = 2

[[checkpoint]]
source = "../ckpts/*.ckpt"

[[checkpoint]]
source = "../ckpts/a.ckpt"
name = "a-again"
output = "../elsewhere"
bandwidth_id = 0
trusted = true
""",
    )
    ckpts, converted = layout / "ckpts", layout / "converted"
    config = str(layout / "configs" / "team.toml")
    assert read(layout) == [
        Entry(
            "a",
            ckpts / "a.ckpt",
            converted / "a",
            2,
            False,
            None,
            f"{config}: [[checkpoint]] #1 (source '../ckpts/*.ckpt')",
        ),
        Entry(
            "b",
            ckpts / "b.ckpt",
            converted / "b",
            2,
            False,
            None,
            f"{config}: [[checkpoint]] #1 (source '../ckpts/*.ckpt')",
        ),
        Entry(
            "epoch_14-step_3000",
            ckpts / "epoch=14-step=3000.ckpt",
            converted / "epoch_14-step_3000",
            2,
            False,
            None,
            f"{config}: [[checkpoint]] #1 (source '../ckpts/*.ckpt')",
        ),
        Entry(
            "a-again",
            ckpts / "a.ckpt",
            layout / "elsewhere",
            0,
            True,
            None,
            f"{config}: [[checkpoint]] #2 (source '../ckpts/a.ckpt')",
        ),
    ]


def test_output_root_default_and_override(layout):
    write(
        layout,
        '[defaults]\noutput_root = "/srv/out"\n[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n',
    )
    assert read(layout)[0].output == Path("/srv/out/a")


def test_settings_are_plain_values(layout):
    write(layout, '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    assert read(layout)[0].settings() == {
        "name": "a",
        "source": str(layout / "ckpts" / "a.ckpt"),
        "output": str(layout / "converted" / "a"),
        "bandwidth_id": 0,
        "trusted": False,
        "sample": None,
    }


@pytest.mark.parametrize(
    "stem, name",
    [
        ("epoch=14-step=3000", "epoch_14-step_3000"),
        ("last", "last"),
        ("my model (v2)", "my_model_v2"),
        ("===", "checkpoint"),
    ],
)
def test_task_names_are_safe_on_doit_command_line(stem, name):
    assert task_name(Path(f"/x/{stem}.ckpt")) == name


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nbandwith_id = 1\n',
            r"team.toml: \[\[checkpoint\]\] #1 \(source '../ckpts/a.ckpt'\): "
            r"unknown key 'bandwith_id'; "
            r"did you mean 'bandwidth_id'\?",
        ),
        (
            '[defaults]\nname = "x"\n[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n',
            r"team.toml: \[defaults\]: unknown key 'name'",
        ),
        (
            '[checkpoints]\nsource = "x"\n',
            r"team.toml: unknown key 'checkpoints'; did you mean 'checkpoint'\?",
        ),
        (
            '[[checkpoint]]\nsource = "../ckpts/missing.ckpt"\n',
            r"team.toml: \[\[checkpoint\]\] #1 \(source '../ckpts/missing.ckpt'\): "
            r"source '.*/ckpts/missing.ckpt' does not exist",
        ),
        ('[[checkpoint]]\nsource = "../ckpts"\n', r"source '.*/ckpts' is a folder, not a file"),
        ('[[checkpoint]]\nsource = "../ckpts/*.pt"\n', r"glob '.*/ckpts/\*.pt' matches no file"),
        ('[[checkpoint]]\nname = "x"\n', r"#1: missing required key 'source'"),
        (
            '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nbandwidth_id = "1"\n',
            r"bandwidth_id must be a whole number, got '1'",
        ),
        (
            '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nbandwidth_id = -1\n',
            r"bandwidth_id must be 0 or more",
        ),
        (
            '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\ntrusted = 1\n',
            r"trusted must be true or false, got 1",
        ),
        (
            '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\nname = "a=b"\n',
            r"name 'a=b' may hold only",
        ),
        (
            '[[checkpoint]]\nsource = "../ckpts/*.ckpt"\nname = "all"\n',
            r"a glob matching 3 files cannot take one name",
        ),
        (
            '[[checkpoint]]\nsource = "../x.ckpt"\nsample = "huge"\n',
            r"sample 'huge' is not a known release",
        ),
        ("[[checkpoint]\nsource = 1\n", r"team.toml: not valid TOML: "),
    ],
)
def test_mistakes_name_the_file_and_entry(layout, text, message):
    write(layout, text)
    with pytest.raises(ConfigError, match=message):
        read(layout)


def test_two_entries_with_one_name(layout):
    write(layout, '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    write(layout, '[[checkpoint]]\nsource = "../ckpts/b.ckpt"\nname = "a"\n', "other.toml")
    with pytest.raises(ConfigError) as error:
        read(layout)
    assert str(error.value) == (
        f"two checkpoints share the name 'a': {layout}/ckpts/b.ckpt from "
        f"{layout}/configs/other.toml: [[checkpoint]] #1 (source '../ckpts/b.ckpt') and "
        f"{layout}/ckpts/a.ckpt from {layout}/configs/team.toml: [[checkpoint]] #1 "
        "(source '../ckpts/a.ckpt'); give one of them its own name"
    )


def test_two_entries_with_one_output(layout):
    write(
        layout,
        '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\noutput = "../out"\n'
        '[[checkpoint]]\nsource = "../ckpts/b.ckpt"\noutput = "../out"\n',
    )
    with pytest.raises(ConfigError, match=r"two checkpoints share the output '.*/out'"):
        read(layout)


def test_missing_or_empty_configs_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; create it or pass configs=DIR"):
        read_configs(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no \*.toml file"):
        read_configs(tmp_path / "empty", tmp_path)


def test_sample_source_need_not_exist_yet(layout):
    write(layout, '[[checkpoint]]\nsource = "../samples/s.ckpt"\nsample = "large-320-24k-4096"\n')
    assert read(layout)[0].sample == "large-320-24k-4096"


@pytest.mark.parametrize("text", ["checkpoint = [5]\n", 'checkpoint = ["../ckpts/a.ckpt"]\n'])
def test_checkpoints_must_be_tables(layout, text):
    write(layout, text)
    with pytest.raises(
        ConfigError, match=r"#1: is .*; each checkpoint is a \[\[checkpoint\]\] table"
    ):
        read(layout)


def test_a_folder_named_like_a_config_is_not_read(layout):
    write(layout, '[[checkpoint]]\nsource = "../ckpts/a.ckpt"\n')
    (layout / "configs" / "old.toml").mkdir()
    assert [entry.name for entry in read(layout)] == ["a"]


def test_an_existing_file_with_glob_characters_is_a_file(layout):
    (layout / "ckpts" / "x[1].ckpt").write_bytes(b"x")
    write(layout, '[[checkpoint]]\nsource = "../ckpts/x[1].ckpt"\n')
    assert [entry.source.name for entry in read(layout)] == ["x[1].ckpt"]


def test_one_glob_finding_two_files_of_one_name(layout):
    for run in ("r1", "r2"):
        (layout / run).mkdir()
        (layout / run / "last.ckpt").write_bytes(b"x")
    write(layout, '[[checkpoint]]\nsource = "../r*/last.ckpt"\n')
    with pytest.raises(
        ConfigError,
        match="the glob finds two files of that name; list them as "
        "separate .* entries, each with its own name",
    ):
        read(layout)


@pytest.mark.parametrize(
    "arg, suggestion",
    [
        ("write_config:epoch=14-step=3000", "write_config:epoch_14-step_3000"),
        ("load:last=1", "load:last_1"),
    ],
)
def test_a_task_named_after_its_file_is_caught(arg, suggestion):
    with pytest.raises(ConfigError) as error:
        check_command_line(["-n", "2", arg])
    assert str(error.value) == (
        f"{arg!r} is read by doit as a variable because of its '='; task names replace '=' "
        f"with '_': use {suggestion} (see doit list --all)"
    )


def test_variables_and_options_pass_the_command_line_check():
    check_command_line(["configs=other", "--process=2", "write_config:a"])
