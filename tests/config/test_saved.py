"""read_saved_config: a config someone else wrote is read as data, never run, and bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.config import saved as saved_module
from xgen.config.saved import MAX_BYTES, MAX_NODES, calls_a_resolver, read_saved_config
from xgen.config.snapshots import SNAPSHOT_DIR

# Billion laughs: nine lines that expand to 9^9 (387 million) values.
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{inner}'] * 9)}]\n" for inner, name in zip("abcdefgh", "bcdefghi")
)


def saved(tmp_path: Path, text: str | bytes, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def refusal(path: Path, where: str | None = None) -> str:
    """The one line read_saved_config refuses `path` with."""
    with pytest.raises(ConfigError) as refused:
        read_saved_config(path, where)
    line = str(refused.value)
    assert "\n" not in line, line
    return line


def test_a_resolver_in_the_file_is_kept_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("XGEN_TEST_SECRET", "hunter2")
    calls = []
    OmegaConf.register_new_resolver("xgen_test_probe", lambda *args: calls.append(args) or "ran")
    try:
        tree = read_saved_config(
            saved(
                tmp_path,
                "home: ${oc.env:HOME}\n"
                "secret: 'key=${oc.env:XGEN_TEST_SECRET}'\n"
                "probe: ${xgen_test_probe:1}\n"
                "when: ${now:%Y}\n"
                "inside_a_key: ${x.${oc.env:XGEN_TEST_SECRET}}\n"
                "x: {hunter2: found}\n"
                "escaped: \\${oc.env:HOME}\n",
            )
        )
    finally:
        OmegaConf.clear_resolver("xgen_test_probe")
    assert tree == {
        "home": "${oc.env:HOME}",
        "secret": "key=${oc.env:XGEN_TEST_SECRET}",
        "probe": "${xgen_test_probe:1}",
        "when": "${now:%Y}",
        "inside_a_key": "${x.${oc.env:XGEN_TEST_SECRET}}",
        "x": {"hunter2": "found"},
        "escaped": "${oc.env:HOME}",  # OmegaConf's escape, read as OmegaConf reads it
    }
    assert calls == []


def test_the_files_own_interpolations_are_resolved_as_hydra_saved_them(tmp_path):
    """Hydra saves `${data_dir}/...` unresolved; a value pointing at a resolver's copies it as written."""
    tree = read_saved_config(
        saved(
            tmp_path,
            "data_dir: /data\n"
            "data_mix: {sources: {code: {path: '${data_dir}/prepared/code', weight: '${..weight_default}'}, weight_default: 2}}\n"
            "home: ${oc.env:HOME}\n"
            "cache: ${home}/cache\n"
            "same: ${home}\n",
        )
    )
    assert tree["data_mix"]["sources"]["code"] == {"path": "/data/prepared/code", "weight": 2}
    assert (tree["cache"], tree["same"]) == ("${oc.env:HOME}/cache", "${oc.env:HOME}")


def test_calls_a_resolver_tells_resolvers_from_keys_and_text():
    assert calls_a_resolver("${oc.env:HOME}") and calls_a_resolver("a ${b} ${oc.decode:'1'}")
    assert calls_a_resolver("${a.${oc.env:X}}")
    assert not calls_a_resolver("${data_dir}/x") and not calls_a_resolver("\\${oc.env:HOME}")
    assert not calls_a_resolver("http://example.com:80") and not calls_a_resolver("${unclosed")


@pytest.mark.parametrize("snapshot", sorted(SNAPSHOT_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_real_config_reads_as_omegaconf_reads_it(snapshot):
    """Same loader as OmegaConf.load (1e-4 a float, dates as strings): nothing a real config holds changes."""
    assert read_saved_config(snapshot) == OmegaConf.to_container(OmegaConf.load(snapshot), resolve=True)


def test_omegaconfs_own_yaml_reads_back(tmp_path):
    text = "lr: 1e-4\nday: 2024-01-31\nwhere: !!python/object/apply:pathlib.PosixPath [data, x]\n"
    tree = read_saved_config(saved(tmp_path, text))
    assert tree == {"lr": 0.0001, "day": "2024-01-31", "where": "data/x"}
    json.dumps(tree)  # plain data: a path reads as its string


def test_a_few_aliases_are_read_as_copies(tmp_path):
    tree = read_saved_config(
        saved(tmp_path, "base: &base {lr: 0.1, betas: [0.9, 0.95]}\nother: *base\nmerged: {<<: *base, lr: 1}\n")
    )
    assert tree["other"] == {"lr": 0.1, "betas": [0.9, 0.95]}
    assert tree["merged"] == {"lr": 1, "betas": [0.9, 0.95]}


def test_an_alias_bomb_is_refused_in_one_line_naming_the_file(tmp_path):
    """Counted on the node graph before anything is built: a hang would time the test out."""
    path = saved(tmp_path, ALIAS_BOMB)
    assert refusal(path) == (
        f"{path}: refused: its aliases expand to more than {MAX_NODES:,} values "
        "(a saved config has a few hundred; an alias bomb has billions)"
    )


def test_expansion_up_to_the_bound_is_read_and_past_it_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(saved_module, "MAX_NODES", 10_000)  # the same count, a tenth of the time

    def text(n: int) -> str:
        return "a: &a [" + ", ".join(["x"] * 99) + "]\nb: [" + ", ".join(["*a"] * n) + "]\n"

    # Nodes: the top mapping, keys a and b, b's list (4), and a's list of 99 (100 each) n + 1 times.
    fits = (saved_module.MAX_NODES - 104) // 100
    assert len(read_saved_config(saved(tmp_path, text(fits)))["b"]) == fits
    assert "aliases expand to more than" in refusal(saved(tmp_path, text(fits + 1)))


def test_a_recursive_alias_is_refused(tmp_path):
    path = saved(tmp_path, "a: &a [1, *a]\n")
    assert refusal(path) == f"{path}: refused: an alias refers to a node that contains it, so it never ends"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty (no YAML document in it), so not a config"),
        ("# a comment\n\n", "empty (no YAML document in it), so not a config"),
        ("- lr\n- 0.1\n", "not a config (its top level is a list, not a mapping of keys)"),
        ("42\n", "not a config (its top level is the scalar '42', not a mapping of keys)"),
        ("~\n", "not a config (its top level is the scalar '~', not a mapping of keys)"),
    ],
)
def test_an_empty_or_non_mapping_file_is_refused_in_one_line(tmp_path, text, needle):
    path = saved(tmp_path, text)
    assert refusal(path) == f"{path}: {needle}"
    assert refusal(path, "diff.a=x") == f"diff.a=x: {needle}"  # `where` names it instead


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "optimizer: {lr: [\n",
            "not a readable config (while parsing a flow node, expected the node content, but found '<stream end>' at line 2, column 1)",
        ),
        ("lr: 1\nlr: 2\n", "not a readable config (while constructing a mapping, found duplicate key lr at line 2, column 1)"),
        (
            "a: 1\n---\nb: 2\n",
            "not a readable config (expected a single document in the stream, but found another document at line 2, column 1)",
        ),
        (
            "run: !!python/object/apply:os.system [echo hi]\n",
            "not a readable config (could not determine a constructor for the tag",
        ),
        ("path: ${data_dir}/x\n", "not a readable config (Interpolation key 'data_dir' not found, at path)"),
        (b"lr: \xff\n", "not a readable config (not UTF-8 text: byte 4)"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "refused: nested too deeply to be a config"),
    ],
    ids=["unclosed", "duplicate_key", "two_documents", "python_tag", "missing_key", "not_utf8", "too_deep"],
)
def test_a_broken_file_is_refused_in_one_line_saying_where(tmp_path, text, needle):
    path = saved(tmp_path, text)
    assert refusal(path).startswith(f"{path}: {needle}")


def test_a_file_too_large_or_not_a_file_is_refused_unread(tmp_path):
    path = saved(tmp_path, "# " + "x" * MAX_BYTES + "\nlr: 1\n")
    assert refusal(path) == f"{path}: refused: larger than {MAX_BYTES:,} bytes, which no saved config is (about 5 KB)"
    assert refusal(tmp_path / "missing.yaml") == f"{tmp_path / 'missing.yaml'}: cannot read it (No such file or directory)"
    os.mkfifo(tmp_path / "fifo.yaml")  # opening it would wait for a writer forever
    assert refusal(tmp_path / "fifo.yaml") == f"{tmp_path / 'fifo.yaml'}: not a regular file, so not a saved config"


def test_carbon_reads_a_runs_chips_without_running_its_resolvers(tmp_path, monkeypatch):
    """task=carbon reads a run's saved config through the same reader."""
    from xgen.tasks.carbon import run

    monkeypatch.setenv("XGEN_TEST_CHIPS", "8")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 3600.0}))
    config = saved(tmp_path / ".hydra", "hardware: {num_devices: '${oc.env:XGEN_TEST_CHIPS}'}\n")
    out = tmp_path / "out"
    out.mkdir()
    cfg = compose_config("task=carbon", "hardware=tpu_v4_8", f"run_dir={tmp_path}")
    with pytest.raises(ConfigError) as refused:
        run(cfg, out)
    assert str(refused.value) == f"{config}: hardware.num_devices is '${{oc.env:XGEN_TEST_CHIPS}}', not a number of chips"
    config.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match=f"^{config}: refused: its aliases expand"):
        run(cfg, out)
    config.write_text("hardware: {num_devices: 16}\n")
    assert run(cfg, out)["chip_hours"] == 16


def test_the_reader_imports_no_hydra():
    """xgen.config's bottom layer: only xgen.config.store and .snapshots import Hydra."""
    code = "import sys, xgen.config.saved; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'hydra')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""
