"""The atomic write: readers see the old file (or folder) or the whole new one, and a failed write leaves no trace."""

import pytest

from suite.files import atomic_output, write_json_atomic


@pytest.mark.parametrize("folder", [False, True])
def test_a_failed_write_keeps_the_old_output_and_leaves_no_temporary(tmp_path, folder):
    out = tmp_path / "sub" / "out"
    with atomic_output(out, folder=folder) as tmp:
        (tmp / "a.txt" if folder else tmp).write_text("new")
    assert (out / "a.txt" if folder else out).read_text() == "new"
    with pytest.raises(KeyboardInterrupt), atomic_output(out, folder=folder) as tmp:
        (tmp / "a.txt" if folder else tmp).write_text("torn")
        raise KeyboardInterrupt
    assert (out / "a.txt" if folder else out).read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_json(tmp_path):
    write_json_atomic(tmp_path / "plan.json", {"a": [1]})
    assert (tmp_path / "plan.json").read_text() == '{\n "a": [\n  1\n ]\n}'
