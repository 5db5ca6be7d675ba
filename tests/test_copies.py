"""The `# Copied from` markers between single-file modules: every marked copy equals its source."""

import textwrap

import pytest
from check_copies import REPO, CopyError, check_copies, check_file, find_markers, fix_file, main, scanned_files

SOURCE = '''\
import torch

SCALES = (1, 2)


def broadcast(value, batch):
    """Repeat `value` `batch` times."""
    return torch.as_tensor(value).expand(batch)


class SourceBlock(torch.nn.Module):
    def forward(self, x):
        # why: the block is the identity
        return x

    def double(self, x):
        return 2 * x
'''


def _write(folder, name, text):
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def source_module(tmp_path, monkeypatch):
    """A module `copies_source` importable by name, as the source of the synthetic copies."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, "copies_source", SOURCE)
    return tmp_path


def test_every_marked_copy_in_the_library_equals_its_source():
    problems = check_copies(scanned_files())
    assert not problems, "\n".join(problems)


def test_the_library_marks_its_known_copies():
    # The pieces the single-file modules share; a marker that disappears would leave a copy unchecked.
    sources = {
        (marker.path.relative_to(REPO).as_posix(), marker.source)
        for path in scanned_files()
        for marker in find_markers(path)
    }
    assert {
        ("diffusers_speedup/models/dit_transformer.py", "diffusers_speedup.models.uvit._broadcast_timestep"),
        ("diffusers_speedup/models/dit_transformer.py", "diffusers_speedup.models.uvit.UViTAttention"),
        ("diffusers_speedup/models/dit_transformer.py", "diffusers_speedup.models.uvit._check_transformer_config"),
        ("diffusers_speedup/models/edm2_unet.py", "diffusers_speedup.schedulers.scheduling_edm_heun.edm_scalings"),
        (
            "diffusers_speedup/schedulers/scheduling_edm_heun.py",
            "diffusers_speedup.objectives.weighting.PREDICTION_TYPES",
        ),
    } <= sources


def test_an_equal_copy_with_replacements_is_not_reported(source_module):
    copy = _write(
        source_module,
        "copies_equal",
        '''\
        import torch

        # Copied from copies_source.SCALES
        SCALES = (1, 2)


        # Copied from copies_source.broadcast with broadcast->repeat
        def repeat(value, batch):
            """Repeat `value` `batch` times."""
            return torch.as_tensor(value).expand(batch)


        # Copied from copies_source.SourceBlock with Source->Copy
        class CopyBlock(torch.nn.Module):
            def forward(self, x):
                # why: the block is the identity
                return x

            def double(self, x):
                return 2 * x


        class Other:
            # Copied from copies_source.SourceBlock.double
            def double(self, x):
                return 2 * x
        ''',
    )
    assert len(find_markers(copy)) == 4
    assert check_file(copy) == []


def test_a_drifted_copy_is_reported_with_file_line_marker_and_first_differing_line(source_module):
    copy = _write(
        source_module,
        "copies_drifted",
        """\
        import torch


        # Copied from copies_source.broadcast with broadcast->repeat
        def repeat(value, batch):
            \"\"\"Repeat `value` `batch` times.\"\"\"
            return torch.as_tensor(value).expand(batch).clone()
        """,
    )
    (problem,) = check_copies([copy])
    assert "copies_drifted.py:4:" in problem
    assert "'# Copied from copies_source.broadcast with broadcast->repeat'" in problem
    assert "from line 7 on" in problem
    assert "expected '    return torch.as_tensor(value).expand(batch)'" in problem
    assert "found '    return torch.as_tensor(value).expand(batch).clone()'" in problem


def test_a_copy_missing_lines_of_its_source_is_reported(source_module):
    copy = _write(
        source_module,
        "copies_short",
        """\
        class CopyBlock:
            # Copied from copies_source.SourceBlock.forward
            def forward(self, x):
                return x
        """,
    )
    (problem,) = check_copies([copy])
    assert "copies_short.py:2:" in problem and "from line 4 on" in problem
    assert "expected '    # why: the block is the identity', found '    return x'" in problem


@pytest.mark.parametrize(
    "source, missing",
    [
        ("copies_source.no_such_function", "copies_source"),
        ("copies_source.SourceBlock.no_such_method", "SourceBlock.no_such_method"),
        ("copies_no_such_module.helper", "no prefix of it is a Python module"),
        ("copies_no_such_package.module.helper", "no prefix of it is a Python module"),
    ],
)
def test_a_marker_naming_something_that_does_not_exist_is_reported(source_module, source, missing):
    copy = _write(source_module, "copies_dangling", f"# Copied from {source}\ndef helper():\n    return 1\n")
    (problem,) = check_copies([copy])
    assert "copies_dangling.py:1:" in problem and f"{source} does not exist" in problem and missing in problem


def test_a_marker_must_stand_right_above_what_it_marks(source_module):
    copy = _write(source_module, "copies_detached", "# Copied from copies_source.SCALES\n\nSCALES = (1, 2)\n")
    (problem,) = check_copies([copy])
    assert "copies_detached.py:1:" in problem and "does not start a function, class or assignment" in problem


def test_a_malformed_marker_is_refused(source_module):
    copy = _write(source_module, "copies_malformed", "# Copied from copies_source.SCALES with SCALES=>X\nX = (1, 2)\n")
    with pytest.raises(CopyError, match="'Old->New'"):
        find_markers(copy)


def test_fix_rewrites_a_drifted_copy_from_its_source_and_leaves_the_rest(source_module):
    copy = _write(
        source_module,
        "copies_fixed",
        """\
        import torch


        class Holder:
            # Copied from copies_source.broadcast with broadcast->repeat
            def repeat(value, batch):
                return value


        # Copied from copies_source.SCALES
        SCALES = (1, 2, 3)
        AFTER = 1
        """,
    )
    assert fix_file(copy) == 2
    assert check_file(copy) == []
    assert copy.read_text() == textwrap.dedent(
        """\
        import torch


        class Holder:
            # Copied from copies_source.broadcast with broadcast->repeat
            def repeat(value, batch):
                \"\"\"Repeat `value` `batch` times.\"\"\"
                return torch.as_tensor(value).expand(batch)


        # Copied from copies_source.SCALES
        SCALES = (1, 2)
        AFTER = 1
        """
    )


def test_the_command_line_check_passes_on_the_library(capsys):
    assert main([]) == 0
    assert capsys.readouterr().err == ""
