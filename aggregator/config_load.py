"""Loading the settings model (aggregator/config.py): ``load()`` reads, highest first, the
command's flags, the ``AGG_*`` environment (secrets also from ``AGG_<NAME>_FILE``), an
optional TOML file (``--config`` / ``AGG_CONFIG``, keys are the field names) and the
defaults, and validates the result before anything starts; with it, the pydantic-settings
sources it gives the model and the error lines: every problem becomes one line naming the
variable and the flag (``SettingsError.lines``), and secret values never appear in them."""
from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

from aggregator.config import (
    CONFIG_ENV,
    ENV_PREFIX,
    FIELDS,
    LOAD_SOURCES,
    Settings,
    SettingsError,
    env_name,
    flag_name,
)

LOG_FORMAT_ENV = "AGG_LOG_FORMAT"  # read by aggregator.logs: json (the default) or text
LOG_FORMATS = ("json", "text")
NATIVE_ENV = "AGG_NATIVE"  # read by aggregator/__init__.py: off, 0 or false runs the compiled modules' sources
# AGG_* names that are not settings but are read elsewhere: the settings file, the log
# format, the compiled hot path's switch, the secrets' _FILE forms; and, by prefix, the
# test suite's and the benchmarks'
NOT_SETTINGS = frozenset({CONFIG_ENV, LOG_FORMAT_ENV, NATIVE_ENV, *(env_name(n) + "_FILE" for n in Settings.SECRETS)})
NOT_SETTINGS_PREFIXES = ("AGG_TEST_", "AGG_BENCH_")


def log_format(value: str | None) -> str:
    """``AGG_LOG_FORMAT``'s value, lower-cased (json when unset); ValueError when it is neither."""
    fmt = (value or "json").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV}: expected json or text (got {value!r})")
    return fmt


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One line per ``AGG_*`` variable of ``env`` that nothing reads (a typo such as
    ``AGG_WINDOW_SECOND`` would otherwise be ignored), naming the closest known name;
    and a bad ``AGG_LOG_FORMAT``."""
    known = {env_name(n) for n in FIELDS} | NOT_SETTINGS
    out = []
    for var in sorted(env):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        # compared without the prefix, which every name shares (it made any name look close)
        close = difflib.get_close_matches(upper[len(ENV_PREFIX):], sorted(k[len(ENV_PREFIX):] for k in known), n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        out.append(f"{var}: no such setting{hint}; the settings are listed in docs/contract.md §7")
    if LOG_FORMAT_ENV in env:
        try:
            log_format(env[LOG_FORMAT_ENV])
        except ValueError as exc:
            out.append(str(exc))
    return out


def names(name: str) -> str:
    """``AGG_WEB_PORT / --web-port``: how every problem names its setting."""
    return f"{env_name(name)} / {flag_name(name)}"


class _Env(EnvSettingsSource):
    """``AGG_*`` from ``env`` (not necessarily ``os.environ``)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._given.items()}


def _secret_files(env: Mapping[str, str], problems: list[str]) -> dict[str, str]:
    """``AGG_<NAME>_FILE``: the file's content (one trailing newline stripped) is the value."""
    out: dict[str, str] = {}
    for name in sorted(Settings.SECRETS):
        var = env_name(name) + "_FILE"
        path = env.get(var)
        if path is None:
            continue
        if env_name(name) in env:
            problems.append(f"{env_name(name)} / {var}: set one of them, not both")
            continue
        try:
            text = Path(path).read_text()
        except OSError as exc:
            problems.append(f"{var}: cannot read {path!r}: {exc.strerror or exc}")
            continue
        out[name] = text[:-1] if text.endswith("\n") else text
        if out[name].endswith("\r"):
            out[name] = out[name][:-1]
    return out


def _toml(settings_cls: type[BaseSettings], path: str | None, problems: list[str]) -> PydanticBaseSettingsSource | None:
    if not path:
        return None
    if not Path(path).is_file():
        problems.append(f"{CONFIG_ENV} / --config: no such file {path!r}")
        return None
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=Path(path))
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{CONFIG_ENV} / --config: {path} is not valid TOML: {exc}")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{CONFIG_ENV} / --config: cannot read {path!r}: {exc}")
    return None


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         config_file: str | None = None, only: Collection[str] | None = None,
         strict_env: bool = False) -> Settings:
    """Flags (non-None values, by field name), over ``AGG_*`` (and ``AGG_<NAME>_FILE``),
    over the TOML file (``config_file``, else ``AGG_CONFIG``), over the defaults.

    ``only``: the fields the command uses; the environment and the TOML file are read for
    those alone (the others keep their defaults), so ``aggregator broker`` is not stopped
    by a bad ``AGG_WINDOW_SECONDS`` it never uses.  ``strict_env`` (the commands): an
    ``AGG_*`` variable that is no setting of any command is a problem too
    (``unknown_variables``).  Raises SettingsError."""
    env = os.environ if env is None else env
    keep = set(FIELDS if only is None else only)
    problems: list[str] = unknown_variables(env) if strict_env else []
    flag_values = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = set(flag_values) - set(FIELDS)
    if unknown:
        raise ValueError(f"not settings: {sorted(unknown)}")
    env_values = {k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}
    files = _secret_files(env, problems)
    if only is not None:  # variables of settings this command does not use are not read
        env_values = {k: v for k, v in env_values.items() if k.upper()[len(ENV_PREFIX):].lower() in keep}
        files = {k: v for k, v in files.items() if k in keep}
    path = config_file or env.get(CONFIG_ENV) or None

    def sources(cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        out: list[PydanticBaseSettingsSource] = [init, InitSettingsSource(cls, files), _Env(cls, env_values)]
        toml = _toml(cls, path, problems)
        if toml is not None:
            out.append(_Only(cls, toml, keep) if only is not None else toml)
        return tuple(out)

    token = LOAD_SOURCES.set(sources)
    try:
        settings = Settings(**flag_values)
    except ValidationError as exc:
        raise SettingsError(problems + list(_lines(exc, path))) from None
    finally:
        LOAD_SOURCES.reset(token)
    if problems:
        raise SettingsError(problems)
    return settings


class _Only(PydanticBaseSettingsSource):
    """A source restricted to some fields (unknown keys still pass: they are errors)."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource,
                 keep: Collection[str]) -> None:
        super().__init__(settings_cls)
        self.inner, self.keep = inner, keep

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.inner().items() if k in self.keep or k not in FIELDS}


_SHORT = {
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "float_parsing": "expected a number",
    "float_type": "expected a number", "finite_number": "expected a finite number",
    "string_type": "expected a string", "bool_parsing": "expected true or false",
    "string_too_short": "must not be empty",
}


def _lines(exc: ValidationError, path: str | None) -> Iterator[str]:
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        name = str(loc[0]) if loc else ""
        if err["type"] == "extra_forbidden":
            yield f"{CONFIG_ENV} / --config: {path}: unknown setting {name!r}"
            continue
        kind, ctx = err["type"], err.get("ctx") or {}
        if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
            bound = _shown(next(iter(ctx.values())))
            msg = "must be a port number, 0..65535" if name.endswith("port") else f"must be {op} {bound}"
        elif kind == "literal_error":
            msg = "expected one of " + ctx.get("expected", "").replace("'", "")
        elif kind == "value_error":
            msg = str(ctx.get("error", err["msg"]))
        else:
            msg = _SHORT.get(kind, err["msg"][:1].lower() + err["msg"][1:])
        # the value is shown unless it is a secret or the message already quotes it
        quoted = "got " in msg or repr(err.get("input")) in msg or msg.startswith(("AGG_", "required with"))
        got = "" if name in Settings.SECRETS or quoted else f" (got {_shown(err.get('input'))})"
        msg = msg.removeprefix("AGG_RATE_LIMITS: ")
        yield f"{names(name)}: {msg}{got}" if name in FIELDS else f"{name}: {msg}{got}"


def _shown(value: object) -> str:
    if isinstance(value, str):
        return value if value and value.strip() == value and " " not in value else repr(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
