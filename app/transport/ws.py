"""The WebSocket endpoint ``/ws``: one Session per connection (PROTOCOL.md §2).

A session reads client frames one at a time and answers each with exactly one reply.
Each subscription is a *pump*: a task holding nothing but a cursor into the run's log,
which sends whatever is after the cursor (up to 1,000 events a frame) and then waits.
All sends go through one lock, so a reply sent before a pump is created precedes every
frame of that pump. Every pump is owned by the session's task group.

Every op reaches runs and threads through the session's Gate (its principal, fixed at the
handshake), after the connection's op rate is checked. A send that makes no progress for
the write timeout closes the connection with 4408: a client that stopped reading costs
one blocked pump, never the server's shutdown.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from app import __version__
from app.access.policy import Action, Principal
from app.config import Settings
from app.core.events import JsonObject, decode
from app.core.ids import new_connection_id
from app.core.ratelimit import TokenBucket
from app.engine.manager import RunManager
from app.engine.run import LiveRun
from app.engine.threads import ThreadChanged
from app.errors import (
    CursorOutOfRangeError,
    PayloadTooLargeError,
    RateLimitedError,
    RuncastError,
    TooManySubscriptionsError,
)
from app.transport import wire
from app.transport.edge import SUBPROTOCOL
from app.transport.gate import Gate
from app.transport.metrics import Tally

logger = logging.getLogger(__name__)

PRESENCE_INTERVAL_S = 0.25
# The send timers run in one shared, empty context: call_at would copy the current one.
_TIMERS = contextvars.Context()
CLOSE_TIMEOUT_S = 1.0  # a close frame to a client that does not read is given up after this


class _ConnectionGone(Exception):
    """The socket can no longer be written to; the session is ending."""


@dataclass(eq=False)
class _Subscription:
    run: LiveRun
    cursor: int
    presence: bool
    sent_watchers: int
    next_presence_at: float = 0.0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Session:
    """One client connection: ops in, frames out."""

    def __init__(
        self,
        websocket: WebSocket,
        manager: RunManager,
        principal: Principal,
        settings: Settings,
        *,
        tally: Tally | None = None,
    ) -> None:
        self.websocket = websocket
        self.tally = tally or Tally()  # shared by the app's sessions, for /metrics
        self.manager = manager
        self.principal = principal
        self.gate = Gate(principal, manager)
        self.connection_id = new_connection_id()
        self.max_frame_bytes = settings.max_frame_bytes
        self.max_subscriptions = settings.max_subscriptions
        self.max_thread_watches = settings.max_thread_watches
        self.max_input_bytes = settings.max_input_bytes
        self.write_timeout_s = settings.write_timeout_s
        self._bucket = TokenBucket(settings.rate, settings.rate_burst, time.monotonic())
        self._send_lock = asyncio.Lock()
        self._sender: asyncio.Task[Any] | None = None  # the task whose send is under way
        self._send_began = 0.0
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_expired = False
        self._subscriptions: dict[str, _Subscription] = {}
        self._watches: dict[str, Any] = {}
        # Thread frames, drained by a task made with the first watch_thread (most
        # connections never watch a thread and hold no queue and no task for it).
        self._outbox: asyncio.Queue[str] | None = None
        self._outbox_task: asyncio.Task[None] | None = None
        # Held while an op runs and its reply is sent: a thread frame caused by the op (a
        # run it started) waits, so the reply comes first.
        self._op_lock = asyncio.Lock()
        self._group: asyncio.TaskGroup | None = None
        self._receiving: asyncio.Task[Any] | None = None  # the task that runs serve()
        self._receive_cancelled = False
        self._gone = False

    @property
    def subscriptions(self) -> int:
        """Runs this connection is subscribed to now."""
        return len(self._subscriptions)

    # -- the connection -----------------------------------------------------------------

    async def serve(self) -> None:
        """Accept, greet, and serve ops until the client leaves or the server closes."""
        offered = self.websocket.scope.get("subprotocols", ())
        await self.websocket.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
        logger.debug("connection_id=%s connected", self.connection_id)
        # The connection's own task reads the client's frames: no task of its own for it
        # (an idle connection holds a task, its frames and its context fewer: about 1 KB).
        self._receiving = task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await self._converse()
        except asyncio.CancelledError:
            # By _close_socket (a client that did not take the close frame): the session
            # ends as if the client had left; any other cancellation goes on up.
            if not self._receive_cancelled or task is None or task.uncancel():
                raise
        finally:
            self._receiving = None
            # Attached but never pumped (the reply could not be sent): no longer watching.
            for subscription in list(self._subscriptions.values()):
                if subscription.task is None:
                    self._detach(subscription)
            for thread_id, listener in self._watches.items():
                self.manager.unwatch_thread(thread_id, listener)
            self._watches.clear()
            if self._send_timer is not None:  # it holds the session
                self._send_timer.cancel()
                self._send_timer = None
            logger.debug("connection_id=%s closed", self.connection_id)

    async def _converse(self) -> None:
        """Greet, answer ops until the client leaves, then end every pump.

        Cancellation: by ``_close_socket`` when the client does not take the close frame.
        """
        try:
            await self._send(
                wire.welcome(__version__, self.connection_id, self.principal.role.label)
            )
            await self._receive_loop()
        except _ConnectionGone:
            pass
        finally:
            if self._outbox_task is not None:
                self._outbox_task.cancel()
            for subscription in self._subscriptions.values():
                if subscription.task is not None:
                    subscription.task.cancel()

    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self._take(message)
            del message  # else held while the next is awaited, by every idle connection

    async def _take(self, message: Message) -> None:
        """One client frame: answered, or refused for its size or the op rate."""
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self.max_frame_bytes:
            await self._send(
                wire.reply_error(None, PayloadTooLargeError(size, self.max_frame_bytes))
            )
            return
        wait_s = self._bucket.take(time.monotonic())
        if wait_s:
            self.tally.rate_limited_ops += 1
            await self._send(wire.reply_error(_ref_of(data), RateLimitedError(wait_s)))
            return
        await self._handle(data)

    async def close(self, code: int = 1001, timeout_s: float = 5.0) -> None:
        """Let every pump deliver up to its run's end (for ``timeout_s``), then close with
        ``code``. Always returns within about ``timeout_s`` plus the close timeout: pumps
        still sending are cancelled, and a close frame a client will not read is given
        up on.

        Cancellation: safe; the socket is closed by the server's own teardown.
        """
        pumps = [s.task for s in self._subscriptions.values() if s.task is not None]
        if pumps and timeout_s > 0:
            await asyncio.wait(pumps, timeout=timeout_s)
        for task in pumps:
            task.cancel()
        await self._close_socket(code)

    async def _close_socket(self, code: int) -> None:
        if self._gone:
            return
        self._gone = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.websocket.close(code)
        except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
            pass
        receiving = self._receiving
        if receiving is not None and receiving is not asyncio.current_task():
            self._receive_cancelled = True
            receiving.cancel()  # a client that does not take the close frame is let go

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            if self._gone:
                raise _ConnectionGone
            # The write timeout, without asyncio.timeout's timer per send: one timer per
            # connection, armed by the first send and re-armed only while a send waits.
            self._sender = task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            self._send_began = loop.time()
            if self._send_timer is None:
                self._send_timer = loop.call_at(
                    self._send_began + self.write_timeout_s, self._check_send, context=_TIMERS
                )
            try:
                try:
                    await self.websocket.send_text(text)
                finally:
                    self._sender = None
            except asyncio.CancelledError:
                if not self._send_expired:
                    raise
                self._send_expired = False
                assert task is not None
                if task.uncancel():  # cancelled for another reason too
                    raise
                logger.info(
                    "connection_id=%s: no send progress for %.1f s; closing (4408)",
                    self.connection_id,
                    self.write_timeout_s,
                )
                await self._close_socket(4408)
                raise _ConnectionGone from None
            except (RuntimeError, OSError, WebSocketDisconnect) as exc:
                self._gone = True
                raise _ConnectionGone from exc

    def _check_send(self) -> None:
        """The send timer: a send that has waited for the write timeout is cancelled, and
        ``_send`` closes the connection with 4408. No send now: not re-armed."""
        self._send_timer = None
        sender = self._sender
        if sender is None:
            return
        loop = asyncio.get_running_loop()
        due = self._send_began + self.write_timeout_s
        if loop.time() < due:
            self._send_timer = loop.call_at(due, self._check_send, context=_TIMERS)
        else:
            self._send_expired = True
            sender.cancel()

    async def _drain_outbox(self, outbox: asyncio.Queue[str]) -> None:
        while True:
            text = await outbox.get()
            await self._op_lock.acquire()
            self._op_lock.release()
            try:
                await self._send(text)
            except _ConnectionGone:
                return

    # -- ops ----------------------------------------------------------------------------

    async def _handle(self, data: str | bytes) -> None:
        async with self._op_lock:
            await self._handle_op(data)

    async def _handle_op(self, data: str | bytes) -> None:
        ref: wire.Ref = None
        try:
            ref, op = wire.parse_op(data)
            result, after_reply = await self._dispatch(op)
        except RuncastError as exc:
            if ref is None:
                ref = _ref_of(data)
            await self._send(wire.reply_error(ref, exc))
            return
        except _ConnectionGone:
            raise
        except Exception:
            logger.exception("connection_id=%s: op failed", self.connection_id)
            error = RuncastError("internal error; the server logged it")
            await self._send(wire.reply_error(ref, error))
            return
        await self._send(wire.reply_ok(ref, result))
        if after_reply is not None:
            await after_reply()

    async def _dispatch(self, op: Any) -> tuple[JsonObject, Any]:
        """Run one op for the connection's principal; returns its result and what to do
        once the reply is sent."""
        gate = self.gate
        gate.checked = False
        result = await self._act(op, gate)
        assert gate.checked, f"op {op.op} answered without asking authorize"
        return result

    async def _act(self, op: Any, gate: Gate) -> tuple[JsonObject, Any]:
        manager = self.manager
        if isinstance(op, wire.SubscribeOp):
            return await self._subscribe(op)
        if isinstance(op, wire.StartOp):
            gate.start_in(op.thread_id)
            wire.check_input_size(op.input, self.max_input_bytes)
            if op.subscribe:
                self._check_room(None)  # before the run exists: a refusal starts nothing
            run = await manager.start(
                op.agent,
                op.input,
                thread_id=op.thread_id,
                multitask=op.multitask,
                title=op.title,
                metadata=op.metadata,
            )
            if not op.subscribe:
                return {"run": run.info()}, None
            return self._attach(run, cursor=0, presence=True, preamble=())
        if isinstance(op, wire.UnsubscribeOp):
            gate.server(Action.READ)  # only ever this connection's own subscription
            await self._unsubscribe(op.run_id)
            return {}, None
        if isinstance(op, wire.StopOp):
            run = await gate.run(op.run_id, Action.STOP)
            return manager.stop(run, by=self.connection_id), None
        if isinstance(op, wire.RespondOp):
            run = await gate.run(op.run_id, Action.RESPOND)
            manager.respond(run, op.request_id, op.value)
            return {}, None
        if isinstance(op, wire.WatchThreadOp):
            return await self._watch_thread(op.thread_id), None
        if isinstance(op, wire.UnwatchThreadOp):
            gate.server(Action.READ)  # only ever this connection's own watch
            listener = self._watches.pop(op.thread_id, None)
            if listener is not None:
                manager.unwatch_thread(op.thread_id, listener)
            return {}, None
        if isinstance(op, wire.ThreadOp):
            gate.thread_id(op.thread_id, Action.CHANGE)
            thread, started = await manager.change_thread(
                op.thread_id, wire.thread_change(op.op, op)
            )
            view = await manager.thread_view(thread)
            return {"thread": view, "run": None if started is None else started.info()}, None
        assert isinstance(op, wire.PingOp), op
        gate.server(Action.READ)
        return {"t": time.time()}, None

    async def _subscribe(self, op: wire.SubscribeOp) -> tuple[JsonObject, Any]:
        run = await self.gate.run(op.run_id, Action.READ)
        self._check_room(op.run_id)
        last = run.last_index
        preamble: list[str] = []
        if op.epoch is not None and op.epoch != run.epoch:
            # The client holds a log that a crash may have rewritten: start it over.
            preamble.append(wire.reset_frame(run.run_id, run.epoch))
            preamble.append(wire.snapshot_frame(await run.snapshot_frame(last)))
            cursor = last
        else:
            cursor = last if op.after == "latest" else int(op.after)
            if cursor > last:
                raise CursorOutOfRangeError(cursor, last)
            if op.snapshot:
                preamble.append(wire.snapshot_frame(await run.snapshot_frame(cursor)))
        await self._unsubscribe(op.run_id)
        return self._attach(run, cursor=cursor, presence=op.presence, preamble=preamble)

    def _check_room(self, run_id: str | None) -> None:
        """Raises TooManySubscriptionsError unless one more subscription (other than a
        replacement of ``run_id``'s) fits."""
        if run_id not in self._subscriptions and (
            len(self._subscriptions) >= self.max_subscriptions
        ):
            raise TooManySubscriptionsError(
                f"a connection may hold at most {self.max_subscriptions} subscriptions"
            )

    def _attach(
        self, run: LiveRun, *, cursor: int, presence: bool, preamble: Any
    ) -> tuple[JsonObject, Any]:
        """Count this connection as a watcher; the pump starts after the reply."""
        self.manager.add_watcher(run)
        subscription = _Subscription(run, cursor, presence, sent_watchers=run.watchers)
        self._subscriptions[run.run_id] = subscription
        info = run.info()

        async def after_reply() -> None:
            try:
                for frame in preamble:
                    await self._send(frame)
            finally:
                assert self._group is not None
                subscription.task = self._group.create_task(
                    self._pump(subscription), name=f"pump {run.run_id}"
                )

        return {"run": info}, after_reply

    async def _unsubscribe(self, run_id: str) -> None:
        subscription = self._subscriptions.get(run_id)
        if subscription is None:
            return
        task = subscription.task
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        else:  # attached, but its pump never started
            self._detach(subscription)

    def _detach(self, subscription: _Subscription) -> None:
        run = subscription.run
        if self._subscriptions.get(run.run_id) is subscription:
            del self._subscriptions[run.run_id]
            self.manager.remove_watcher(run)

    async def _pump(self, subscription: _Subscription) -> None:
        """Send every event after the cursor, exactly once and in order, to the run's end;
        or, if the run is deleted first, a ``deleted`` frame as the subscription's last.

        Cancellation: safe at any await; the cursor is advanced only after a send.
        """
        run = subscription.run
        try:
            while True:
                if run.deleted:
                    await self._send(wire.deleted_frame(run.run_id))
                    return
                if (
                    subscription.presence
                    and run.watchers != subscription.sent_watchers
                    and not run.ended
                ):
                    wait_s = subscription.next_presence_at - time.monotonic()
                    if wait_s <= 0:
                        subscription.sent_watchers = run.watchers
                        subscription.next_presence_at = time.monotonic() + PRESENCE_INTERVAL_S
                        await self._send(wire.presence_frame(run.run_id, run.watchers))
                else:
                    wait_s = None
                events = await run.read_page(subscription.cursor, wire.MAX_EVENTS_PER_FRAME)
                if events:
                    # Built once for every watcher that sends this page (shared_text).
                    await self._send(run.shared_text(events, wire.events_frame))
                    subscription.cursor = events[-1].index
                    self.tally.events_delivered += len(events)  # per frame, not per event
                    continue
                if run.deleted:
                    continue
                if run.ended:
                    return
                if wait_s is not None and wait_s > 0:
                    # A presence frame is due after the cooldown: wake for events only.
                    try:
                        async with asyncio.timeout(wait_s):
                            await run.wait_after(subscription.cursor, presence=False)
                    except TimeoutError:
                        pass
                else:
                    await run.wait_after(subscription.cursor, presence=subscription.presence)
        except _ConnectionGone:
            return
        finally:
            self._detach(subscription)

    async def _watch_thread(self, thread_id: str) -> JsonObject:
        thread = await self.gate.thread(thread_id, Action.READ)
        if thread_id not in self._watches:
            if len(self._watches) >= self.max_thread_watches:
                raise TooManySubscriptionsError(
                    f"a connection may watch at most {self.max_thread_watches} threads"
                )
            if self._outbox is None:
                assert self._group is not None
                self._outbox = asyncio.Queue()
                self._outbox_task = self._group.create_task(
                    self._drain_outbox(self._outbox), name="outbox"
                )
            outbox = self._outbox

            def listener(event: ThreadChanged) -> None:
                # Encoded now: the frame shows the run as it is at the change.
                outbox.put_nowait(wire.thread_frame(event))
                if event.change == "deleted":  # the thread is gone: so is the watch
                    self._watches.pop(thread_id, None)

            self._watches[thread_id] = listener
            self.manager.watch_thread(thread_id, listener)
        return {"thread": await self.manager.thread_view(thread)}


def _ref_of(data: str | bytes) -> wire.Ref:
    try:
        return wire.read_ref(decode(data))
    except ValueError:
        return None
