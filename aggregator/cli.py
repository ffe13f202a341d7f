"""Commands: ``aggregator run | broker | gen | audit`` (docs/contract.md §7).

Every failure the operator can fix ends the command with one line on stderr
(``error: ...``) and status 2 (``--debug``: the traceback too); Ctrl-C ends any
command with one line and status 130."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import click

import aggregator
from aggregator import config, config_load, process
from aggregator.logs import setup_logging

HELD_LOCKS: list[Any] = []  # the local state directories (DirLock) this process owns
ROUTES = {
    "all": "POST /v1/events, GET /metrics, /v1/snapshots, /healthz, /readyz",
    "ingest": "POST /v1/events, GET /metrics, /healthz, /readyz",
    "worker": "GET /metrics, /v1/snapshots, /healthz, /readyz",
}
PACKAGE = "clickstream-aggregator"
EXIT_USAGE = 2          # bad settings or invocation, and anything else that stops a command at start
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# the settings each command reads (its flags, AGG_* variables and TOML keys)
RUN_FIELDS: tuple[str, ...] = config.FIELDS
BROKER_FIELDS = ("broker_port", "log_level", "partitions", "topic_prefix")
KAFKA_CLIENT_FIELDS = ("broker", *(name for name in config.FIELDS if name.startswith("kafka_")))


class Failure(Exception):
    """Stops a command with its message as one ``error:`` line and status 2."""


class Interrupted(Exception):
    """SIGINT: stop with one line and status 130."""


DEBUG = {"on": False}


# ------------------------------------------------------------------ options
def _debug_option(f: Callable[..., Any]) -> Callable[..., Any]:
    def set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            DEBUG["on"] = True
        return value
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=set_debug,
                        help="show the traceback of an error")(f)


def _config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_file", metavar="FILE", default=None,
                        help=f"TOML file of settings (keys: the setting names, e.g. window_seconds = 10); "
                             f"variables and flags override it  [env: {config.CONFIG_ENV}]")(f)


def setting_help(name: str, extra: str = "") -> str:
    env = config.env_name(name)
    if name in config.Settings.SECRETS:
        env += f" or {env}_FILE"
    default = config.default_text(name) or "empty"
    return f"{config.describe(name)}{extra}  [env: {env}; default: {default}]"


def settings_options(fields: Collection[str], rename: dict[str, str] | None = None) -> Callable[..., Any]:
    """One ``--flag VALUE`` per setting: strings, validated by the model (so a bad flag
    gets the same one-line error as a bad variable)."""
    rename = rename or {}

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(list(fields)):
            decls = [rename.get(name, config.flag_name(name)), name]
            f = click.option(*decls, default=None, metavar=_metavar(name), help=setting_help(name))(f)
        return f
    return deco


def _metavar(name: str) -> str:
    ann = config.Settings.model_fields[name].annotation
    if ann is float:
        return "SECONDS" if name.endswith(("seconds", "timeout")) else "NUMBER"
    return "INT" if ann is int else "TEXT"


def load_settings(kwargs: dict[str, Any], fields: Collection[str]) -> config.Settings:
    """The command's settings from its flags (popped from ``kwargs``), the environment and
    the TOML file; Failure lines are printed by ``main``."""
    flags = {name: kwargs.pop(name) for name in list(kwargs) if name in config.Settings.model_fields}
    try:
        settings = config_load.load(flags, config_file=kwargs.pop("config_file", None), only=fields,
                                    strict_env=True)
        if "kafka_security_protocol" in fields:
            settings.kafka_security()  # TLS files readable, SASL complete: checked before anything starts
        return settings
    except config.SettingsError as exc:
        raise Failure(*exc.lines) from None


# ------------------------------------------------------------------ commands
class Group(click.Group):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_paragraph()
        formatter.write_text("Settings: AGG_* variables, flags, or a TOML file (--config); docs/contract.md §7.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name=PACKAGE, prog_name="aggregator", message="%(prog)s %(version)s")
@_debug_option
def cli() -> None:
    """Windowed click-stream aggregation on Kafka: run the service, an embedded broker,
    a synthetic generator, or the audit of its output."""


@cli.command("run", context_settings={"show_default": False})
@settings_options(RUN_FIELDS)
@click.option("--print-snapshots", is_flag=True, help="print each closed window as a per-region table")
@_config_option
@_debug_option
def run_command(print_snapshots: bool, **kwargs: Any) -> int:
    """Run the service (embedded broker unless AGG_BROKER)."""
    settings = load_settings(kwargs, RUN_FIELDS)
    setup_logging(settings.log_level)
    return cmd_run(settings, print_snapshots)


@cli.command("broker")
@settings_options(BROKER_FIELDS)
@_config_option
@_debug_option
def broker_command(**kwargs: Any) -> int:
    """Run the embedded broker alone (for processes started with AGG_BROKER)."""
    settings = load_settings(kwargs, BROKER_FIELDS)
    setup_logging(settings.log_level)
    return cmd_broker(settings)


def _register_gen() -> None:
    from aggregator.gen import cli as gen_cli
    gen_cli.register(cli)


# ------------------------------------------------------------------ run, broker
def start_embedded_broker(settings: config.Settings) -> Any:
    """The embedded broker, started, and ``settings`` pointed at it with its own defaults."""
    from aggregator.broker import BrokerError, EmbeddedBroker
    try:
        broker = EmbeddedBroker(settings.broker_port).start()
    except BrokerError as exc:
        raise Failure(str(exc)) from None
    settings.broker = broker.url
    settings.for_embedded_broker()
    return broker


def cmd_broker(settings: config.Settings) -> int:
    broker = start_embedded_broker(settings)
    try:
        # the service's topics with the embedded broker's partition count: the processes
        # started against it take the broker's defaults with them
        wait_for_topics(settings)
    except BaseException:
        broker.stop()
        raise
    stop = {"signal": 0}

    def _stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"embedded broker on {broker.url} (Ctrl-C to stop)", flush=True)
    try:
        while not stop["signal"] and broker.exited() is None:
            time.sleep(0.2)
    finally:
        broker.stop()
    if stop["signal"] == signal.SIGINT:
        raise Interrupted
    if not stop["signal"]:
        raise Failure(f"the embedded broker exited with status {broker.exited()}")
    return 0


def check_port_free(host: str, port: int) -> None:
    """Failure if ``host:port`` cannot be bound now (checked before anything starts, so the
    process never says it listens where it cannot)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Failure(f"AGG_WEB_HOST / --web-host: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Failure(f"AGG_WEB_PORT / --web-port: {host}:{port} is already in use "
                              "(another process listens there)") from None
            raise Failure(f"AGG_WEB_HOST / AGG_WEB_PORT: cannot listen on {host}:{port}: {exc.strerror}") from None


@contextlib.contextmanager
def quiet_kafka_client() -> Iterator[None]:
    """aiokafka logs every failed connection attempt at ERROR; while the start waits for the
    broker those are one line at the end instead (all of them with --debug)."""
    lib = logging.getLogger("aiokafka")
    before = lib.level
    if not DEBUG["on"]:
        lib.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        lib.setLevel(before)


def wait_for_topics(settings: config.Settings) -> None:
    """Create the missing topics, waiting at most AGG_BROKER_WAIT_SECONDS for the broker."""
    from aggregator.broker import BrokerError, ensure_topics
    from aggregator.broker.oauth import URL_SETTING
    from aggregator.broker.security import TokenUnavailable

    wait = settings.broker_wait_seconds
    security = settings.kafka_security()
    errors: list[Exception] = []

    async def bounded() -> None:
        await asyncio.wait_for(ensure_topics(settings.bootstrap(), settings.partitions, retries=1_000_000,
                                             security=security,
                                             replication_factor=settings.topic_replication_factor,
                                             min_insync_replicas=settings.topic_min_insync_replicas,
                                             worker=settings.role != "ingest", errors=errors,
                                             topics=settings.topics), wait)

    with quiet_kafka_client():
        try:
            asyncio.run(bounded())
        except TimeoutError:
            e = errors[-1] if errors else None
            if isinstance(e, TokenUnavailable):  # the broker may be fine: the token is what is missing
                raise Failure(f"{e} (for {wait:g} s, AGG_BROKER_WAIT_SECONDS)") from None
            asking = getattr(security.token_provider, "asking", None)
            if asking is not None and asking():  # its first request has not been answered yet
                raise Failure(f"no answer from the OAuth token endpoint {settings.kafka_sasl_oauthbearer_token_endpoint_url} "
                              f"within {wait:g} s (AGG_BROKER_WAIT_SECONDS): check {URL_SETTING}") from None
            last = "" if e is None else f" (the last try: {e if type(e).__name__ in str(e) else f'{type(e).__name__}: {e}'})"
            raise Failure(f"AGG_BROKER: no Kafka broker answered at {settings.bootstrap()} within {wait:g} s "
                          f"(AGG_BROKER_WAIT_SECONDS){last}: is it running, is the address right, and does it "
                          "speak AGG_KAFKA_SECURITY_PROTOCOL?") from None
        except BrokerError as exc:
            raise Failure(str(exc)) from None


def cmd_run(settings: config.Settings, print_snapshots: bool = False) -> int:
    from aggregator import roles
    from aggregator.broker import BrokerError
    from aggregator.broker.embedded import MEMORY_ONLY
    from aggregator.dirlock import DirInUse, DirUnusable, lock_dirs
    from aggregator.web.starting import while_starting

    if settings.role != "all" and not settings.broker:
        raise Failure(f"--role {settings.role} needs AGG_BROKER: the embedded broker of one `aggregator run` "
                      "is not shared; start one with `aggregator broker`, or use a Kafka cluster")
    if not settings.broker and settings.kafka_security_protocol != "PLAINTEXT":
        raise Failure("AGG_KAFKA_SECURITY_PROTOCOL needs AGG_BROKER: the embedded broker speaks PLAINTEXT only")
    from aggregator import tracing
    try:
        tracing.config_from_env()  # bad OTEL_* settings fail here, before anything starts
    except tracing.TracingError as exc:
        raise Failure(str(exc)) from None
    if not settings.broker and settings.broker_port and settings.web_port == settings.broker_port:
        # check_port_free would find the port free: the embedded broker takes it after the check
        raise Failure(f"AGG_WEB_PORT / --web-port: {settings.web_port} is also AGG_BROKER_PORT, the embedded "
                      "broker's port: give them different ports")
    check_port_free(settings.web_host, settings.web_port)
    problem = process.open_files(settings.http_max_connections, 0 if settings.role == "ingest" else settings.max_regions)
    if problem:
        raise Failure(problem)
    process.tune_memory(settings.role)
    if settings.role != "ingest":  # the ingest role keeps nothing on disk
        try:
            HELD_LOCKS.extend(lock_dirs(settings.data_dir, settings.spill_path))  # until the process exits
        except (DirInUse, DirUnusable) as exc:
            raise Failure(f"{state_dir_setting(settings, exc.path)}: {exc}") from None
    # recorded before settings.broker becomes the embedded broker's address: the ingest
    # producer is idempotent on an external Kafka only (the embedded broker grants no
    # producer ids, and asking logs an aiokafka error at every start)
    external_broker = bool(settings.broker)
    broker = None
    waiting = f"starting: waiting for the broker and its topics (at most {settings.broker_wait_seconds:g} s)"
    try:
        with while_starting(settings.web_host, settings.web_port, waiting):  # /healthz, /readyz meanwhile
            if not settings.broker:
                broker = start_embedded_broker(settings)
                print(f"embedded broker on {broker.url}\nnote: {MEMORY_ONLY}", flush=True)
            wait_for_topics(settings)
            try:
                problem = check_partitions(settings)
            except BrokerError as exc:
                problem = str(exc)
            if external_broker and not problem:  # topics a platform team (or an earlier version) made
                from aggregator.broker.topiccheck import check_topics
                with quiet_kafka_client():
                    problem, warnings = check_topics(settings.bootstrap(), settings.kafka_security(),
                                                     settings.role != "ingest", settings.topics)
                for line in warnings:
                    print(f"warning: {line}", flush=True)
            if problem:
                raise Failure(problem)
        def announce(port: int) -> None:  # once listening: the port bound (AGG_WEB_PORT=0: a free one)
            print(f"aggregator{'' if settings.role == 'all' else f' ({settings.role})'}: HTTP on "
                  f"http://{settings.web_host}:{port} ({ROUTES[settings.role]}) "
                  f"compiled={'yes' if aggregator.NATIVE else 'no'}", flush=True)

        interrupted = note_sigint()
        try:
            roles.run(settings, print_snapshots=print_snapshots,  # exits by SystemExit
                      notes={"broker": MEMORY_ONLY} if broker else None, external_broker=external_broker,
                      announce=announce)
        except SystemExit as exc:
            if interrupted and exc.code in (0, None):
                raise Interrupted from None
            raise
        return 0
    finally:
        if broker:
            broker.stop()


def state_dir_setting(settings: config.Settings, path: Any) -> str:
    """The setting that names the local state directory ``path`` (a resolved path)."""
    from pathlib import Path
    if settings.spill_dir and Path(settings.spill_dir).resolve() == Path(path).resolve():
        return "AGG_SPILL_DIR / --spill-dir"
    return "AGG_DATA_DIR / --data-dir"


def note_sigint() -> list[bool]:
    """mode's Worker stops gracefully on SIGINT and exits 0, after a line of its own
    (``-INT- -INT- ...``); this notes the signal instead, so ``run`` ends like every command
    (one line, status 130).  The returned list holds True once SIGINT came."""
    import mode

    seen: list[bool] = []

    def on_sigint(self: mode.Worker) -> None:
        seen.append(True)
        self._schedule_shutdown(signal.SIGINT)

    mode.Worker._on_sigint = on_sigint  # type: ignore[method-assign]
    return seen


def check_partitions(settings: config.Settings) -> str | None:
    """Adopt the partition count ``clicks`` really has (it may have been created by someone
    else, or grown); refuse (a message) when the window state's changelog has another count:
    its records are keyed by partition of ``clicks``."""
    from aggregator.broker import partition_counts

    t = settings.topics  # the names behind AGG_TOPIC_PREFIX
    counts = asyncio.run(partition_counts(settings.bootstrap(), [t.clicks, t.state_changelog],
                                          security=settings.kafka_security()))
    clicks = counts.get(t.clicks)
    if clicks is None:
        return f"topic {t.clicks} has no partitions on {settings.bootstrap()}"
    if clicks != settings.partitions:
        if "partitions" in settings.model_fields_set:  # set, not the default: say it is not what is used
            print(f"note: {t.clicks} has {clicks} partitions (AGG_PARTITIONS is {settings.partitions}): using "
                  f"{clicks}", flush=True)
        settings.partitions = clicks
    changelog = counts.get(t.state_changelog)
    if settings.role != "ingest" and changelog is not None and changelog != clicks:
        return (f"{t.state_changelog} has {changelog} partitions but {t.clicks} has {clicks}: the window state is "
                f"kept per partition of {t.clicks}, so the two must match; give {t.clicks} back {changelog} "
                "partitions, or start from new state (delete the changelog topic and the consumer group "
                f"{t.app_id}) after every window has been published")
    return None


# ------------------------------------------------------------------ entry point
def _usage_line(exc: click.UsageError) -> str:
    ctx = exc.ctx
    where = ctx.command_path if ctx is not None else "aggregator"
    msg = exc.format_message()
    if isinstance(exc, click.NoSuchOption) and ctx is not None and ctx.info_name == "broker":
        name = exc.option_name.lstrip("-").replace("-", "_")
        if name in config.FIELDS:
            return (f"error: {where}: no such option: {exc.option_name}: it is a setting of `aggregator run`; "
                    f"`aggregator broker` takes {', '.join(config.flag_name(f) for f in BROKER_FIELDS)} and --config")
    return f"error: {where}: {msg[:1].lower() + msg[1:]} (see {where} --help)"


def main(argv: list[str] | None = None) -> int:
    _register_gen()
    args = sys.argv[1:] if argv is None else argv
    DEBUG["on"] = "--debug" in args
    try:
        # not cli.main(): it turns Ctrl-C into an empty line and "Aborted!"
        with cli.make_context("aggregator", list(args)) as ctx:
            rv = cli.invoke(ctx)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `aggregator`: the help
        print(exc.format_message())
        return EXIT_USAGE
    except click.UsageError as exc:
        print(_usage_line(exc), file=sys.stderr)
        return EXIT_USAGE
    except Failure as exc:
        if DEBUG["on"]:
            raise
        for line in exc.args:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, click.Abort, Interrupted):
        if DEBUG["on"]:
            raise
        print("aggregator: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit:
        raise
    except Exception as exc:  # the last resort: one line; --debug shows the traceback
        if DEBUG["on"]:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
