"""What every converter shares: files that are not plain tensors are refused without running anything."""

import os

import pytest
import torch

from diffusers_speedup.convert import FORMATS, build_parser, main
from diffusers_speedup.convert.common import CheckpointFormatError, load_torch_state_dict


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_every_format_has_a_command():
    parser = build_parser()
    for name in FORMATS:
        args = parser.parse_args([name, "checkpoint.pt", "--output_dir", "out"])
        assert callable(args.run)


def test_pickled_code_is_refused_naming_what_it_holds_and_never_advising_to_run_it(tmp_path):
    path = tmp_path / "nnet.pth"
    torch.save({"weight": torch.zeros(2), "payload": RunsACommand()}, path)
    with pytest.raises(CheckpointFormatError) as error:
        load_torch_state_dict(path, "a test checkpoint")
    message = str(error.value)
    assert "system" in message and str(path) in message
    assert "weights_only" not in message and "\n" not in message


def test_garbage_bytes_are_one_error_naming_the_file(tmp_path):
    path = tmp_path / "nnet.pth"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointFormatError, match="nnet.pth"):
        load_torch_state_dict(path, "a test checkpoint")


def test_the_command_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        main(["dit", str(path), "--output_dir", str(tmp_path / "out")])
    assert str(stop.value).startswith("error: ") and str(path) in str(stop.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_small_text_file_is_one_line_for_every_format(fmt, tmp_path):
    # Read as a legacy torch pickle, these bytes made torch's unpickler fail with a bare KeyError: 101.
    path = tmp_path / "notes.txt"
    path.write_text("hello world\nthis is a text file\n")
    with pytest.raises(SystemExit) as stop:
        main([fmt, str(path), "--output_dir", str(tmp_path / "out")])
    message = str(stop.value)
    assert message.startswith(f"error: {path}: cannot be read as ") and "\n" not in message
    assert not (tmp_path / "out").exists()
