"""The running service: Podman service, engine client, runner image and pool, started and stopped together."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio

from warmpod.environments import DEFAULT, Environments, EnvironmentSpec
from warmpod.errors import ImageError, SettingsError
from warmpod.host import facts, image, podman_service
from warmpod.host.enforcement import check, enforcement
from warmpod.host.podman_api import EngineInfo, PodmanApi
from warmpod.keys import KeyFile
from warmpod.models import Environment, EnvironmentInfo, Health, NodeInfo, PoolCounts, QueueCounts
from warmpod.queue.deliveries import Deliveries
from warmpod.queue.node import QueueNode
from warmpod.queue.store.base import Store
from warmpod.queue.store.postgres import PostgresStore
from warmpod.queue.store.sqlite import SqliteStore, default_path
from warmpod.sandbox.pool import Pool
from warmpod.sandbox.runner import Runner
from warmpod.sandbox.selftest import self_test
from warmpod.secrets import Secrets
from warmpod.settings import Settings
from warmpod.sources import Sources
from warmpod.webhooks.destinations import Destinations

log = logging.getLogger(__name__)


@dataclass
class Service:
    """What the API needs while the service runs."""

    settings: Settings
    image: str
    info: EngineInfo
    pool: Pool
    runner: Runner
    queue: QueueNode
    environment: Environment | None = None
    """What the runner image installed, as the start-up probe read it (``GET /environment``)."""
    secrets: Secrets = field(default_factory=lambda: Secrets(None))
    """The operator's secrets file: who may ask for what (the runner reads the values)."""
    sources: Sources = field(default_factory=lambda: Sources(None))
    """The operator's sources file: who may reach what (the runner relays them)."""
    catalogue: list[EnvironmentInfo] = field(default_factory=list)
    """Each environment with what its image recorded (``GET /environments``)."""

    @functools.cached_property
    def webhooks(self) -> Destinations:
        """Where a run's webhook may go (``WARMPOD_WEBHOOKS__ALLOW``), checked as runs are submitted."""
        return Destinations(self.settings.webhooks.allow)

    @property
    def environments(self) -> Environments:
        """The environments a run may name (the runner's, which resolves their limits)."""
        return self.runner.environments

    def health(self) -> Health:
        """The service's state for ``GET /health``."""
        stats = self.pool.stats()
        status: Literal["ok", "starting", "stopping", "unavailable"] = (
            "ok" if self.pool.serving else "starting"
        )
        # Failing now, not once: a pool that recovered is not unavailable between two refills.
        if self.pool.serving and stats.ready == 0 and stats.busy == 0 and stats.failing:
            status = "unavailable"
        if self.queue.shutdown.begun:
            status = "stopping"
        membership = self.queue.membership
        served = {name for node in membership.nodes for name in node.environments}
        unserved = {
            name: count
            for name, count in membership.queued_by_environment.items()
            if count and name not in served
        }
        return Health(
            status=status,
            image=self.image,
            podman_version=self.info.version,
            pool=PoolCounts(
                ready=stats.ready,
                busy=stats.busy,
                starting=stats.starting,
                closing=stats.closing,
                target=stats.target,
                environments=stats.environments,
            ),
            queue=QueueCounts(
                queued=self.queue.admission.queued,
                running=self.queue.workers.running,
                max_queued=self.settings.queue.max_queued,
                unserved=unserved,
            ),
            rootless=self.info.rootless,
            cgroup_version=self.info.cgroup_version,
            paused_idle=self.pool.can_pause,
            landlock_abi=self.pool.landlock_abi,
            limits=enforcement(cgroups=self.info.can_limit),
            last_error=stats.last_error,
            preload=list(self.environments.default.preload),
            preload_failed=stats.preload_failed,
            node=NodeInfo(
                name=self.queue.membership.owner.node, incarnation=self.queue.membership.owner.incarnation
            ),
            nodes=self.queue.membership.nodes,
        )


def _deliveries(settings: Settings, store: Store) -> Deliveries | None:
    """What delivers this node's share of webhooks; None when the allow-list is empty."""
    destinations = Destinations(settings.webhooks.allow)
    if not destinations.enabled:
        return None
    if not settings.webhooks.secrets:
        raise SettingsError(
            "WARMPOD_WEBHOOKS__ALLOW is set but WARMPOD_WEBHOOKS__SECRETS is empty: webhooks must be "
            "signed; give one or more whsec_ secrets (`warmpod webhook secret` makes one)"
        )
    keys = KeyFile(Path(settings.server.api_keys_file)) if settings.server.api_keys_file else None
    return Deliveries(store, settings.webhooks, destinations, None if keys is None else keys.named)


def _info(spec: EnvironmentSpec, ref: str, recorded: Environment | None) -> EnvironmentInfo:
    return EnvironmentInfo(
        name=spec.name,
        python=None if recorded is None else recorded.python,
        packages={} if recorded is None else recorded.packages,
        preload=list(spec.preload),
        min_warm=spec.min_warm,
        image=ref,
    )


async def open_store(settings: Settings) -> Store:
    """The store the settings name: PostgreSQL at ``queue.store_url``, else the SQLite file.

    Raises:
        StoreError: it cannot be opened.
    """
    if settings.queue.store_url:
        return await PostgresStore.open(settings.queue.store_url, lease=settings.node.lease)
    return await SqliteStore.open(Path(settings.queue.store_path or default_path()))


@contextlib.asynccontextmanager
async def run_service(settings: Settings) -> AsyncIterator[Service]:
    """Start everything the service needs, yield it, and remove all of it on exit.

    Raises:
        SettingsError: the secrets file cannot be read, is malformed or may be read by others, or
            the sources or environments file cannot be read or is malformed.
        EngineError: Podman cannot be reached.
        ImageError: the runner image of an environment has not been built (it is named).
    """
    environments = Environments.load(settings)
    secrets = Secrets(Path(settings.server.secrets_file) if settings.server.secrets_file else None)
    sources = Sources(Path(settings.sources.file) if settings.sources.file else None)
    state = podman_service.state_dir(settings.engine)
    try:
        async with podman_service.running(settings.engine, state) as podman:
            podman_api = PodmanApi(podman.url, settings.engine.api_concurrency)
            try:
                info = await podman_api.info()
                unenforced = check(
                    enforcement(cgroups=info.can_limit), allow_unenforced=settings.limits.allow_unenforced
                )
                if unenforced:
                    log.warning("starting with limits nothing enforces: %s", ", ".join(unenforced))
                refs = []
                for spec in environments:
                    ref = image.image_ref(settings, spec)
                    if not await podman_api.image_exists(ref):
                        raise ImageError(
                            f"the runner image {ref} of the environment {spec.name!r} is missing: "
                            f"run `warmpod image build {spec.name}`"
                        )
                    refs.append((spec, ref))
                if not info.can_pause:
                    log.warning("idle containers stay running: rootless Podman on cgroup v1 cannot pause")
                userns = facts.own_user_namespaces(settings, rootless=info.rootless)
                pool = Pool(
                    settings,
                    podman_api,
                    environments=refs,
                    state_dir=state,
                    instance=uuid.uuid4().hex,
                    can_pause=info.can_pause,
                    can_limit=info.can_limit,
                    userns=userns,
                )
                store = await open_store(settings)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(podman.keep_alive)
                        await tg.start(pool.serve)
                        runner = Runner(pool, environments, settings.files, secrets, sources)
                        # /health stays 503 until a real sandbox of each environment has shown
                        # every layer on.
                        recorded = {
                            spec.name: await self_test(
                                pool,
                                runner,
                                settings,
                                spec,
                                cgroups=info.can_limit,
                                userns=userns or info.rootless,
                            )
                            for spec, _ in refs
                        }
                        catalogue = [_info(spec, ref, recorded[spec.name]) for spec, ref in refs]
                        log.info(
                            "self-test passed in %s: no network, read-only root, non-root, limits on",
                            ", ".join(environments.names),
                        )
                        workers = settings.queue.workers or settings.pool.bounds[1]
                        queue = QueueNode(
                            store,
                            pool,
                            runner,
                            settings.queue,
                            workers,
                            settings.files,
                            settings.node,
                            _deliveries(settings, store),
                        )
                        await tg.start(queue.serve)
                        yield Service(
                            settings,
                            refs[0][1],
                            info,
                            pool,
                            runner,
                            queue,
                            recorded[DEFAULT],
                            secrets,
                            sources,
                            catalogue,
                        )
                        await queue.workers.drain(settings.server.shutdown_grace)
                        tg.cancel_scope.cancel()
                finally:
                    await store.aclose()
            finally:
                podman_api.close()
    finally:
        if not settings.engine.state_dir:
            shutil.rmtree(state, ignore_errors=True)
