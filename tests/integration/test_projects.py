"""Report projects through the real service: an entrypoint among several modules, args, env and secrets."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from support.live import MAX_TIMEOUT, WarmpodServer, serving, wait_until

from warmpod import keys

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-Warehouse-DSN-9f2c"
OTHER = "t0ken-for-the-other-api-7e1"
ROTATED = "r0tated-Warehouse-DSN-41aa"


def write_secrets(path: Path, **values: str) -> None:
    """Write the secrets file as an operator would: 0600, one NAME=value a line, replaced whole."""
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"{name}={value}\n" for name, value in values.items())
    os.replace(temporary, path)


class Project:
    """One server with a keys file and a secrets file, and a client per key."""

    def __init__(self, live: WarmpodServer, secrets: Path, tokens: dict[str, str]) -> None:
        self.live = live
        self.secrets = secrets
        self.tokens = tokens

    def client(self, key: str) -> httpx.Client:
        """A client that presents ``key``."""
        headers = {"Authorization": f"Bearer {self.tokens[key]}"}
        return httpx.Client(base_url=self.live.url, headers=headers, timeout=MAX_TIMEOUT + 60)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """A server whose ``finance`` key may use WAREHOUSE_DSN and API_TOKEN, its ``intern`` none."""
    directory = tmp_path_factory.mktemp("projects")
    secrets = directory / "secrets.env"
    write_secrets(secrets, WAREHOUSE_DSN=SECRET, API_TOKEN=OTHER)
    key_file = directory / "keys"
    tokens = {
        "finance": keys.add(key_file, "finance", granted=frozenset({"WAREHOUSE_DSN", "API_TOKEN"})),
        "intern": keys.add(key_file, "intern"),
    }
    settings = {
        "WARMPOD_POOL__SIZE": "2",
        "WARMPOD_SERVER__API_KEYS_FILE": str(key_file),
        "WARMPOD_SERVER__SECRETS_FILE": str(secrets),
        "WARMPOD_SERVER__LOG_LEVEL": "debug",
    }
    with serving(directory, settings) as live:
        yield Project(live, secrets, tokens)


def files(tree: dict[str, str]) -> list[dict[str, str]]:
    """The ``files`` of a JSON request: each path with its text, base64."""
    return [
        {"path": path, "content": base64.b64encode(text.encode()).decode()} for path, text in tree.items()
    ]


PROBE = dedent(
    """
    import json, os, sys
    from report.helpers import money
    from lib.util import double
    import helpers
    print(json.dumps({
        "file": __file__, "argv": sys.argv, "cwd": os.getcwd(), "path": sys.path[:2],
        "money": money(double(21)), "sibling": helpers.__file__, "name": __name__,
        "region": os.environ.get("REGION"), "flags": sys.flags.isolated,
        "user_site": sys.flags.no_user_site,
    }))
    """
)
TREE = {
    "report/__init__.py": "",
    "report/helpers.py": "def money(x):\n    return f'${x:,.2f}'\n",
    "lib/__init__.py": "",
    "lib/util.py": "def double(x):\n    return 2 * x\n",
    "report/run.py": PROBE,
}


def test_an_entrypoint_in_a_package_runs_as_python3_path_would(project: Project) -> None:
    """A project of three modules in two packages runs its report/run.py as `python3 report/run.py`
    from /work would: __file__, argv, cwd, its own directory then the root on sys.path."""
    with project.client("finance") as client:
        response = client.post(
            "/run-json/",
            json={
                "files": files(TREE),
                "entrypoint": "report/run.py",
                "args": ["2026-11", "north europe"],
                "env": {"REGION": "emea"},
            },
        )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "succeeded", result["stderr"]
    seen = json.loads(result["stdout"])
    assert seen["file"] == "/work/report/run.py"
    assert seen["argv"] == ["report/run.py", "2026-11", "north europe"]
    assert seen["cwd"] == "/work"
    assert seen["path"] == ["/work/report", "/work"]
    assert seen["money"] == "$42.00"
    assert seen["sibling"] == "/work/report/helpers.py"
    assert seen["name"] == "__main__"
    assert seen["region"] == "emea"


def test_code_as_main_py_imports_the_projects_packages(project: Project) -> None:
    """The plain case a new user tries first: code beside report/ imports from it."""
    tree = {path: text for path, text in TREE.items() if path != "report/run.py"}
    code = "import sys\nfrom report.helpers import money\nprint(money(3), sys.argv, sys.path[0])\n"
    with project.client("finance") as client:
        response = client.post("/run-json/", json={"code": code, "files": files(tree)})
    result = response.json()
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "$3.00 ['main.py'] /work\n"


def test_a_project_posted_as_a_form_runs_the_same(project: Project) -> None:
    """/run-file/ takes the entrypoint, args and env as form fields, and no `file` part."""
    parts: list[tuple[str, Any]] = [("files", (path, text.encode())) for path, text in TREE.items()]
    data = {"entrypoint": "report/run.py", "args": ["a", "b c"], "env": ["REGION=apac"]}
    with project.client("finance") as client:
        response = client.post("/run-file/", files=parts, data=data)
    assert response.status_code == 200, response.text
    seen = json.loads(response.json()["stdout"])
    assert seen["argv"] == ["report/run.py", "a", "b c"]
    assert seen["region"] == "apac"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"env": {"1BAD": "x"}}, ["1BAD", "plain name"]),
        ({"env": {"PATH": "/tmp"}}, ["PATH", "reserved"]),
        ({"env": {"PYTHONPATH": "/tmp"}}, ["PYTHONPATH", "reserved"]),
        ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, ["LD_PRELOAD", "reserved"]),
        ({"env": {"WARMPOD_X": "1"}}, ["WARMPOD_X", "reserved"]),
        ({"env": {"OMP_NUM_THREADS": "64"}}, ["OMP_NUM_THREADS", "reserved"]),
        ({"env": {"A": "x\u0000y"}}, ["'A'", "NUL"]),
        ({"env": {"A": "x" * 40000}}, ["'A'", "at most"]),
        ({"env": {f"V{i}": "1" for i in range(65)}}, ["at most 64"]),
        ({"args": ["x"] * 300}, ["300 args", "at most 256"]),
        ({"args": ["ok", "y" * 20000]}, ["args[1]", "at most"]),
        ({"entrypoint": "../run.py"}, ["entrypoint", "'..'"]),
        ({"entrypoint": "run.sh"}, ["entrypoint", ".py"]),
        ({"entrypoint": "out/run.py"}, ["entrypoint", "out/"]),
        ({"entrypoint": "missing.py", "code": None}, ["missing.py", "not among the files"]),
        ({"secrets": ["PATH"]}, ["PATH", "reserved"]),
        ({"secrets": ["WAREHOUSE_DSN"], "env": {"WAREHOUSE_DSN": "x"}}, ["WAREHOUSE_DSN", "also in env"]),
    ],
)
def test_every_broken_rule_is_a_422_naming_it(
    project: Project, fields: dict[str, Any], words: list[str]
) -> None:
    """Bad names, reserved names, sizes and counts each get a 422 problem naming the rule and the name."""
    body: dict[str, Any] = {"code": "print(1)", **fields}
    if body["code"] is None:
        del body["code"]
    with project.client("finance") as client:
        response = client.post("/run-json/", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


LEAKY = dedent(
    """
    import os, sys, time
    value = os.environ["WAREHOUSE_DSN"]
    print("whole:", value, flush=True)
    print("err:", value, file=sys.stderr, flush=True)
    sys.stdout.write("split:" + value[:7]); sys.stdout.flush(); time.sleep(0.2)
    sys.stdout.write(value[7:] + "\\n"); sys.stdout.flush()
    # Straddling the agent's 64 KiB frames, and the store's chunks, in one write.
    sys.stdout.write("p" * (65536 - 5) + value + "q" * 10 + "\\n"); sys.stdout.flush()
    print("other:", os.environ["API_TOKEN"], "partial:", value[:5])
    """
)


def test_a_secret_reaches_the_program_masked_everywhere_and_stored_nowhere(project: Project) -> None:
    """The program gets its secrets as variables; the values are *** in stdout, stderr, the stream
    and every answer, whole or split across writes and frames, and absent from the store and the log."""
    body = {"code": LEAKY, "secrets": ["WAREHOUSE_DSN", "API_TOKEN"], "wait": False}
    with project.client("finance") as client:
        accepted = client.post("/run-json/", json=body)
        assert accepted.status_code == 202, accepted.text
        run = accepted.json()
        streamed: list[str] = []
        with connect_sse(client, "GET", run["stream_url"]) as events:
            for event in events.iter_sse():
                streamed.append(event.data)
                if event.event == "result":
                    break
        status = client.get(run["status_url"])
        answers = [accepted.text, status.text, *streamed]
    result = status.json()
    assert result["status"] == "succeeded", result["stderr"]
    stdout = result["stdout"]
    assert "whole: ***\n" in stdout
    assert "split:***\n" in stdout
    assert "p" * (65536 - 5) + "***" + "q" * 10 in stdout
    assert "other: *** partial: " + SECRET[:5] in stdout
    assert result["stderr"] == "err: ***\n"
    for text in answers:
        assert SECRET not in text
        assert OTHER not in text
    stored = b"".join(path.read_bytes() for path in project.live.log_path.parent.glob("runs-*.sqlite3*"))
    assert SECRET.encode() not in stored
    assert OTHER.encode() not in stored
    log = project.live.log_path.read_text(errors="replace")
    assert "DEBUG" in log
    assert SECRET not in log
    assert OTHER not in log


@pytest.mark.parametrize(
    ("key", "secret", "words"),
    [
        ("intern", "WAREHOUSE_DSN", ["may not use", "WAREHOUSE_DSN"]),
        ("finance", "NO_SUCH_SECRET", ["no secret named", "NO_SUCH_SECRET"]),
    ],
)
def test_a_secret_not_granted_or_unknown_is_a_403_naming_it(
    project: Project, key: str, secret: str, words: list[str]
) -> None:
    """A key without the right, or a secret the file does not hold, is a 403 problem naming the
    secret, never its value; nothing runs."""
    with project.client(key) as client:
        response = client.post("/run-json/", json={"code": "print(1)", "secrets": [secret]})
        form = client.post("/run-file/", files=[("file", ("m.py", b"print(1)"))], data={"secrets": secret})
    for answer in (response, form):
        assert answer.status_code == 403, answer.text
        problem = answer.json()
        assert problem["type"].endswith("/secret-denied")
        for word in words:
            assert word in problem["detail"]
        assert SECRET not in answer.text


def test_rotating_the_secrets_file_takes_effect_without_a_restart(project: Project) -> None:
    """A new value written to the secrets file reaches the next run, masked, with no restart."""
    code = "import os\nv = os.environ['WAREHOUSE_DSN']\nprint(v, v[:6])\n"
    try:
        write_secrets(project.secrets, WAREHOUSE_DSN=ROTATED, API_TOKEN=OTHER)
        with project.client("finance") as client:

            def rotated() -> bool:
                response = client.post("/run-json/", json={"code": code, "secrets": ["WAREHOUSE_DSN"]})
                return bool(response.json()["stdout"] == f"*** {ROTATED[:6]}\n")

            assert wait_until(rotated, timeout=30)
    finally:
        write_secrets(project.secrets, WAREHOUSE_DSN=SECRET, API_TOKEN=OTHER)
