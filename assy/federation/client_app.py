"""Flower ClientApp: reads its partition from the node config, calls :mod:`~.task`, replies.

Deployment: ``flower-supernode ... --node-config "partition-id=I num-partitions=N"``
(optionally ``pool=PATH``, ``data=FILE`` and ``client-dir=DIR`` where this host keeps them).
Nothing of the local data leaves the client but adapter tensors and a few numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from assy.federation.quiet import quiet_libraries
from assy.federation.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NODE_KEYS,
    WARM_UP,
    arrays_record,
    run_settings,
)

__all__ = ["app", "hello", "make_client_app", "train", "train_content"]


def hello(msg: Message, context: Context) -> Message:
    """Discovery: tell the server which partition this node holds.

    In simulation also the worker's warm-up (``warm-up`` set): it imports the training
    code here, so that the seconds peft's import takes are not charged to the first round
    (nor cut by its timeout), nor the code's memory to its budget. A deployment starts a
    fresh process per message: no warm-up.
    """
    config = msg.content.get(CONFIG)
    if config is not None and config.get(WARM_UP):
        import datasets  # noqa: F401 - reads the bundled data

        from assy.federation import lego, selection, task  # noqa: F401

    pid = int(context.node_config["partition-id"])
    count = int(context.node_config.get("num-partitions", 0))
    metrics = MetricRecord({"partition-id": pid, "num-partitions": count})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One client round of the run's method on this node's partition.

    Under ``--secagg`` an adapter round's message is SecAgg+'s FitIns-shaped content
    (:func:`~.secagg_mod` has run the protocol's first stages): the same work, answered
    FitRes-shaped, for the mod to mask (:func:`~.secagg.train_fitins`).
    """
    from assy.federation.secagg import is_fitins, train_fitins

    if is_fitins(msg):
        return train_fitins(msg, context, train_content)
    return Message(train_content(msg.content, context), reply_to=msg)


def train_content(received: RecordDict, context: Context) -> RecordDict:
    """A training message's content -> the reply's content (the round's work)."""
    import torch

    from assy.federation import task  # deferred: peft's import takes seconds

    quiet_libraries()
    torch.set_num_threads(1)  # one core per virtual client; clients run side by side
    start = time.perf_counter()
    cfg, round_ = run_settings(received)
    pid = int(context.node_config["partition-id"])
    paths = {
        k.replace("-", "_"): str(context.node_config[k])
        for k in NODE_KEYS
        if k in context.node_config
    }
    local = {"pool_dir": paths.get("pool"), "data_file": paths.get("data")}
    content = RecordDict()
    if cfg.method == "fedit":
        global_state = received[ARRAYS].to_torch_state_dict()
        state, metrics = task.fedit_round(cfg, pid, global_state, round_, **local)
        content[ARRAYS] = arrays_record(state)
    elif cfg.method == "lego":
        from assy.federation.lego import lego_round

        values = received[ARRAYS].to_torch_state_dict() if ARRAYS in received else {}
        variant = str(received[CONFIG]["variant"])
        state, metrics = lego_round(cfg, pid, variant, values, round_, **local)
        content[ARRAYS] = arrays_record(state)
    elif cfg.method == "local":
        metrics = task.local_round(cfg, pid, round_, client_dir=paths.get("client_dir"), **local)
    elif cfg.method == "assy":
        from assy.federation.selection import assy_round

        config = received[CONFIG]
        sent = received[ARRAYS].to_torch_state_dict() if ARRAYS in received else {}
        state, metrics = assy_round(
            cfg, pid, round_, str(config["phase"]), str(config["proposals"]),
            str(config["recipes"]), sent, **local,
        )  # fmt: skip
        if state:
            content[ARRAYS] = arrays_record(state)
    else:
        raise ValueError(f"this client has no method {cfg.method!r}")
    metrics["client-seconds"] = time.perf_counter() - start
    content[METRICS] = MetricRecord(metrics)
    return content


def make_client_app(mods: Sequence = ()) -> ClientApp:
    """The ClientApp, with Flower mods (e.g. a test's fault injection) around it, and
    around the handlers :func:`~.secagg.secagg_mod`: SecAgg+ where the server runs it
    (``--secagg``), a pass-through for every other message."""
    from assy.federation.secagg import secagg_mod

    client = ClientApp(mods=[*mods, secagg_mod])
    client.query()(hello)
    client.train()(train)
    return client


app = make_client_app()
