"""`python -m xgen.run --help` is xgen's front door: every task and group described, and
examples that compose. Both lists come from conf/, so a task or group added without a line in
conf/hydra/help/xgen.yaml fails here."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tests.conftest import CONF_DIR
from xgen.config import to_object

REPO = Path(__file__).resolve().parents[2]
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.name != "hydra" and any(p.glob("*.yaml")))


@pytest.fixture(scope="module")
def help_text() -> str:
    proc = subprocess.run([sys.executable, "-m", "xgen.run", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def section(text: str, title: str) -> str:
    """The lines under `== title ==` up to the next heading."""
    match = re.search(rf"^== {re.escape(title)} ==\n(.*?)(?=^== |\Z)", text, re.S | re.M)
    assert match, f"no '== {title} ==' section in --help"
    return match.group(1)


def described(block: str) -> dict[str, str]:
    """`  name   what it is` lines -> {name: what it is}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+) {2,}(\S.*)$", block, re.M)}


def test_help_describes_every_task_in_one_line(help_text):
    lines = described(section(help_text, "Tasks (task=...)"))
    assert sorted(lines) == TASKS


def test_help_describes_every_config_group_in_one_line_and_lists_its_options(help_text):
    block = section(help_text, "Config groups")
    assert sorted(described(block)) == GROUPS
    for group in GROUPS:  # Hydra's $APP_CONFIG_GROUPS: `group: option, option`
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in block


def test_help_is_xgens_and_hydras_stays_at_hydra_help(help_text):
    assert help_text.startswith("xgen: ") and "--hydra-help" in help_text
    assert "== Config ==" not in help_text  # not the full config dump of Hydra's template
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "--hydra-help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0 and "== Flags ==" in proc.stdout and "--multirun" in proc.stdout


def test_help_has_five_examples_that_compose(help_text):
    commands = [
        line.split("#")[0].strip() for line in section(help_text, "Examples").splitlines() if "python -m xgen.run" in line
    ]
    assert len(commands) == 5
    assert any(" -m " in c for c in commands) and any("task=plan" in c for c in commands)
    assert any("task=eval" in c for c in commands) and any("--cfg job" in c for c in commands)
    for command in commands:
        # <time> and the like are for the reader to fill in.
        args = [re.sub(r"<\w+>", "x", a) for a in shlex.split(command)[3:] if a not in ("-m", "--cfg", "job")]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=args, return_hydra_config=True)  # hydra/... choices too
        with open_dict(cfg):
            del cfg["hydra"]
        to_object(cfg)  # every key and option exists in the schema
