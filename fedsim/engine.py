"""`--engine inprocess`: Flower's ServerApp and ClientApp driven in this process, without Ray.

Flower's simulation engine always starts Ray (seconds of start-up, worker processes). For tests
and debugging, `LocalGrid` implements Flower's public `Grid` interface by calling the ClientApp
directly, one node after another, with the same Message and Context objects the simulation
engine hands it. It uses Flower's public API (Grid, Message, Context, ClientApp.__call__,
ServerApp.__call__) plus two private pieces: a Message takes its run and sender ids from the
process's `TaskIdentity` (flwr.supercore), which Flower's own runtimes set and which
`_task_identity` sets here; and a pushed message gets its id as Flower's in-memory grid gives
it one (so replies name the message they answer). tests/test_engine.py fails loudly if either
contract changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

CLIENT_ERROR = 1  # Error code on a reply whose ClientApp raised


class LocalGrid(Grid):
    """A Grid whose nodes are a ClientApp called in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, run_config: dict | None = None):
        self.client_app = client_app
        self.contexts = {
            1 + i: Context(run_id=run_id, node_id=1 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id)  # Flower's legacy workflows (SecAgg+) read grid.run.run_id
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        """The ClientApp's reply to a copy of `message`: a node gets its own copy, as over the wire
        (Flower's SecAgg+ workflow sends one content object to every node and its client mod edits it)."""
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(copy.deepcopy(message), context)
        except Exception as exc:  # a failing client becomes an error reply, as in Flower's engine
            return Message(Error(code=CLIENT_ERROR, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message is delivered at once, in order; its reply waits for `pull_messages`
        under the message's id, as on Flower's grids."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # what Flower's grids do on push
            self._replies[message.metadata.message_id] = self._deliver(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(key) for key in message_ids if key in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


SERVER_NODE_ID = 0
RUN_ID = 1


def _task_identity(node_id: int) -> None:
    """Flower's Message constructor reads run and node ids from this process-wide identity."""
    from flwr.supercore.task_identity import TaskIdentity  # private: see the module docstring

    TaskIdentity.task_id = RUN_ID
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = node_id


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
                  run_config: dict | None = None) -> None:
    """Every app gets `run_config` as Flower's runtimes pass `[tool.flwr.app.config]`."""
    _task_identity(SERVER_NODE_ID)
    grid = LocalGrid(client_app, num_nodes, RUN_ID, run_config)
    server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                             run_config=dict(run_config or {})))
