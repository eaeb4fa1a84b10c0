"""`pip install warmpod` without the `server` extra: the client works, the server commands say why not."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from warmpod.cli import SERVER_PACKAGES

# Run first in a fresh interpreter: any import of a server package fails as if it were not installed.
_REFUSE = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {sorted(SERVER_PACKAGES)!r}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    """
)


def _without_server(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _REFUSE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_blocker_refuses_the_server_packages() -> None:
    """The stand-in for a missing extra works: importing the server's app fails under it."""
    done = _without_server("import warmpod.http.app")
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr


def test_client_and_its_commands_import_without_the_server_packages() -> None:
    """warmpod.client, the CLI and its client commands import and run with no server package present."""
    done = _without_server(
        """
        import sys
        import warmpod.client, warmpod.cli, warmpod.terminal
        from warmpod.cli import main

        # Port 9 on loopback: nothing listens, so the client itself must report the failure.
        code = main(["status", "some-run", "--server", "http://127.0.0.1:9"])
        assert code == warmpod.terminal.EXIT_WARMPOD, code
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_server_command_without_the_server_packages_says_which_extra() -> None:
    """`warmpod doctor` without the extra exits 1 naming `warmpod[server]`, not with a traceback."""
    done = _without_server(
        """
        import sys
        from warmpod.cli import main

        sys.exit(main(["doctor"]))
        """
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'warmpod[server]'" in done.stderr
    assert "Traceback" not in done.stderr
