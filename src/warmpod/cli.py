"""The ``warmpod`` command: serve, image, doctor, keys; and run, status, cancel, logs, environments
(warmpod.terminal)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import msgspec

from warmpod import __version__, terminal
from warmpod.errors import WarmpodError

if TYPE_CHECKING:
    from warmpod.keys import KeyFile
    from warmpod.settings import Settings

# The server's modules (Podman's client among them) are imported by the commands that use them:
# `warmpod run` on a laptop should start in a fraction of the second they take, and works where
# only the client is installed (`pip install warmpod`, without the `server` extra).
SERVER_PACKAGES = frozenset(
    {"litestar", "podman", "prometheus_client", "psycopg", "psycopg_pool", "uv", "uvicorn"}
)
"""What the ``server`` extra adds that the server's commands import."""


def _progress(message: str) -> None:
    print(f"warmpod: {message}", file=sys.stderr, flush=True)


def serve(settings: Settings) -> int:
    """Build every environment's runner image if missing, then serve the API until SIGTERM or Ctrl-C."""
    import uvicorn

    from warmpod import logs
    from warmpod.environments import Environments
    from warmpod.host import image
    from warmpod.http.app import begin_drain, create_app, key_file

    log_config = logs.configure(settings.server.log_format, settings.server.log_level)
    # In JSON, every line on stderr is an object: progress too goes through the log.
    progress = _progress if settings.server.log_format == "text" else logging.getLogger("warmpod.serve").info

    key_file(settings)  # before the image build: refuse an exposed server without keys at once
    environments = Environments.load(settings)  # and a wrong environments file

    if settings.engine.url and shutil.which(settings.engine.podman) is None:
        # In the server's own container: the image must already be in the engine's storage.
        progress("no podman CLI here: expecting the runner images to be built already")
    else:
        image.build_all(settings, environments, progress)
    progress(f"serving on http://{settings.server.host}:{settings.server.port}")
    # Engine and store calls run in worker threads; a 1 ms GIL switch interval (5 ms by default)
    # keeps the event loop, and so /health and /status, answering quickly while they are busy.
    sys.setswitchinterval(0.001)
    app = create_app(settings)
    grace = settings.server.shutdown_grace
    keys: KeyFile | None = app.state.key_file
    if keys is not None:
        # The file is also read again whenever it changes; SIGHUP forces it (and says so).
        def reread(sig: int, frame: FrameType | None) -> None:
            try:
                keys.reload()
                progress(f"SIGHUP: {len(keys.current())} keys read from {keys.path}")
            except WarmpodError as exc:
                progress(f"SIGHUP: {exc}; the keys read before stay in force")

        signal.signal(signal.SIGHUP, reread)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Before uvicorn waits for open requests: blocking waiters of queued runs are answered now.
            begin_drain(app, grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        log_config=log_config,
        timeout_graceful_shutdown=math.ceil(grace),
        limit_concurrency=settings.server.max_connections,
        backlog=settings.server.backlog,
        # uvicorn believes X-Forwarded-For from loopback by default: only the proxies named are.
        proxy_headers=bool(settings.server.forwarded_allow_ips),
        forwarded_allow_ips=settings.server.forwarded_allow_ips or None,
    )
    Server(config).run()
    return 0


def manage_keys(args: argparse.Namespace, settings: Settings) -> int:
    """``warmpod keys add|list|remove``: the keys file, which the server re-reads when it changes."""
    from warmpod import keys
    from warmpod.client.webhooks import new_secret

    path_text = args.file or settings.server.api_keys_file
    if not path_text:
        print("warmpod: name the keys file: --file PATH or WARMPOD_SERVER__API_KEYS_FILE", file=sys.stderr)
        return 2
    path = Path(path_text)
    if args.keys_command == "add":
        if args.max_active is not None and args.max_active < 1:
            print("warmpod: --max-active must be at least 1", file=sys.stderr)
            return 2
        granted = keys.secret_names(args.secrets or "", "--secrets")
        reached = keys.source_names(args.sources or "", "--sources")
        named = (
            None if args.environments is None else keys.environment_names(args.environments, "--environments")
        )
        signing = (new_secret(),) if args.webhook_secret else ()
        print(
            keys.add(
                path,
                args.name,
                args.max_active,
                granted,
                reached,
                named,
                webhook=args.webhook,
                webhook_secrets=signing,
            )
        )
        if signing:
            print(signing[0])
        _progress(
            f"key {args.name!r} added to {path}; it is shown this once"
            + (", then its webhook secret" if signing else "")
        )
    elif args.keys_command == "remove":
        keys.remove(path, args.name)
        _progress(f"key {args.name!r} removed from {path}")
    else:
        for key in keys.KeyFile(path).current() if path.exists() else []:
            quota = "no limit" if key.max_active is None else f"max_active={key.max_active}"
            secrets = f"secrets={','.join(sorted(key.secrets)) or '-'}"
            sources = f"sources={','.join(sorted(key.sources)) or '-'}"
            # '*' for every environment: no environment's name can be it.
            usable = "*" if key.environments is None else ",".join(sorted(key.environments))
            # Webhook columns only for a key that has them: the listing of other keys is unchanged.
            hook = "" if key.webhook is None else f"\twebhook={key.webhook}"
            hook += "\twebhook_secret=own" if key.webhook_secrets else ""
            print(f"{key.name}\t{quota}\t{secrets}\t{sources}\tenvironments={usable}{hook}")
    return 0


def manage_images(args: argparse.Namespace, settings: Settings) -> int:
    """``warmpod image lock|build|ref [NAME]``: one environment's image, or every one's."""
    from warmpod.environments import Environments
    from warmpod.host import image

    environments = Environments.load(settings)
    chosen = list(environments) if args.environment is None else [environments.check(args.environment, None)]
    if args.image_command == "build" and args.environment is None:
        image.build_all(settings, environments, _progress)
        return 0
    for environment in chosen:
        with image.naming(environment, environments):
            if args.image_command == "ref":
                ref = image.image_ref(settings, environment)
                # One ref alone when one was asked for, or there is one: `$(warmpod image ref)` works.
                print(ref if len(chosen) == 1 else f"{environment.name} {ref}")
            elif args.image_command == "build":
                image.build_image(settings, environment, _progress)
            # Without a name, the environments that have a list to resolve; a bare lock is the image's own.
            elif args.environment is not None or image.requirements_file(settings, environment) is not None:
                image.lock_requirements(settings, environment, _progress, upgrade=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmpod", description=__doc__)
    parser.add_argument("--version", action="version", version=f"warmpod {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve the HTTP API")
    serve_cmd.add_argument("--host", help="address to listen on (WARMPOD_SERVER__HOST)")
    serve_cmd.add_argument("--port", type=int, help="port to listen on (WARMPOD_SERVER__PORT)")
    image_cmd = commands.add_parser("image", help="manage the runner image")
    image_cmds = image_cmd.add_subparsers(dest="image_command", required=True)
    image_cmds.add_parser("build", help="build the runner images (skips those built)")
    image_cmds.add_parser(
        "ref", help="print the runner image reference (with several environments, `name ref` lines)"
    )
    image_cmds.add_parser(
        "lock",
        help="resolve the requirements.in of each environment (the default's: WARMPOD_IMAGE__REQUIREMENTS) "
        "again into its hashed lock, newest versions with wheels",
    )
    for command in image_cmds.choices.values():
        command.add_argument(
            "environment",
            nargs="?",
            metavar="NAME",
            help="only this environment (WARMPOD_ENVIRONMENTS__FILE)",
        )
    commands.add_parser("doctor", help="say what this host can enforce")
    keys_cmd = commands.add_parser("keys", help="manage the API keys file (WARMPOD_SERVER__API_KEYS_FILE)")
    keys_cmds = keys_cmd.add_subparsers(dest="keys_command", required=True)
    add_cmd = keys_cmds.add_parser("add", help="create a key, print it once, and add its hash to the file")
    add_cmd.add_argument("name", help="what the key is called in logs and metrics")
    add_cmd.add_argument(
        "--max-active", type=int, metavar="N", help="runs of this key queued or running at once"
    )
    add_cmd.add_argument(
        "--secrets", metavar="A,B", help="the secrets (WARMPOD_SERVER__SECRETS_FILE) its runs may ask for"
    )
    add_cmd.add_argument(
        "--sources", metavar="a,b", help="the data sources (WARMPOD_SOURCES__FILE) its runs may reach"
    )
    add_cmd.add_argument(
        "--environments",
        metavar="a,b",
        help="the environments (WARMPOD_ENVIRONMENTS__FILE) its runs may name (default: every one)",
    )
    add_cmd.add_argument(
        "--webhook", metavar="URL", help="its runs' webhook endpoint when they name no callback_url"
    )
    add_cmd.add_argument(
        "--webhook-secret",
        action="store_true",
        help="make it a webhook signing secret of its own, printed once after the key",
    )
    keys_cmds.add_parser(
        "list", help="list the keys' names, quotas, secrets, sources and environments (never their hashes)"
    )
    remove_cmd = keys_cmds.add_parser("remove", help="remove a key: requests with it get 401 at once")
    remove_cmd.add_argument("name")
    for command in (add_cmd, keys_cmds.choices["list"], remove_cmd):
        command.add_argument(
            "--file", metavar="PATH", help="the keys file (default WARMPOD_SERVER__API_KEYS_FILE)"
        )
    webhook_cmd = commands.add_parser("webhook", help="make a webhook signing secret, or check a webhook")
    webhook_cmds = webhook_cmd.add_subparsers(dest="webhook_command", required=True)
    webhook_cmds.add_parser(
        "secret", help="print a new whsec_ secret (for WARMPOD_WEBHOOKS__SECRETS or a key's webhook_secret=)"
    )
    verify_cmd = webhook_cmds.add_parser(
        "verify", help="check a received webhook's signature and time, and print the run it carries"
    )
    verify_cmd.add_argument(
        "body", metavar="FILE", help="the request's body as received ('-': standard input)"
    )
    verify_cmd.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header; give webhook-id, webhook-timestamp and webhook-signature",
    )
    verify_cmd.add_argument(
        "--secret-env",
        default="WARMPOD_WEBHOOK_SECRET",
        metavar="NAME",
        help="the variable holding the whsec_ secret, or several comma-separated (WARMPOD_WEBHOOK_SECRET)",
    )
    terminal.add_commands(commands)
    return parser


def _webhook(args: argparse.Namespace) -> int:
    """``warmpod webhook secret`` and ``warmpod webhook verify``: a receiver's tools, no server needed."""
    from warmpod.client import webhooks

    if args.webhook_command == "secret":
        print(webhooks.new_secret())
        return 0
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"warmpod: set {args.secret_env} to the webhook secret (whsec_...)", file=sys.stderr)
        return 2
    headers = dict(line.partition(":")[::2] for line in args.header)
    body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
    try:
        event = webhooks.verify(secret.split(","), body, {k.strip(): v.strip() for k, v in headers.items()})
    except (webhooks.WebhookVerificationError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"warmpod: the webhook is not genuine: {exc}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(event.data).decode())
    return 0


def _server_command(args: argparse.Namespace, settings: Settings) -> int:
    """serve, keys, image or doctor: the commands run on the server's host."""
    if args.command == "serve":
        return serve(settings)
    if args.command == "keys":
        return manage_keys(args, settings)
    if args.command == "image":
        return manage_images(args, settings)
    from warmpod.host import doctor

    return doctor.main(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``warmpod`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "webhook":
        return _webhook(args)
    if args.command in terminal.COMMANDS:
        try:
            return terminal.main(args)
        except KeyboardInterrupt:
            return 130
    from warmpod.settings import from_env

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        server: dict[str, object] = {}
        if getattr(args, "host", None):
            server["host"] = args.host
        if getattr(args, "port", None) is not None:
            server["port"] = args.port
        settings = from_env(server=server) if server else from_env()
        return _server_command(args, settings)
    except WarmpodError as exc:
        print(f"warmpod: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_PACKAGES:
            raise
        print(
            f"warmpod: `warmpod {args.command}` needs the server's packages ({exc.name} is not installed): "
            "pip install 'warmpod[server]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
