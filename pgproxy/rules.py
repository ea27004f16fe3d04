"""The policy files in ``rules/``: schema, loading, merging and file:line errors.

Every ``*.yaml`` file in the rules directory is read and merged (lists are concatenated,
mappings are merged; the same key defined twice is an error naming both places). Unknown keys
are errors. Validation failures are reported as ``RulesError`` carrying ``file:line`` and the
reason, which is what ``pgproxy rules check`` prints.

Nothing here touches the network or the clock: loading is a pure function of the files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HoldClass = Literal["ddl", "privilege", "bulk_export", "write", "write_unbounded"]

#: The tags the built-in catalog knows (HIPAA Safe Harbor identifiers plus free text).
BUILTIN_TAGS: frozenset[str] = frozenset(
    {
        "name",
        "address",
        "geo",
        "zip",
        "dob",
        "date",
        "age",
        "phone",
        "fax",
        "email",
        "ssn",
        "mrn",
        "health_plan_id",
        "account_number",
        "license_number",
        "vehicle_id",
        "device_id",
        "url",
        "ip_address",
        "biometric",
        "photo",
        "unique_id",
        "free_text",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Identity(_Strict):
    """A name that logs in with a password (or SCRAM verifier) held in the rules or the env."""

    name: str = Field(min_length=1, max_length=63)
    password: str | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> _Identity:
        if (self.password is None) == (self.password_env is None):
            raise ValueError("give exactly one of 'password' or 'password_env'")
        return self

    def secret(self, environ: Mapping[str, str] | None = None) -> str:
        """The password or SCRAM verifier; raises RulesError if the env variable is unset."""
        if self.password is not None:
            return self.password
        env = os.environ if environ is None else environ
        assert self.password_env is not None
        value = env.get(self.password_env)
        if value is None:
            kind = type(self).__name__.lower()
            raise RulesError(
                f"{kind} {self.name!r}: environment variable {self.password_env} is not set"
            )
        return value


class Agent(_Identity):
    """An AI agent identity: the Postgres user name it connects with and its secret."""

    approvers: tuple[str, ...] | None = None
    owner: str | None = None
    profile: Literal["safe_harbor", "pseudonymous"] = "safe_harbor"


class Analyst(_Identity):
    """A read-only audit analyst: connects to the ``audit`` database over the wire."""


class MaskSpec(_Strict):
    """A per-tag operator override: a presidio-anonymizer operator name and its parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    operator: str

    @field_validator("operator")
    @classmethod
    def _reachable(cls, v: str) -> str:
        if v in {"keep", "decrypt", "deanonymize"}:
            raise ValueError(f"operator {v!r} would pass PHI through and cannot be used for a tag")
        return v

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Approvals(_Strict):
    approvers: tuple[str, ...] = ()
    hold: tuple[HoldClass, ...] = ("ddl", "privilege", "bulk_export")
    bulk_export_rows: int = Field(default=1000, ge=0)
    quorum: int = Field(default=1, ge=1)
    timeout_seconds: float = Field(default=900, gt=0)
    reply: Literal["wait", "error"] = "wait"


class Rules(_Strict):
    """The merged policy."""

    agents: tuple[Agent, ...] = ()
    analysts: tuple[Analyst, ...] = ()
    tags: dict[str, str] = Field(default_factory=dict)
    masking: dict[str, MaskSpec] = Field(default_factory=dict)
    approvals: Approvals = Approvals()
    notify_channels: tuple[str, ...] = ()
    equality_lookup_tags: tuple[str, ...] = ()

    @field_validator("tags")
    @classmethod
    def _tags_known(cls, v: dict[str, str]) -> dict[str, str]:
        for column, tag in v.items():
            if column.count(".") not in (1, 2):
                raise ValueError(f"{column!r}: expected [schema.]table.column")
            if tag not in BUILTIN_TAGS:
                raise ValueError(f"{column!r}: unknown tag {tag!r}")
        return v

    @field_validator("masking")
    @classmethod
    def _masking_known(cls, v: dict[str, MaskSpec]) -> dict[str, MaskSpec]:
        for tag in v:
            if tag not in BUILTIN_TAGS:
                raise ValueError(f"unknown tag {tag!r}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Rules:
        seen: set[str] = set()
        idents: list[_Identity] = [*self.agents, *self.analysts]
        for ident in idents:
            if ident.name in seen:
                raise ValueError(f"identity {ident.name!r} is defined twice")
            seen.add(ident.name)
        return self

    def agent(self, name: str) -> Agent | None:
        return next((a for a in self.agents if a.name == name), None)

    def analyst(self, name: str) -> Analyst | None:
        return next((a for a in self.analysts if a.name == name), None)

    def approvers_for(self, agent: str) -> tuple[str, ...]:
        a = self.agent(agent)
        if a is not None and a.approvers is not None:
            return a.approvers
        return self.approvals.approvers


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class RulesError(Exception):
    """A problem in the rules, with the place it was found when known."""

    def __init__(self, reason: str, where: Location | None = None) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where


_TOP_LISTS = {"agents", "analysts", "notify_channels", "equality_lookup_tags"}
_TOP_MAPS = {"tags", "masking", "approvals"}


def _plain(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _line_of(node: yaml.Node, path: Sequence[str | int]) -> int:
    """The 1-based line of the deepest node reachable by ``path``."""
    for key in path:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
            if nxt is None:
                nxt = next((k for k, _ in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
    return node.start_mark.line + 1


def load_rules(
    directory: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Rules:
    """Read, merge and validate every ``*.yaml`` in ``directory``.

    Raises RulesError with ``file:line`` on the first problem."""
    root = Path(directory)
    if not root.is_dir():
        raise RulesError(f"rules directory {str(root)!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())
    if not files:
        raise RulesError(f"no *.yaml files in rules directory {str(root)!r}")
    merged: dict[str, Any] = {}
    # where each top-level entry came from, for error lines: key -> list of (file, node)
    origins: dict[str, list[tuple[str, yaml.Node]]] = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            raise RulesError(
                f"invalid YAML: {getattr(exc, 'problem', exc)}", Location(path.name, line)
            ) from None
        if node is None:
            continue
        if not isinstance(node, yaml.MappingNode):
            raise RulesError(
                "the top level must be a mapping", Location(path.name, node.start_mark.line + 1)
            )
        for key_node, value_node in node.value:
            key = key_node.value
            where = Location(path.name, key_node.start_mark.line + 1)
            if key not in _TOP_LISTS | _TOP_MAPS:
                raise RulesError(f"unknown key {key!r}", where)
            value = _plain(value_node)
            if value is None:
                continue
            if key in _TOP_LISTS:
                if not isinstance(value, list):
                    raise RulesError(f"{key!r} must be a list", where)
                merged.setdefault(key, []).extend(value)
                origins.setdefault(key, []).extend(
                    (path.name, value_node.value[i]) for i in range(len(value))
                )
            else:
                if not isinstance(value, dict):
                    raise RulesError(f"{key!r} must be a mapping", where)
                target = merged.setdefault(key, {})
                for (sub_key_node, sub_node), (sub_key, sub_value) in zip(
                    value_node.value, value.items(), strict=True
                ):
                    if sub_key in target:
                        raise RulesError(
                            f"{key}.{sub_key} is defined more than once",
                            Location(path.name, sub_key_node.start_mark.line + 1),
                        )
                    target[sub_key] = sub_value
                    origins.setdefault(f"{key}.{sub_key}", []).append((path.name, sub_node))
                origins.setdefault(key, []).append((path.name, value_node))
    try:
        rules = Rules.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        where = _locate(loc, origins, files)
        field = ".".join(str(p) for p in loc)
        reason = err["msg"].removeprefix("Value error, ")
        raise RulesError(f"{field}: {reason}" if field else reason, where) from None
    for agent in rules.agents:
        agent.secret(environ)
    for analyst in rules.analysts:
        analyst.secret(environ)
    return rules


def _locate(
    loc: Sequence[str | int],
    origins: Mapping[str, list[tuple[str, yaml.Node]]],
    files: Sequence[Path],
) -> Location:
    if not loc:
        return Location(files[0].name, 1)
    top = str(loc[0])
    if top in _TOP_LISTS and len(loc) > 1 and isinstance(loc[1], int) and top in origins:
        entries = origins[top]
        if loc[1] < len(entries):
            file, node = entries[loc[1]]
            return Location(file, _line_of(node, list(loc[2:])))
    if top in _TOP_MAPS and len(loc) > 1 and f"{top}.{loc[1]}" in origins:
        file, node = origins[f"{top}.{loc[1]}"][0]
        return Location(file, _line_of(node, list(loc[2:])))
    if top in origins:
        file, node = origins[top][0]
        return Location(file, _line_of(node, list(loc[1:])))
    return Location(files[0].name, 1)
