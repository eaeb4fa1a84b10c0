"""The Podman boundary: the only module that imports podman-py, always called off the event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import msgspec
import requests
from podman import PodmanClient
from podman.errors import APIError, NotFound, PodmanError

from warmpod import metrics
from warmpod.errors import EngineError

T = TypeVar("T")
SIGKILL_EXIT = 137


@dataclass(frozen=True)
class EngineInfo:
    """What the Podman service says about itself and its host."""

    version: str
    api_version: str
    rootless: bool
    cgroup_version: int
    cgroup_manager: str
    oci_runtime: str
    oci_runtime_version: str = ""
    cgroup_controllers: tuple[str, ...] = ()
    """The cgroup controllers containers get (rootless: those delegated to the user)."""

    @classmethod
    def from_podman(cls, data: dict[str, Any]) -> EngineInfo:
        """The facts in Podman's info document (``GET /info``, as ``podman info --format json``)."""
        host, version = data.get("host", {}), data.get("version", {})
        runtime = host.get("ociRuntime") or {}
        return cls(
            version=version.get("Version", "?"),
            api_version=version.get("APIVersion", ""),
            rootless=bool(host.get("security", {}).get("rootless")),
            cgroup_version=2 if host.get("cgroupVersion") == "v2" else 1,
            cgroup_manager=host.get("cgroupManager", ""),
            oci_runtime=runtime.get("name", ""),
            oci_runtime_version=runtime.get("version") or "",
            cgroup_controllers=tuple(host.get("cgroupControllers") or ()),
        )

    @property
    def can_limit(self) -> bool:
        """Whether this engine applies cgroup limits (memory, pids, cpu) to containers."""
        return not (self.rootless and self.cgroup_version == 1)

    @property
    def can_pause(self) -> bool:
        """Whether this engine can freeze a container's processes."""
        return self.can_limit


class PodmanApi:
    """Podman calls for the pool, each run in a worker thread under one capacity limiter."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._local = threading.local()
        self._clients: list[PodmanClient] = []
        self._lock = threading.Lock()

    def _client(self) -> PodmanClient:
        # requests sessions are not safe to share between threads: one client per worker thread.
        client: PodmanClient | None = getattr(self._local, "client", None)
        if client is None:
            client = PodmanClient(base_url=self.url, timeout=60)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    async def _call(self, fn: Callable[[PodmanClient], T], what: metrics.PodmanCall) -> T:
        # Timed in its thread: the engine's own time, not the wait for the limiter.
        timer = metrics.PODMAN_CALL.labels(call=what)

        def work() -> T:
            started = time.perf_counter()
            try:
                return fn(self._client())
            except (APIError, PodmanError, requests.RequestException, OSError) as exc:
                raise EngineError(f"podman {what.replace('_', ' ')} failed: {exc}") from exc
            finally:
                timer.observe(time.perf_counter() - started)

        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    async def info(self) -> EngineInfo:
        """The engine's version and host facts."""

        def get(client: PodmanClient) -> EngineInfo:
            response = client.api.get("/info")
            response.raise_for_status()
            return EngineInfo.from_podman(response.json())

        return await self._call(get, "info")

    async def image_exists(self, ref: str) -> bool:
        """Whether ``ref`` is in the engine's image storage."""
        return await self._call(lambda c: bool(c.images.exists(ref)), "image_exists")

    async def create(self, spec: dict[str, Any]) -> str:
        """Create a container from a libpod spec and return its id."""

        def create(client: PodmanClient) -> str:
            response = client.api.post(
                "/containers/create",
                data=msgspec.json.encode(spec),
                headers={"content-type": "application/json"},
            )
            response.raise_for_status()
            return str(response.json()["Id"])

        return await self._call(create, "create")

    async def _post(
        self, container_id: str, action: Literal["start", "pause", "unpause"], **params: Any
    ) -> None:
        def post(client: PodmanClient) -> None:
            response = client.api.post(f"/containers/{container_id}/{action}", params=params)
            response.raise_for_status()

        await self._call(post, action)

    async def start(self, container_id: str) -> None:
        """Start a created container."""
        await self._post(container_id, "start")

    async def pause(self, container_id: str) -> None:
        """Freeze a running container."""
        await self._post(container_id, "pause")

    async def unpause(self, container_id: str) -> None:
        """Thaw a paused container."""
        await self._post(container_id, "unpause")

    async def destroy(self, container_id: str) -> None:
        """SIGKILL and remove a container with no stop grace; a missing one is already gone."""

        def destroy(client: PodmanClient) -> None:
            for attempt in range(3):
                try:
                    response = client.api.delete(
                        f"/containers/{container_id}",
                        params={"force": True, "timeout": 0, "volumes": True},
                    )
                    response.raise_for_status()
                    return
                except NotFound:
                    return
                except APIError:
                    # A container that exits while being killed makes Podman 4 answer
                    # "container state improper"; asking again removes the stopped container.
                    if attempt == 2:
                        raise
                    time.sleep(0.05)

        await self._call(destroy, "remove")

    async def update_memory(self, container_id: str, limit_bytes: int) -> None:
        """Set a running container's memory limit, swap capped at the same value."""

        def update(client: PodmanClient) -> None:
            response = client.api.post(
                f"/containers/{container_id}/update",
                data=msgspec.json.encode({"memory": {"limit": limit_bytes, "swap": limit_bytes}}),
                headers={"content-type": "application/json"},
            )
            response.raise_for_status()

        await self._call(update, "update")

    async def oom_killed(self, container_id: str, wait: float = 2.0) -> bool:
        """Whether the container's init was OOM-killed, once it has stopped (within ``wait`` s)."""

        def inspect(client: PodmanClient) -> bool:
            deadline = time.monotonic() + wait
            while True:
                response = client.api.get(f"/containers/{container_id}/json")
                response.raise_for_status()
                state = response.json().get("State", {})
                if state.get("OOMKilled"):
                    return True
                if state.get("Status") != "running":
                    # Podman 4.3 with runc on cgroup v1 never sets OOMKilled. Nothing in the
                    # container may signal the agent (PID 1, another uid, no CAP_KILL for the
                    # program) and warmpod has not killed it yet, so a SIGKILL is the OOM killer's.
                    return bool(state.get("ExitCode") == SIGKILL_EXIT)
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)

        return await self._call(inspect, "inspect")

    async def list_labelled(self, label: str) -> list[tuple[str, dict[str, str]]]:
        """Ids and labels of every container, running or not, that carries ``label``."""

        def ls(client: PodmanClient) -> list[tuple[str, dict[str, str]]]:
            response = client.api.get(
                "/containers/json",
                params={"all": True, "filters": msgspec.json.encode({"label": [label]}).decode()},
            )
            response.raise_for_status()
            return [(str(c["Id"]), dict(c.get("Labels") or {})) for c in response.json()]

        return await self._call(ls, "list")

    def close(self) -> None:
        """Close every client's connections."""
        with self._lock:
            for client in self._clients:
                client.close()  # type: ignore[no-untyped-call]
            self._clients.clear()
