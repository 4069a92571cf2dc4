"""The README stays true: its key table is the one the code validates against, its commands exist."""

import os

from repa_fused.training.config import key_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_key_table_is_current():
    assert key_table() in readme(), "README's key table is stale: paste repa_fused.training.config.key_table()"


def test_ci_runs_the_readme_test_command():
    text = readme()
    assert "./dev test" in text and "./dev bench" in text
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "./dev test" in f.read()


def test_no_unfilled_placeholder():
    assert "PLACEHOLDER" not in readme()
