"""The command line: instant help (no heavy imports), every sub-command present."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora.cli import COMMANDS


def test_help_imports_no_heavy_library():
    code = ("import sys, qlora.cli; qlora.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "qlora.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"usage: qlora {command}" in out.stdout


def test_unknown_command_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "fly"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_overrides_may_follow_options(tmp_path):
    """`qlora train RECIPE --overwrite key=value` keeps the override (it reaches validation)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_smoke.yaml"
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), "--overwrite",
                          f"output.dir={tmp_path / 'x'}", "lora.rr=1"], capture_output=True, text=True)
    assert out.returncode == 2 and "lora.rr" in out.stderr
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), "--bogus"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr


@pytest.mark.parametrize("code, name", [(28, "ENOSPC"), (30, "EROFS"), (13, "EACCES")])
def test_os_errors_on_output_exit_2_with_their_name(monkeypatch, capsys, code, name):
    import os

    from qlora import cli
    from qlora.commands import plot

    def fail(args):
        raise OSError(code, os.strerror(code), "/runs/x/adapter")
    monkeypatch.setattr(plot, "run", fail)
    assert cli.main(["plot", "whatever"]) == 2
    err = capsys.readouterr().err
    assert name in err and "/runs/x/adapter" in err and "Traceback" not in err


def test_a_full_disk_is_an_os_error_naming_enospc(tmp_path):
    import errno
    from pathlib import Path

    import torch

    from qlora.training.checkpoint import _save_state

    with pytest.raises(OSError) as err:
        _save_state({"x": torch.zeros(100_000)}, Path("/dev/full"))
    assert err.value.errno == errno.ENOSPC


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    """A write's ENOSPC carries no file name; every atomic write and the state / metrics files
    raise it again naming their path, which the CLI then prints."""
    import errno
    import os
    from pathlib import Path

    import torch

    from qlora import io
    from qlora.training.checkpoint import _save_state

    with pytest.raises(OSError) as err:
        _save_state({"x": torch.zeros(100_000)}, Path("/dev/full"))
    assert err.value.errno == errno.ENOSPC and err.value.filename == "/dev/full"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OSError) as err:
        io.write_text_atomic(tmp_path / "summary.json", "{}")
    assert err.value.filename == str(tmp_path / "summary.json") and not list(tmp_path.iterdir())
    monkeypatch.undo()
    with pytest.raises(OSError) as err:
        with io.atomic_folder(tmp_path / "adapter") as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as safetensors' writer raises it
    assert err.value.filename == str(tmp_path / "adapter") and not list(tmp_path.iterdir())
    from qlora.errors import describe_os_error

    message = describe_os_error(err.value)
    assert str(tmp_path / "adapter") in message and "ENOSPC" in message


def test_an_unknown_flag_is_named_before_missing_arguments(capsys):
    from qlora.cli import main

    for argv in (["train", "--bogus-flag"], ["merge", "--bogus-flag=1", "x"], ["eval", "-z"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert f"unrecognized arguments: {argv[1]}" in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["train"])
    assert "the following arguments are required: recipe" in capsys.readouterr().err
