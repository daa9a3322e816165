"""Reading a config someone else wrote: a run's `.hydra/config.yaml`, a snapshot, a YAML file.

Such a file is input, not code, and `task=diff` or `task=carbon` may be pointed at a run
directory copied from another machine or person. Handed to OmegaConf as is, it would run:

- resolvers: `${oc.env:AWS_SECRET_ACCESS_KEY}` in the file would be resolved from *this*
  process's environment and printed by the diff, and any other registered resolver
  (`${now:...}`, `${oc.decode:...}`, a plugin's) would run on the file's say-so;
- aliases: nine lines of nested YAML anchors (the "billion laughs") expand to 9^9 nodes,
  which PyYAML builds as shared references in a blink but OmegaConf copies node by node,
  hanging the command and eating memory.

`read_saved_config` is the one way xgen reads such a file. It keeps every value that calls
a resolver literally (compared and printed as written: `${oc.env:HOME}` stays that string),
resolves only the file's own `${a.b}` interpolations (Hydra saves a run's config
unresolved, e.g. `${data_dir}/prepared/code`, so a diff against a command with another
data_dir must resolve them to be right; they read nothing outside the file), bounds the
file's size and its alias expansion before anything is built, and refuses an empty file
or one whose top level is not a mapping. Every refusal is one ConfigError line naming the
file. Hydra is not imported here: only PyYAML and OmegaConf.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf._utils import get_yaml_loader  # not public, but what OmegaConf.load reads with

from xgen.config.errors import ConfigError

# A real saved config has a few hundred nodes (keys, values, lists) and a few KB: the bounds
# leave two hundred times that, and keep the largest file accepted to seconds of parsing and
# building; alias expansion past MAX_NODES is refused before OmegaConf sees a node.
MAX_NODES = 100_000
MAX_BYTES = 1 << 20


def read_saved_config(path: Path | str, where: str | None = None) -> dict:
    """The config in the YAML file `path` as plain nested dicts, lists and scalars, read as untrusted
    input (see the module's docstring); `where` starts every error line (default: the path)."""
    path = Path(path)
    where = where or str(path)
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"{where}: not a regular file, so not a saved config")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)  # never more, whatever the file holds
    except OSError as ex:
        raise ConfigError(f"{where}: cannot read it ({ex.strerror or type(ex).__name__})") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{where}: refused: larger than {MAX_BYTES:,} bytes, which no saved config is (about 5 KB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as ex:
        raise ConfigError(f"{where}: not a readable config (not UTF-8 text: byte {ex.start})") from None
    return parse_saved_config(text, where)


def parse_saved_config(text: str, where: str) -> dict:
    """`read_saved_config` on text already in hand; `where` names its source in errors."""
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()  # the node graph: an alias is one shared node here
            if root is None:
                raise ConfigError(f"{where}: empty (no YAML document in it), so not a config")
            if not isinstance(root, yaml.MappingNode):
                kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the scalar {root.value[:40]!r}"
                raise ConfigError(f"{where}: not a config (its top level is {kind}, not a mapping of keys)")
            _check_expansion(root, where)
            tree = loader.construct_document(root)  # shares aliased objects: bounded by the check
        finally:
            loader.dispose()
    except yaml.YAMLError as ex:
        raise ConfigError(f"{where}: not a readable config ({_yaml_problem(ex)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: refused: nested too deeply to be a config") from None
    return _resolve_within(tree, where)


class _Loader(get_yaml_loader()):
    """OmegaConf's own YAML loader (as `OmegaConf.load` and Hydra read configs: `1e-4` is a
    float, a date stays a string, a duplicate key is an error). It is a SafeLoader: no tag
    builds a Python object, bar the `pathlib` paths OmegaConf writes itself (read as strings)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a graph whose tree, aliases expanded, has more than MAX_NODES nodes, or which
    holds itself (a recursive alias). Each node's expanded size is counted once, from its
    children's, so a billion-node bomb costs as many steps as its file has nodes."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the path from the root: met again below itself is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_NODES:
                raise ConfigError(
                    f"{where}: refused: its aliases expand to more than {MAX_NODES:,} values "
                    f"(a saved config has a few hundred; an alias bomb has billions)"
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(f"{where}: refused: an alias refers to a node that contains it, so it never ends")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _yaml_problem(ex: yaml.YAMLError) -> str:
    """`<context>, <problem> at line L, column C` from PyYAML's multi-line message."""
    if isinstance(ex, yaml.MarkedYAMLError) and ex.problem:
        said = ", ".join(part for part in (ex.context, ex.problem) if part)
        mark = ex.problem_mark or ex.context_mark
        return f"{said} at line {mark.line + 1}, column {mark.column + 1}" if mark else said
    first = str(ex).strip().splitlines()
    return first[0] if first else type(ex).__name__


def calls_a_resolver(value: str) -> bool:
    """Whether OmegaConf would call a resolver (`${name:...}`) anywhere in `value`, nested
    interpolations included; an escaped `\\${...}` is text and calls none."""
    if "${" not in value:
        return False
    from omegaconf import grammar_parser
    from omegaconf.errors import GrammarParseError
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    try:
        tree = grammar_parser.parse(value)
    except GrammarParseError:
        return False  # nothing OmegaConf could call: resolving it fails, as one line
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            return True
        stack.extend(getattr(node, "children", None) or ())
    return False


def _resolve_within(tree: dict, where: str) -> dict:
    """The tree with its own `${a.b}` interpolations resolved and every value that calls a
    resolver kept as written. Such a value is swapped for a placeholder OmegaConf does not
    parse (it holds no `${`), so an interpolation that points at it copies the placeholder,
    which is then swapped back: `${data_dir}/x` with data_dir `${oc.env:HOME}` reads
    `${oc.env:HOME}/x`, never the environment."""
    nonce = uuid.uuid4().hex
    literals: list[str] = []

    def hide(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hide(v) for v in value]
        if isinstance(value, str) and calls_a_resolver(value):
            literals.append(value)
            return f"\0{nonce}:{len(literals) - 1}\0"
        return value

    placeholder = re.compile(f"\0{nonce}:(\\d+)\0")

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        if isinstance(value, str) and "\0" in value:
            return placeholder.sub(lambda m: literals[int(m.group(1))], value)
        if isinstance(value, Path):  # as plain data, like every other value (JSON has no paths)
            return str(value)
        return value

    try:
        resolved = OmegaConf.to_container(OmegaConf.create(hide(tree)), resolve=True)
        return restore(resolved)
    except RecursionError:
        raise ConfigError(f"{where}: refused: nested too deeply to be a config") from None
    except Exception as ex:  # noqa: BLE001 - OmegaConf's errors (a key that is missing, a bad type): one line
        first = str(ex).strip().splitlines()
        said = first[0] if first else type(ex).__name__
        key = getattr(ex, "full_key", None)  # OmegaConf's errors name the key they failed at
        raise ConfigError(f"{where}: not a readable config ({said}{f', at {key}' if key else ''})") from None
