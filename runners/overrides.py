"""A mistyped command-line key (`method.threshhold=0.5`) named as kbench names every unknown option.

Hydra refuses an override of a key the composed config lacks with "Could not override 'method.radius'.
To append to your config use +method.radius=2" — advice that is wrong for a typo, and that only defers
the error: with `+`, `runners.build.check_config` then refuses the key anyway. Before Hydra runs,
`unknown_override` composes the command's configs itself (one per distinct choice of config groups in
a sweep) and, when a key is unknown, says which node lacks it, what that node's target is and which
keys it has — the message `check_config` gives, so both paths read the same.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import DictConfig, OmegaConf

_NOT_OVERRIDABLE = re.compile(r"Could not override '([^']+)'")


def _is_group_choice(override: str, groups: set[str]) -> bool:
    """`method=memoir` or `method/sentences=local` (a choice in one of the config folders `groups`), not
    `method.lr=0.1` or `seed=1` (values), nor a key of no folder (`methd=memoir`, which Hydra may refuse)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return "=" in override and "." not in key and key.split("/")[0] in groups


def _jobs(overrides: Sequence[str], groups: set[str]) -> list[list[str]]:
    """The override lists of a sweep's jobs, one per distinct choice of config groups (a typo in a
    value key fails in every job alike; a key may exist for one method and not another)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    distinct: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        distinct.setdefault(tuple(o for o in job if _is_group_choice(o, groups)), job)
    return list(distinct.values())


def unknown_override(args: Sequence[str], config_dir: str | Path, config_name: str = "config") -> str | None:
    """The message for the first command-line override whose key the composed config lacks, else None.

    `args`: the command line after the script (flags such as `-m` and `hydra.*` overrides are ignored;
    a command with `--config-name`/`--config-dir` style flags is left to Hydra). Returns None whenever
    Hydra would not fail on an unknown key — on any other error too, which Hydra then reports itself.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None
    overrides = [a for a in args if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    if not any(not o.startswith(("+", "~")) and not _is_group_choice(o, groups) for o in overrides):
        return None  # only group choices and `+` additions: no key Hydra could refuse, nothing to compose
    try:
        jobs = _jobs(overrides, groups)
    except HydraException:
        return None  # malformed overrides: Hydra's own parser message is the right one
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve())):
        for job in jobs:
            try:
                compose(config_name=config_name, overrides=job)
                continue
            except ConfigCompositionException as error:
                found = _NOT_OVERRIDABLE.search(str(error))
                cause = str(error.__cause__ or "")
                if not found or "not in struct" not in cause:
                    return None
                key = found.group(1)
            rest = [o for o in job if o.split("=", 1)[0].lstrip("+~") != key]
            try:
                cfg = compose(config_name=config_name, overrides=rest)
            except HydraException:
                return None
            return _message(cfg, key, [o for o in job if _is_group_choice(o, groups)])
    return None


def _message(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return f"{key}: unknown option: {parent or 'the config'} holds no options"
    target = f" for {node._target_}" if "_target_" in node else ""
    known = sorted(k for k in node.keys() if not str(k).startswith("_"))
    return f"{key}: unknown option{target}; known options: {known}" + (f" (with {' '.join(choices)})" if choices else "")
