"""`GenerationManager`: spreads requests over generation servers (one per generation sub-mesh)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from jaxrlhf.generation.server import GenerationServer, RequestHandle
from jaxrlhf.generation.types import RequestOutput, SamplingParams
from jaxrlhf.models.transformer import Params


class GenerationManager:
    """Least-loaded routing, fan-out weight updates and health over several servers."""

    def __init__(self, servers: Sequence[GenerationServer]):
        if not servers:
            raise ValueError("GenerationManager needs at least one GenerationServer.")
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be unique; got {names}.")
        self.servers = list(servers)
        self._lock = threading.Lock()
        self._owner: dict[str, GenerationServer] = {}

    def submit(
        self, prompt_ids: Any, params: SamplingParams, request_id: str | None = None
    ) -> RequestHandle:
        """Send a request to the live server with the fewest queued + running sequences."""
        with self._lock:
            live = [s for s in self.servers if s.health()["alive"]] or self.servers
            server = min(live, key=lambda s: (s.load(), self.servers.index(s)))
            handle = server.submit(prompt_ids, params, request_id)
            self._owner[handle.request_id] = server
        handle.add_done_callback(lambda h: self._forget(h.request_id, server))
        return handle

    def _forget(self, request_id: str, server: GenerationServer) -> None:
        with self._lock:
            if self._owner.get(request_id) is server:
                del self._owner[request_id]

    def generate(
        self, prompts: list[Any], params: SamplingParams, timeout: float | None = None
    ) -> list[RequestOutput]:
        """Submit all prompts, drive servers without a thread, and wait for every result."""
        handles = [self.submit(p, params) for p in prompts]
        for server in self.servers:
            if not server.threaded:
                server.run_until_idle()
        return [h.result(timeout) for h in handles]

    def update_weights(self, params: Params, version: int, *, wait: bool = False) -> None:
        """Give every server the new weights (each reshards them onto its own mesh)."""
        for server in self.servers:
            server.update_weights(params, version, wait=wait)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            server = self._owner.get(request_id)
        return server.abort(request_id) if server is not None else False

    def pause(self) -> None:
        for server in self.servers:
            server.pause()

    def resume(self) -> None:
        for server in self.servers:
            server.resume()

    def health(self) -> list[dict[str, Any]]:
        """One `GenerationServer.health` dict per server."""
        return [s.health() for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.close()
