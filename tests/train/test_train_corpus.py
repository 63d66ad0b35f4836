"""The stdlib corpus selection, its held-out split, and the chat pairs made from docstrings."""

from pathlib import Path

from clex_serve.train.corpus import SourceFile, is_held_out, list_source_files, split_files
from clex_serve.train.instructions import pairs_from_source, summary


def test_selection_is_sorted_and_excludes_tests_and_third_party():
    files = list_source_files()
    paths = [f.relative_path for f in files]
    assert paths == sorted(paths)
    assert "json/__init__.py" in paths and "argparse.py" in paths
    for path in paths:
        parts = path.split("/")
        assert not {"test", "tests", "site-packages", "encodings"} & set(parts[:-1]), path
        assert not parts[-1].startswith("_sysconfigdata")


def test_held_out_split_is_about_five_percent_and_disjoint():
    train, held_out = split_files()
    assert 0.02 < len(held_out) / (len(train) + len(held_out)) < 0.10
    assert not {f.relative_path for f in train} & {f.relative_path for f in held_out}
    assert all(is_held_out(f.relative_path) for f in held_out)
    assert split_files() == (train, held_out)


def test_module_names():
    assert SourceFile("json/__init__.py", Path("x")).module_name == "json"
    assert SourceFile("email/mime/text.py", Path("x")).module_name == "email.mime.text"


def test_summary_takes_first_sentences_of_first_paragraph():
    doc = "Serialize ``obj`` to a JSON formatted ``str``.\n\n    If ``skipkeys`` is true then..."
    assert summary(doc) == "Serialize ``obj`` to a JSON formatted ``str``."
    assert summary("Do a. Then b. Then c.") == "Do a. Then b."
    assert summary("short") is None
    assert len(summary("word " * 200)) <= 243


def test_pairs_from_source(tmp_path):
    source = tmp_path / "demo.py"
    source.write_text(
        '"""Tools for demos."""\n'
        'def public(x):\n    """Return x doubled, always."""\n\n'
        'def _private():\n    """Hidden helper function."""\n\n'
        'class Box:\n    """A box that holds things."""\n'
        '    def open(self):\n        """Open the box lid."""\n'
    )
    pairs = pairs_from_source(SourceFile("demo.py", source))
    answers = {pair.answer for pair in pairs}
    assert answers == {"Tools for demos.", "Return x doubled, always.", "A box that holds things.", "Open the box lid."}
    questions = " ".join(pair.question for pair in pairs)
    assert "demo.public" in questions and "demo.Box.open" in questions and "_private" not in questions
