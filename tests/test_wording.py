"""The wording check `make lint` runs (.ci/check_wording.py): the tree speaks of the software,
and a planted development-diary phrase fails the check with its file and line."""
from __future__ import annotations

import subprocess
import sys

from workflow import ROOT

CHECK = [sys.executable, str(ROOT / ".ci" / "check_wording.py")]


def test_the_tree_has_no_diary_phrase():
    r = subprocess.run(CHECK, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_planted_phrase_fails_with_its_file_and_line(tmp_path):
    # the phrases are assembled here so that this file itself stays clean
    planted = {"notes.md": "Measured in this " + "session on the quiet machine.\n",
               "module.py": '"""Fixed in ' + "issue " + '26: the step."""\n',
               "config.yaml": "epochs: 40   # pre-" + "registered before the run\n"}
    for name, line in planted.items():
        (tmp_path / name).write_text("a first line\n" + line)
    r = subprocess.run([*CHECK, *(str(tmp_path / n) for n in planted)], capture_output=True, text=True)
    assert r.returncode == 1
    for name in planted:
        assert f"{tmp_path / name}:2: " in r.stdout, r.stdout
    assert "3 development-diary phrase(s)" in r.stderr


def test_plain_prose_passes(tmp_path):
    text = ("The butterfly all-reduce sends each slice once per phase; a session of pytest starts "
            "the server once; the SLURM job resumes from its checkpoint at epoch 500.\n")
    (tmp_path / "plain.md").write_text(text)
    r = subprocess.run([*CHECK, str(tmp_path / "plain.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
