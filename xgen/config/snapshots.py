"""Resolved snapshots of the report's runs, kept in the repository under `snapshots/`.

A change to a shared default (a stage, an optimizer, the schema) is a one-line YAML diff in
review, but what it does to each run only shows after Hydra composes them. Each snapshot
is that composition, exactly what `python -m xgen.run <overrides> --cfg job --resolve`
prints: one per `conf/experiment/` file (`experiment.<name>.yaml`) and one per pre-training
stage on the report's model and pod (`stage.<name>.yaml`: model=xgen_7b hardware=tpu_v4_512).
The change then shows up in the pull request as a diff of exactly the runs it changes.

    python -m xgen.config.snapshots            # check: exit 1 with each drifted run's key-level diff
    python -m xgen.config.snapshots --write    # rewrite them; commit the result with the change

They live outside `conf/` because every folder there is a Hydra config group: it would
become a choosable `snapshots=` option, list in `--help` and ship in the wheel. Nothing in
them varies by machine or time: the `hydra` node (run directory, `${now:...}`) is not part of
a job's config, and `data_dir` stays the relative `data` the schema gives it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from xgen.config.changes import change_line, key_changes
from xgen.config.errors import ConfigError

SNAPSHOT_DIR = Path(__file__).resolve().parents[2] / "snapshots"
# The report's pre-training stages (and s5_32k past it), each on the report's model and pod.
STAGES = ("s1_2k", "s2_4k", "s3_8k", "s4_code_8k", "s5_32k")
STAGE_SETTING = ("model=xgen_7b", "hardware=tpu_v4_512")
WRITE_COMMAND = "python -m xgen.config.snapshots --write"


def conf_dir() -> Path:
    """The config tree `python -m xgen.run` reads (`pkg://xgen.conf`)."""
    return Path(importlib.import_module("xgen.conf").__file__).parent


def runs(conf: Path) -> dict[str, list[str]]:
    """Snapshot name -> the command-line overrides that compose it."""
    named = {f"experiment.{p.stem}": [f"experiment={p.stem}"] for p in sorted((conf / "experiment").glob("*.yaml"))}
    named.update({f"stage.{stage}": [*STAGE_SETTING, f"stage={stage}"] for stage in STAGES})
    return named


def render(overrides: list[str], conf: Path) -> str:
    """The snapshot file's text: a header naming the command, then the resolved config."""
    from hydra import compose, initialize_config_dir

    from xgen.config.store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return (
        f"# python -m xgen.run {' '.join(overrides)} --cfg job --resolve\n"
        f"# Written by `{WRITE_COMMAND}`: change conf/, then rewrite; never edit by hand.\n"
        + OmegaConf.to_yaml(cfg, resolve=True)
    )


def parse(text: str, where: str) -> dict:
    """A YAML config as plain nested dicts, interpolations resolved; ConfigError if it is not one."""
    try:
        tree = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception as ex:  # noqa: BLE001 - YAML and OmegaConf errors alike: one line
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ConfigError(f"{where}: not a readable config ({first})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: not a config (its YAML is a {type(tree).__name__}, not a mapping)")
    return tree


@dataclass
class Drift:
    """A snapshot that no longer matches what conf/ composes: its name and why, one line each."""

    name: str
    lines: list[str]


def compare(name: str, stored: str | None, fresh: str | None) -> Drift | None:
    """None when the stored text is what conf/ composes now."""
    if stored == fresh:
        return None
    if stored is None:
        return Drift(name, ["new run: no snapshot yet"])
    if fresh is None:
        return Drift(name, ["no longer a run: its experiment file is gone"])
    changes = key_changes(parse(stored, name), parse(fresh, name), whole_subtrees=True)
    lines = [change_line(key, old, new) for key, (old, new) in changes.items()]
    return Drift(name, lines or ["same keys and values, different text (key order or the header)"])


def _texts(conf: Path, snapshots: Path) -> dict[str, tuple[str | None, str | None]]:
    """Name -> (the stored text, the text conf/ composes now); None for a side that has none."""
    fresh = {name: render(overrides, conf) for name, overrides in runs(conf).items()}
    stored = {p.name.removesuffix(".yaml"): p.read_text() for p in sorted(snapshots.glob("*.yaml"))}
    return {name: (stored.get(name), fresh.get(name)) for name in [*fresh, *(n for n in stored if n not in fresh)]}


def check(conf: Path | None = None, snapshots: Path = SNAPSHOT_DIR) -> list[Drift]:
    """Every snapshot that drifted from conf/, with its key-level changes (old -> new)."""
    texts = _texts(conf or conf_dir(), snapshots)
    return [d for name, (old, new) in texts.items() if (d := compare(name, old, new)) is not None]


def write(conf: Path | None = None, snapshots: Path = SNAPSHOT_DIR) -> list[Drift]:
    """Rewrite the drifted snapshots (and remove those of runs that are gone); returns what changed."""
    texts = _texts(conf or conf_dir(), snapshots)
    snapshots.mkdir(parents=True, exist_ok=True)
    drifted = []
    for name, (old, new) in texts.items():
        drift = compare(name, old, new)
        if drift is None:
            continue
        path = snapshots / f"{name}.yaml"
        if new is None:
            path.unlink()
        else:
            path.write_text(new)
        drifted.append(drift)
    return drifted


def report(drifted: list[Drift], snapshots: Path, verb: str) -> str:
    """`<verb> snapshots/stage.s3_8k.yaml:` then its changes, indented, per drifted run."""
    lines = []
    for drift in drifted:
        lines.append(f"{verb} {_shown(snapshots / f'{drift.name}.yaml')}:")
        lines.extend(f"  {line}" for line in drift.lines)
    return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xgen.config.snapshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the snapshots that drifted")
    parser.add_argument("--conf", type=Path, default=None, help="config tree (default: xgen's conf/)")
    parser.add_argument("--snapshots", type=Path, default=SNAPSHOT_DIR, help="snapshot folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if args.write:
            drifted = write(args.conf, args.snapshots)
            print(report(drifted, args.snapshots, "rewrote") if drifted else "snapshots: all up to date")
            return 0
        drifted = check(args.conf, args.snapshots)
    except (HydraException, OmegaConfBaseException, ConfigError) as ex:  # a conf/ that does not compose: one line
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        print(f"xgen: config error: {first}", file=sys.stderr)
        return 2
    if not drifted:
        print(f"snapshots: all {len(runs(args.conf or conf_dir()))} match conf/")
        return 0
    print(report(drifted, args.snapshots, "drifted"))
    print(f"{len(drifted)} snapshot(s) drifted from conf/: rewrite them with `{WRITE_COMMAND}` and commit the diff")
    return 1


if __name__ == "__main__":
    sys.exit(main())
