"""task=diff: what differs between two resolved configs, key by key, grouped by config group.

    python -m xgen.run task=diff diff.a=outputs/pretrain/<time> diff.b=outputs/pretrain/<time>   # two runs
    python -m xgen.run task=diff diff.a=outputs/pretrain/<time> optimizer.lr=1e-4   # a run vs this command
    python -m xgen.run task=diff diff.a=stage.s3_8k model=xgen_7b hardware=tpu_v4_512 stage=s3_8k optimizer.lr=1e-4

Each side is a run directory (its `.hydra/config.yaml`), a snapshot's name (`snapshots/<name>.yaml`),
a YAML file, or, left out, the config this very command composes (its own `task` and `diff`
keys aside). Between two run directories their provenance.json files are compared too. Only
differences are printed (`diff.json=true`: one JSON object); the exit code says whether there
were any: 0 equal, 1 different (usable in CI), 2 bad input (one line).

A file may be someone else's run, so it is read as data (xgen/config/saved.py): its own
`${a.b}` interpolations are resolved, but no resolver runs (`${oc.env:HOME}` is compared and
printed as written), and an alias bomb, an empty file or a top level that is not a mapping
is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xgen.config import ConfigError, XGenConfig
from xgen.config.changes import ABSENT, change_line, key_changes
from xgen.config.saved import read_saved_config

# Never compared: the diff task's own settings, and Hydra's node should a YAML carry it.
SKIPPED = ("diff", "hydra")


@dataclass
class Side:
    """One of the two configs: what it is (for the reader), the config, its run's provenance."""

    label: str
    config: dict
    provenance: dict | None = None
    composed_now: bool = False


@dataclass
class DiffResult:
    """The differences (key -> (a's value, b's value), ABSENT for a missing key); `exit_code`
    is what `python -m xgen.run` exits with."""

    a: str
    b: str
    config: dict[str, tuple[Any, Any]]
    provenance: dict[str, tuple[Any, Any]] | None

    @property
    def equal(self) -> bool:
        return not self.config and not self.provenance

    @property
    def exit_code(self) -> int:
        return 0 if self.equal else 1


def _command_overrides() -> list[str]:
    """This command's overrides, less those that only set up the diff."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called outside a Hydra app (tests compose their own)
        return []
    return [o for o in overrides if not o.lstrip("+~").startswith(("task=", "task.", "diff.", "diff="))]


def this_command(cfg: XGenConfig) -> Side:
    """The config this command composed (task=diff and its diff.* settings included)."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    overrides = _command_overrides()
    return Side(f"this command ({' '.join(overrides) or 'no overrides'})", tree, composed_now=True)


def _read_provenance(run_dir: Path, where: str) -> dict | None:
    from xgen import provenance

    try:
        return provenance.read(run_dir)
    except (json.JSONDecodeError, UnicodeDecodeError) as ex:
        raise ConfigError(f"{where}: {run_dir / provenance.FILE} is not JSON ({ex})") from None


def load_side(spec: str, where: str) -> Side:
    """A run directory, a YAML file or a snapshot's name; ConfigError naming `where` otherwise.
    Each is read by `read_saved_config`: someone else's run may be diffed, so no resolver in
    it runs (an `${oc.env:...}` is compared as written, never as this machine's secret) and
    an alias bomb, an empty file or a list is refused in one line."""
    from xgen.config.snapshots import SNAPSHOT_DIR

    path = Path(spec)
    if path.is_dir():
        saved = path / ".hydra" / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"{where}={spec}: no .hydra/config.yaml there, so not a run directory")
        return Side(f"run {spec}", read_saved_config(saved, f"{where}={saved}"), _read_provenance(path, f"{where}={spec}"))
    if path.is_file():
        return Side(f"file {spec}", read_saved_config(path, f"{where}={spec}"))
    snapshot = SNAPSHOT_DIR / f"{spec.removesuffix('.yaml')}.yaml"
    if "/" not in spec and snapshot.is_file():
        return Side(f"snapshot {snapshot.stem}", read_saved_config(snapshot, f"{where}={spec}"))
    names = ", ".join(sorted(p.stem for p in SNAPSHOT_DIR.glob("*.yaml"))) or f"none in {SNAPSHOT_DIR}"
    raise ConfigError(f"{where}={spec}: no such run directory, YAML file or snapshot (snapshots: {names})")


def compare(a: Side, b: Side) -> DiffResult:
    """Key-level differences; the config this command composes is compared without `task`
    (it is task=diff by construction); provenance only between two run directories."""
    skipped = (*SKIPPED, "task") if a.composed_now or b.composed_now else SKIPPED
    kept = lambda tree: {k: v for k, v in tree.items() if k not in skipped}  # noqa: E731
    config = key_changes(kept(a.config), kept(b.config), whole_subtrees=True)
    provenance = None
    if a.provenance is not None and b.provenance is not None:
        provenance = key_changes({"provenance": a.provenance}, {"provenance": b.provenance}, whole_subtrees=True)
    return DiffResult(a.label, b.label, config, provenance)


def grouped(changes: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Changes by config group (the key's first part), in config order."""
    groups: dict[str, dict[str, tuple[Any, Any]]] = {}
    for key, change in changes.items():
        groups.setdefault(key.split(".")[0], {})[key] = change
    return groups


def as_text(result: DiffResult) -> str:
    lines = [f"a: {result.a}", f"b: {result.b}"]
    for group, changes in grouped(result.config).items():
        lines.append(f"{group}:")
        lines.extend(f"  {change_line(key, old, new)}" for key, (old, new) in changes.items())
    if result.provenance:
        lines.append("provenance (not config: what ran it):")
        lines.extend(f"  {change_line(key, old, new)}" for key, (old, new) in result.provenance.items())
    n, p = len(result.config), len(result.provenance or {})
    lines.append("equal" if result.equal else f"{n} config key(s) differ" + (f", {p} provenance key(s)" if p else ""))
    return "\n".join(lines)


def _entries(changes: dict[str, tuple[Any, Any]]) -> list[dict]:
    """[{key, a, b}], leaving out the side that lacks the key."""
    return [
        {"key": key, **({} if old is ABSENT else {"a": old}), **({} if new is ABSENT else {"b": new})}
        for key, (old, new) in changes.items()
    ]


def as_json(result: DiffResult) -> str:
    return json.dumps(
        {
            "a": result.a,
            "b": result.b,
            "equal": result.equal,
            "config": {group: _entries(changes) for group, changes in grouped(result.config).items()},
            "provenance": None if result.provenance is None else _entries(result.provenance),
        },
        indent=1,
    )


def run(cfg: XGenConfig, run_dir: Path) -> DiffResult:
    if cfg.diff.a is None and cfg.diff.b is None:
        raise ConfigError(
            "task=diff needs diff.a=<run directory | snapshot name | YAML file>; "
            "diff.b is the same, or left out: this command's config"
        )
    a = load_side(cfg.diff.a, "diff.a") if cfg.diff.a is not None else this_command(cfg)
    b = load_side(cfg.diff.b, "diff.b") if cfg.diff.b is not None else this_command(cfg)
    result = compare(a, b)
    print(as_json(result) if cfg.diff.json else as_text(result))
    return result
