"""The Gate: one principal's way to the runs and threads a route or an op acts on.

Every HTTP route and every WebSocket op gets a Gate and reaches what it touches through
it; each accessor asks ``authorize`` before it returns. A route that answered without
asking is a bug the Gate reports (``checked``), so a new route cannot forget access.
"""

from __future__ import annotations

from app.access.policy import SERVER, Action, Principal, Resource, authorize
from app.engine.manager import RunManager
from app.engine.run import LiveRun
from app.store.base import ThreadRecord


class Gate:
    def __init__(self, principal: Principal, manager: RunManager) -> None:
        self.principal = principal
        self.manager = manager
        self.checked = False

    def allow(self, action: Action, resource: Resource) -> None:
        """Raises: ForbiddenError."""
        authorize(self.principal, action, resource)
        self.checked = True

    def server(self, action: Action) -> None:
        """Raises: ForbiddenError."""
        self.allow(action, SERVER)

    async def run(self, run_id: str, action: Action) -> LiveRun:
        """The run, once ``action`` on it is allowed. Raises: NotFoundError,
        ForbiddenError."""
        scope = self.principal.scope
        if scope is not None and scope.kind == "run" and scope.id != run_id:
            self.allow(action, Resource.run(run_id, ""))  # refused without a lookup
        run = await self.manager.get(run_id)
        self.allow(action, Resource.run(run.run_id, run.thread_id))
        return run

    def thread_id(self, thread_id: str, action: Action) -> None:
        """Allow ``action`` on a thread known by its id (the engine looks it up).
        Raises: ForbiddenError."""
        self.allow(action, Resource.thread(thread_id))

    async def thread(self, thread_id: str, action: Action) -> ThreadRecord:
        """The thread, once ``action`` on it is allowed. Raises: ForbiddenError,
        NotFoundError."""
        self.thread_id(thread_id, action)
        return await self.manager.get_thread(thread_id)

    def start_in(self, thread_id: str | None) -> None:
        """Allow starting a run in ``thread_id`` (None: a new thread, on the server)."""
        if thread_id is None:
            self.allow(Action.START, SERVER)
        else:
            self.allow(Action.START, Resource.thread(thread_id))
