"""`improvd train --distributed`: TensorFlow's own distribution engine (`tf.distribute`), and who writes what.

- Several workers named by the standard `TF_CONFIG` environment variable → `MultiWorkerMirroredStrategy`
  (synchronous data parallelism: every step, each replica computes gradients on its share of the global batch
  and they are all-reduced over gRPC/collective ops). Every worker runs the same command with the same config.
- Otherwise → `MirroredStrategy` over the local GPUs (or the one CPU device when there is none).

The chief (task `chief`, or `worker` 0 when the cluster has no chief) writes the run directory; the other
workers take part in every step and write their checkpoints to a temporary directory they delete at the end
(the standard Keras pattern), so exactly one run directory exists.

Keras 3.x with TensorFlow 2.16-2.21 cannot `fit` under `MultiWorkerMirroredStrategy` as shipped
(tensorflow/tensorflow#72388): its per-replica log reduction asks for `strategy.reduce("MEAN", v, axis=0)` on
scalars, and its pre-fit "symbolic build" all-reduces the first input batch, which fails with one device per
worker. `patch_keras_for_multi_worker` works around both, only when several workers are configured.

Threads: the main thread of each worker process of a distributed run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """What `TF_CONFIG` says about this process: how many workers, its role and index."""

    workers: int          # tasks that train (chief included)
    task_type: str | None
    task_index: int

    @property
    def is_chief(self) -> bool:
        return self.task_type in (None, "chief") or (self.task_type == "worker" and self.task_index == 0
                                                     and not self.has_chief)

    has_chief: bool = False
    address: str | None = None  # this task's "host:port" in TF_CONFIG (where TensorFlow's gRPC server listens)


def read_tf_config(env: dict | None = None) -> Cluster:
    """The cluster described by `TF_CONFIG` (one local worker when it is unset).

    Raises:
        ValueError: `TF_CONFIG` is not JSON or does not name this task.
    """
    raw = (env if env is not None else os.environ).get("TF_CONFIG", "")
    if not raw.strip():
        return Cluster(1, None, 0)
    try:
        cfg = json.loads(raw)
        cluster = cfg.get("cluster", {})
        task = cfg.get("task", {})
        workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        task_type, index = task.get("type"), int(task.get("index", 0))
        addresses = cluster.get(task_type, []) if isinstance(task_type, str) else []
        address = str(addresses[index]) if 0 <= index < len(addresses) else None
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"TF_CONFIG is not valid: {err}; expected JSON like "
                         '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}') from err
    if workers > 1 and task_type not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG task type {task_type!r}: expected 'chief' or 'worker' (there is no parameter "
                         "server in synchronous training)")
    return Cluster(max(1, workers), task_type, index, has_chief=bool(cluster.get("chief")), address=address)


def server_warning(cluster: Cluster) -> str | None:
    """What a multi-worker run must say before it starts TensorFlow's gRPC server (None for one worker).

    The server has no authentication and no encryption, and listens on every network interface at the port of
    this task's TF_CONFIG address, whatever host the address names (measured with `ss -ltnp`: `*:23456` for
    `127.0.0.1:23456`). Anyone who reaches it can run TensorFlow operations in this process: read and write files
    as this user.
    """
    if cluster.workers <= 1:
        return None
    port = cluster.address.rsplit(":", 1)[-1] if cluster.address and ":" in cluster.address else "?"
    return (f"TensorFlow's gRPC server now listens on port {port} of every network interface, unauthenticated and "
            f"unencrypted: anyone who can reach it can run TensorFlow operations as this user. Keep the workers on "
            f"a private network and firewall port {port} to them (docs/training.md, 'The gRPC server is open').")


def make_strategy(cluster: Cluster):
    """`MultiWorkerMirroredStrategy` for several workers, else `MirroredStrategy` over the local GPUs/CPU.

    Call before anything else uses TensorFlow in this process (collective ops are configured at start-up).
    """
    import tensorflow as tf

    if cluster.workers > 1:
        log.warning("%s", server_warning(cluster))
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_for_multi_worker()
        log.info("MultiWorkerMirroredStrategy: %d workers, %d replicas in sync; this is %s %d%s", cluster.workers,
                 strategy.num_replicas_in_sync, cluster.task_type, cluster.task_index,
                 " (chief)" if cluster.is_chief else "")
    else:
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in gpus] or None)
        log.info("MirroredStrategy over %s", ", ".join(d.name for d in gpus) or "the CPU")
    return strategy


def is_multi_worker(strategy) -> bool:
    return strategy is not None and getattr(strategy.extended, "_num_workers", 1) > 1


_PATCHED = False


def patch_keras_for_multi_worker() -> None:
    """Make Keras 3's reduction of per-replica logs correct under `MultiWorkerMirroredStrategy`.

    Keras reduces each replica's metric values with `strategy.reduce("MEAN", v, axis=0)`, which fails on the
    scalars it reduces (tensorflow/tensorflow#72388). The mean over replicas is `axis=None`.
    """
    global _PATCHED
    if _PATCHED:
        return
    import keras
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            def mean(v):
                if isinstance(v, tf.distribute.DistributedValues):
                    return strategy.reduce("MEAN", v, axis=None)
                return v
            return keras.tree.map_structure(mean, values)
        return original(values, strategy, reduction)

    tf_trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True


def prepare_model(model, strategy, sample_batch) -> None:
    """Build the compiled model's optimizer, loss and metrics from a local sample batch, inside `strategy`.

    Under `MultiWorkerMirroredStrategy`, Keras 3's own pre-fit build all-reduces the first distributed batch and
    fails; building from a local batch (only its shapes matter) gives the same variables, created in the
    strategy's scope, without a collective.
    """
    if not is_multi_worker(strategy):
        return

    def build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=sample_batch)

    model._maybe_symbolic_build = build


def agree_any(strategy, flag: bool) -> bool:
    """True on every worker when `flag` is true on any of them (an all-reduce; a barrier too).

    Every worker must call this at the same point, or the others wait for it.
    """
    if not is_multi_worker(strategy):
        return flag
    import tensorflow as tf

    value = tf.constant(1.0 if flag else 0.0)
    total = strategy.reduce("SUM", strategy.run(lambda: tf.identity(value)), axis=None)
    return float(total) > 0
