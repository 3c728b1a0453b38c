"""A stateful property test of ``/ws`` (PROTOCOL.md §2-§4, §6): several real ``websockets``
clients send random sequences of valid and invalid ops to a real server.

Hypothesis drives a RuleBasedStateMachine in a worker thread; every step runs as a
coroutine on the test's own event loop, where the server (the ``server`` fixture) and the
clients live, so the server keeps running between steps. Each client is an
``app.chaos.Tab``: it checks every frame as it arrives (a reply per frame, in order, with
its ref; per subscription, events contiguous from the cursor, exactly once, the terminal
status last). After every step each client must still be connected and answer ``ping``;
at the end every run is stopped, every subscription must end with its terminal event and
hold exactly the run's log from its cursor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.bench.chaos import BAD_FRAMES, LIMIT_CODES, Frame, Stats, Tab, fetch_log
from tests.conftest import Server

T = TypeVar("T")

STEP_TIMEOUT_S = 20.0
MAX_TABS = 4
SETTINGS = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    database=None,  # nothing written into the working tree
    # No shrinking: a failure prints its whole program, and the test stays bounded.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)

THREAD_ERRORS = {"run_in_progress", "conflict", "bad_request", *LIMIT_CODES}


class Bridge:
    """Runs a coroutine on the test's event loop from hypothesis's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = STEP_TIMEOUT_S) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"a step took more than {timeout_s} s") from None

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the event loop: what the clients' readers change is read there."""

        async def on_loop() -> T:
            return fn()

        return self.run(on_loop())


@dataclass(eq=False)
class RunModel:
    run_id: str
    agent: str
    thread_id: str
    answered: bool = False  # a right answer was accepted
    disturbed: bool = False  # stopped, or maybe stopped (an interrupt in its thread)


@dataclass(eq=False)
class ThreadModel:
    thread_id: str
    revision: int = 0
    turns: dict[str, str] = field(default_factory=dict)  # turn_id -> role


@dataclass
class Counts:
    examples: int = 0
    checks: int = 0  # invariant checks: one after the initial tabs, one after each step
    frames: int = 0
    events: int = 0
    drops: int = 0
    resets: int = 0
    answers: int = 0

    @property
    def steps(self) -> int:
        return self.checks - self.examples


small_text = st.text(max_size=40)
picks = st.integers(0, 2**16)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | small_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(small_text, inner, max_size=4),
    max_leaves=10,
)


class ServerMachine(RuleBasedStateMachine):
    """Clients (Tabs) against one server; the model holds runs, threads, answers."""

    server: ClassVar[Server]
    bridge: ClassVar[Bridge]
    counts: ClassVar[Counts]

    def __init__(self) -> None:
        super().__init__()
        self.stats = Stats()
        self.tabs: list[Tab] = []
        self.runs: dict[str, RunModel] = {}
        self.threads: dict[str, ThreadModel] = {}
        self.counts.examples += 1

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.bridge.run(coro)

    # -- helpers --------------------------------------------------------------------
    #
    # Every draw is a rule argument with a fixed strategy, and a pick is an index taken
    # modulo the list it picks from: what hypothesis draws never depends on what the
    # server did (which runs exist depends on timing), so its data generation stays
    # consistent between examples. A rule with nothing to act on does nothing.

    async def _open_tab(self) -> None:
        tab = Tab(f"t{len(self.tabs)}", self.stats)
        await tab.connect(self.server.ws_url)
        self.tabs.append(tab)

    def _tab(self, pick: int) -> Tab:
        return self.tabs[pick % len(self.tabs)]

    def _run(self, pick: int, agent: str | None = None) -> RunModel | None:
        runs = [r for r in self.runs.values() if agent is None or r.agent == agent]
        return runs[pick % len(runs)] if runs else None

    def _thread(self, pick: int) -> ThreadModel | None:
        threads = list(self.threads.values())
        return threads[pick % len(threads)] if threads else None

    def _max_seen(self, run_id: str) -> int:
        """The last index of the run that any tab received."""
        return self.bridge.call(
            lambda: max(
                (tab.streams[run_id].cursor or 0 for tab in self.tabs if run_id in tab.streams),
                default=0,
            )
        )

    def _learn(self, run: Frame | None, agent: str) -> None:
        if run is not None:
            self.runs[run["run_id"]] = RunModel(run["run_id"], agent, run["thread_id"])
            self.threads.setdefault(run["thread_id"], ThreadModel(run["thread_id"]))

    def _disturb(self, thread_id: str) -> None:
        for run in self.runs.values():
            if run.thread_id == thread_id:
                run.disturbed = True

    def _check_error(self, reply: Frame, allowed: set[str], what: str) -> None:
        assert reply["ok"] or reply["error"]["code"] in allowed, (what, reply)

    # -- rules ------------------------------------------------------------------------

    @initialize()
    def open_two_tabs(self) -> None:
        self.run(self._open_tab())
        self.run(self._open_tab())

    @precondition(lambda self: len(self.tabs) < MAX_TABS)
    @rule()
    def open_another_tab(self) -> None:
        self.run(self._open_tab())

    @rule(
        tab=picks,
        agent=st.sampled_from(["counter", "demo", "ask", "echo"]),
        n=st.integers(0, 60),
        delay_s=st.sampled_from([0.0, 0.001, 0.01]),
        text=small_text,
        subscribe=st.booleans(),
        in_thread=picks | st.none(),
        multitask=st.sampled_from(["reject", "reject", "enqueue", "interrupt"]),
    )
    def start(
        self,
        tab: int,
        agent: str,
        n: int,
        delay_s: float,
        text: str,
        subscribe: bool,
        in_thread: int | None,
        multitask: str,
    ) -> None:
        inputs: dict[str, Frame] = {
            "counter": {"n": n, "delay_s": delay_s},
            "demo": {"tokens": n // 3, "speed": 5000.0},
            "ask": {"prompt": text},
            "echo": {"text": text},
        }
        thread = None if in_thread is None else self._thread(in_thread)
        self._start(tab, agent, inputs[agent], subscribe, thread, multitask)

    @rule(tab=picks, prompt=small_text)
    def start_ask(self, tab: int, prompt: str) -> None:
        """An ``ask`` run, watched by its starter, in a thread of its own (so that there
        is often an answer to give)."""
        self._start(tab, "ask", {"prompt": prompt}, True, None, "reject")

    def _start(
        self,
        tab: int,
        agent: str,
        input: Frame,
        subscribe: bool,
        thread: ThreadModel | None,
        multitask: str,
    ) -> None:
        fields: Frame = {"subscribe": subscribe}
        if thread is not None:
            fields.update(thread_id=thread.thread_id, multitask=multitask)
        reply = self.run(self._tab(tab).start(agent, input, **fields))
        self._check_error(reply, {"run_in_progress", *LIMIT_CODES}, "start")
        if reply["ok"]:
            if thread is not None and multitask == "interrupt":
                self._disturb(thread.thread_id)
            self._learn(reply["result"]["run"], agent)

    @rule(
        tab=picks,
        run=picks,
        how=st.sampled_from(["zero", "latest", "random", "resume", "stale epoch"]),
        cursor=st.integers(0, 10**6),
        snapshot=st.booleans(),
    )
    def subscribe(self, tab: int, run: int, how: str, cursor: int, snapshot: bool) -> None:
        client, model = self._tab(tab), self._run(run)
        if model is None:
            return
        run_id = model.run_id
        held = self.bridge.call(lambda: client.streams.get(run_id))
        held_cursor = None if held is None else held.cursor
        epoch: str | None = None
        resume = None
        after: int | str
        if how == "zero":
            after = 0
        elif how == "latest":
            after = "latest"
        elif how == "random":
            after = cursor % (self._max_seen(run_id) + 1)
        elif how == "resume" and held is not None and held_cursor is not None:
            after, epoch, resume = held_cursor, held.epoch, held
            snapshot = False
        else:
            after, epoch = cursor, "stale-epoch"
        reply = self.run(
            client.subscribe(run_id, after, epoch=epoch, snapshot=snapshot, resume=resume)
        )
        self._check_error(reply, set(LIMIT_CODES), "subscribe")

    @rule(tab=picks, run=picks)
    def unsubscribe(self, tab: int, run: int) -> None:
        model = self._run(run)
        if model is not None:
            reply = self.run(self._tab(tab).unsubscribe(model.run_id))
            self._check_error(reply, set(LIMIT_CODES), "unsubscribe")

    @rule(tab=picks)
    def drop_and_resume(self, tab: int) -> None:
        """Cut the socket mid-stream, reconnect, subscribe after every cursor held."""
        client = self._tab(tab)

        async def again() -> None:
            await client.drop()
            await client.connect(self.server.ws_url)
            await client.resume_all()

        self.run(again())

    @rule(tab=picks, run=picks)
    def stop(self, tab: int, run: int) -> None:
        model = self._run(run)
        if model is None:
            return
        reply = self.run(self._tab(tab).request("stop", run_id=model.run_id))
        self._check_error(reply, set(LIMIT_CODES), "stop")
        if reply["ok"]:
            assert isinstance(reply["result"]["stopping"], bool), reply
            model.disturbed = True

    def _waiting(self) -> list[tuple[RunModel, str]]:
        """Ask runs some tab saw ask, that nobody answered or stopped."""

        def scan() -> list[tuple[RunModel, str]]:
            found = {}
            for tab in self.tabs:
                for run_id, stream in tab.streams.items():
                    run = self.runs.get(run_id)
                    if run is None or stream.request_id is None or run.answered:
                        continue
                    if not run.disturbed:
                        found[run_id] = (run, stream.request_id)
            return [found[k] for k in sorted(found)]

        return self.bridge.call(scan)

    @rule(tab=picks, run=picks, value=any_json, stale=st.text(min_size=1, max_size=30))
    def respond(self, tab: int, run: int, value: Any, stale: str) -> None:
        """The right request id of a run that waits (it must be taken), then a stale one
        (never taken)."""
        waiting = self._waiting()
        if not waiting:
            self._respond_stale(tab, run, stale)
            return
        model, request_id = waiting[run % len(waiting)]
        reply = self.run(
            self._tab(tab).request(
                "respond", run_id=model.run_id, request_id=request_id, value=value
            )
        )
        # Nobody else answers or stops it: the answer must be taken.
        self._check_error(reply, set(LIMIT_CODES), "respond")
        model.answered = reply["ok"]
        self._respond_stale(tab, run, stale)

    def _respond_stale(self, tab: int, run: int, request_id: str) -> None:
        model = self._run(run, agent="ask")
        if model is None:
            return
        reply = self.run(
            self._tab(tab).request(
                "respond", run_id=model.run_id, request_id="stale-" + request_id, value=1
            )
        )
        assert not reply["ok"], reply
        self._check_error(reply, {"not_waiting", *LIMIT_CODES}, "stale respond")

    @rule(
        tab=picks,
        thread=picks,
        turn=picks | st.none(),
        kind=st.sampled_from(["send", "send", "rewind", "undo", "regenerate", "edit"]),
        agent=st.sampled_from(["echo", "echo", "ask"]),
        multitask=st.sampled_from(["reject", "reject", "enqueue", "interrupt", "rollback"]),
        revision=st.sampled_from(["none", "known", "wrong"]),
        content=small_text,
    )
    def thread_op(
        self,
        tab: int,
        thread: int,
        turn: int | None,
        kind: str,
        agent: str,
        multitask: str,
        revision: str,
        content: str,
    ) -> None:
        model = self._thread(thread)
        if model is None:
            return
        fields: Frame = {"thread_id": model.thread_id, "multitask": multitask}
        if revision != "none":
            fields["expected_revision"] = model.revision + (0 if revision == "known" else 1000)
        if kind in ("send", "edit", "regenerate"):
            fields["agent"] = agent
        if kind in ("send", "edit"):
            fields["content"] = content
        turns = sorted(model.turns)
        users = sorted(t for t, role in model.turns.items() if role == "user")
        if kind == "rewind":
            fields["turn_id"] = None if turn is None or not turns else turns[turn % len(turns)]
        if kind == "edit":
            fields["turn_id"] = users[(turn or 0) % len(users)] if users else "turn_none"
        reply = self.run(self._tab(tab).request(kind, **fields))
        allowed = set(THREAD_ERRORS)
        if fields.get("turn_id") == "turn_none":
            allowed.add("not_found")
        self._check_error(reply, allowed, kind)
        if revision == "wrong":
            assert not reply["ok"], ("a stale expected_revision was applied", reply)
        if reply["ok"]:
            view = reply["result"]["thread"]
            model.revision = view["revision"]
            model.turns.update({t["turn_id"]: t["role"] for t in view["turns"]})
            if multitask in ("interrupt", "rollback"):
                self._disturb(model.thread_id)
            self._learn(reply["result"]["run"], agent)

    @rule(
        tab=picks,
        frame=st.sampled_from(BAD_FRAMES) | st.binary(max_size=64) | st.text(max_size=64),
    )
    def bad_frame(self, tab: int, frame: str | bytes) -> None:
        """A frame from app.chaos's table of bad frames, or junk."""
        reply = self.run(self._tab(tab).send_raw(frame))
        assert not reply["ok"], reply
        self._check_error(reply, {"bad_request", "not_found", *LIMIT_CODES}, "bad frame")

    @rule(tab=picks, run=picks, after=st.sampled_from([10**12, 2**63 - 1, 2**64 - 1, 10**30]))
    def huge_cursor(self, tab: int, run: int, after: int) -> None:
        model = self._run(run)
        if model is None:
            return
        # What any tab had seen before the frame was sent: the run was at least there when
        # the server answered (another connection may see later events before the reply).
        seen_before = self._max_seen(model.run_id)
        reply = self.run(self._tab(tab).request("subscribe", run_id=model.run_id, after=after))
        assert not reply["ok"], reply
        self._check_error(reply, {"cursor_out_of_range", "bad_request", *LIMIT_CODES}, "cursor")
        if reply["error"]["code"] == "cursor_out_of_range":
            assert reply["error"]["last_index"] >= seen_before, reply

    @rule(tab=picks, n=st.integers(1, 60))
    def ping_burst(self, tab: int, n: int) -> None:
        for reply in self.run(self._tab(tab).burst(n)):
            self._check_error(reply, {"rate_limited"}, "ping")

    @rule(tab=picks, thread=picks)
    def watch_thread(self, tab: int, thread: int) -> None:
        model = self._thread(thread)
        if model is not None:
            reply = self.run(self._tab(tab).request("watch_thread", thread_id=model.thread_id))
            self._check_error(reply, set(LIMIT_CODES), "watch_thread")

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def every_client_is_connected_and_answered(self) -> None:
        """No connection was closed (a bad frame never closes one), every frame so far
        has had its one reply (a ping's reply comes after all of them), no broken
        delivery invariant."""

        async def check() -> None:
            for tab in self.tabs:
                assert tab.connected, (tab.name, tab.close_code)
                reply = await tab.ping()
                assert reply["ok"] or reply["error"]["code"] == "rate_limited", reply

        self.counts.checks += 1
        self.run(check())
        assert not self.stats.violations, self.stats.violations

    def teardown(self) -> None:
        try:
            if self.tabs:
                self.run(self._finish())
        finally:
            self.counts.frames += self.stats.frames_sent
            self.counts.events += self.stats.events
            self.counts.drops += self.stats.drops
            self.counts.resets += self.stats.resets
            self.counts.answers += sum(r.answered for r in self.runs.values())
            self.bridge.run(self._close())
        assert not self.stats.violations, self.stats.violations

    async def _finish(self) -> None:
        """Stop every run; each live subscription ends with its terminal event; each holds
        exactly the run's log from its cursor."""
        tab = self.tabs[0]
        for run_id in self.runs:
            reply = await tab.request("stop", run_id=run_id)
            assert reply["ok"], reply
        for each in self.tabs:
            ended = await each.wait_for(lambda each=each: not each.live_streams(), 10.0)
            assert ended, [s.run_id for s in each.live_streams()]
        verifier = Tab("verifier", self.stats)
        await verifier.connect(self.server.ws_url)
        try:
            for run_id in sorted({r for each in self.tabs for r in each.streams}):
                _, log = await fetch_log(verifier, run_id)
                for each in self.tabs:
                    stream = each.streams.get(run_id)
                    if stream is None or stream.start is None:
                        continue
                    assert stream.events == log[stream.start : stream.cursor], (each.name, run_id)
                    if stream.ended and stream.events:
                        assert stream.events[-1] == log[-1], (each.name, run_id)
        finally:
            await verifier.close()

    async def _close(self) -> None:
        for tab in self.tabs:
            await tab.close()


async def test_random_op_sequences_keep_every_invariant(server: Server) -> None:
    counts = Counts()
    machine = type(
        "ServerMachine",
        (ServerMachine,),
        {"server": server, "bridge": Bridge(asyncio.get_running_loop()), "counts": counts},
    )
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)
    print(
        f"\nstateful: {counts.examples} examples, {counts.steps} steps, {counts.frames} frames "
        f"sent, {counts.events} events received, {counts.drops} drops, {counts.resets} "
        f"resets, {counts.answers} answers"
    )
