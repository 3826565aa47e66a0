"""Transform lookups at an image's stamp: tf2_ros when importable, otherwise our own listener.

:class:`TransformLookup` is what the node uses. With a ROS 2 install it wraps
``tf2_ros.Buffer`` + ``TransformListener`` (a few lines, below). Without one (the PyPI wheels
have no tf2_ros) it runs :class:`TfBuffer`, a small tf2-compatible buffer fed by subscriptions
to ``/tf`` (volatile) and ``/tf_static`` (transient local, reliable, so late joiners still get
the static frames):

* one time-sorted history per child frame (the TF tree: each frame has one parent), pruned to
  ``cache_time_s`` behind its newest sample; static transforms hold for every time; a sample
  older than that is dropped (as tf2 does), unless several arrive in a row: then time went
  backwards (a bag loop) and the history starts again from them;
* a lookup walks both frames up to their common ancestor and composes the edges, each
  evaluated at the requested stamp by linear interpolation of the translation and slerp of the
  rotation between the two samples around it;
* a stamp outside an edge's history is an extrapolation error (as in tf2) unless within
  ``extrapolation_tolerance_s`` of its ends, where the end sample is used;
* stamp 0 means "the latest time all edges of the path have" (tf2's convention).

Lookups wait on a condition variable that the subscription callbacks signal, so the waiting
thread (the node's worker) needs nobody to spin for it besides the node's executor, which
already runs the subscriptions. The subscriptions live in their own callback group so that a
lookup made from another callback cannot starve them.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from geometry_msgs.msg import Quaternion, Vector3
from geometry_msgs.msg import Transform as TransformMsg

from qwen3vl_seg_ros.transforms import Transform, interpolate

try:  # a ROS 2 install has it; the PyPI wheels do not
    import tf2_ros as _tf2_ros
except ImportError:  # pragma: no cover - depends on the environment
    _tf2_ros = None

_NS = 1_000_000_000

# Reasons a transform is unavailable (TransformUnavailable.kind).
UNKNOWN_FRAME = "unknown_frame"
NOT_CONNECTED = "not_connected"
EXTRAPOLATION_PAST = "extrapolation_past"
EXTRAPOLATION_FUTURE = "extrapolation_future"
EXTRAPOLATION = "extrapolation"  # from tf2_ros, which does not say which side
TIMEOUT = "timeout"
INVALID = "invalid"
TF2_ERROR = "tf2_error"  # an error reported by tf2_ros, kind not known more precisely


class TransformUnavailable(RuntimeError):  # noqa: N818 - the name the node uses
    """No transform between two frames at a time; ``kind`` says which case, ``reason`` details."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def tf2_ros_available() -> bool:
    return _tf2_ros is not None


def to_nanoseconds(stamp: Any) -> int:
    """Nanoseconds of an ``rclpy.time.Time``, a ``builtin_interfaces/Time`` or an int (ns)."""
    if isinstance(stamp, int):
        return stamp
    if hasattr(stamp, "nanoseconds"):
        return int(stamp.nanoseconds)
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return int(stamp.sec) * _NS + int(stamp.nanosec)
    raise TypeError(f"cannot read a time stamp from {type(stamp).__name__}")


def _fmt_time(ns: int) -> str:
    return f"{ns / _NS:.3f} s"


def transform_from_msg(msg: TransformMsg) -> Transform:
    """``geometry_msgs/Transform`` -> :class:`Transform` (ValueError on a zero quaternion)."""
    t, q = msg.translation, msg.rotation
    return Transform(translation=(t.x, t.y, t.z), rotation=(q.x, q.y, q.z, q.w))


def transform_to_msg(tf: Transform) -> TransformMsg:
    t, q = tf.translation, tf.rotation
    return TransformMsg(
        translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
        rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
    )


def clean_frame(frame: str) -> str:
    """tf2 frame ids have no leading slash; accept one rather than fail on it."""
    return frame.strip().lstrip("/")


# ---------------------------------------------------------------------------------------------
# the buffer (no rclpy needed)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Edge:
    """The transform parent <- child over time (``T_parent_child``)."""

    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)  # sorted, ns
    samples: list[Transform] = field(default_factory=list)
    # samples far older than the history, in a row: a new timeline once there are enough
    older: list[tuple[int, Transform]] = field(default_factory=list)


#: Samples far older than an edge's history that, in a row, mean time went backwards (a bag
#: loop, a restarted simulator); fewer are dropped as stray, as tf2 drops old data.
RESTART_AFTER = 3


class TfBuffer:
    """A thread-safe TF tree with time histories; see the module docstring for the rules."""

    def __init__(self, cache_time_s: float = 10.0, extrapolation_tolerance_s: float = 0.0) -> None:
        if cache_time_s <= 0:
            raise ValueError("cache_time_s must be > 0")
        self._cache_ns = int(cache_time_s * _NS)
        self._tolerance_ns = max(0, int(extrapolation_tolerance_s * _NS))
        self._edges: dict[str, _Edge] = {}
        self._cond = threading.Condition()

    # ---- filling ------------------------------------------------------------------------
    def set_transform(
        self, parent: str, child: str, stamp_ns: int, transform: Transform, static: bool = False
    ) -> None:
        self.set_transforms([(parent, child, stamp_ns, transform)], static)

    def set_transforms(self, items: Iterable[tuple[str, str, int, Transform]], static: bool = False) -> None:
        """Adds samples ``(parent, child, stamp_ns, T_parent_child)``; wakes waiting lookups once."""
        with self._cond:
            for parent, child, stamp_ns, tf in items:
                self._insert(clean_frame(parent), clean_frame(child), int(stamp_ns), tf, static)
            self._cond.notify_all()

    def _insert(self, parent: str, child: str, stamp: int, tf: Transform, static: bool) -> None:
        if not parent or not child or parent == child:
            return  # tf2 ignores these too (with an error log); they cannot form a tree
        edge = self._edges.get(child)
        if static or edge is None or edge.parent != parent or edge.static:
            # A new edge, a static one (valid for all time), or the frame moved to another
            # parent / from static to dynamic: the old history no longer applies.
            self._edges[child] = _Edge(parent=parent, static=static, stamps=[stamp], samples=[tf])
            return
        newest = edge.stamps[-1]
        if stamp < newest - self._cache_ns:
            # Far older than what we hold: a stray sample (stamp 0 before /clock, another
            # clock, a late message), or time went backwards (bag loop, restarted simulator).
            # Only several in a row restart the history; one alone must not wipe it.
            edge.older.append((stamp, tf))
            if len(edge.older) >= RESTART_AFTER:
                older = sorted(edge.older, key=lambda item: item[0])
                edge.stamps, edge.samples, edge.older = [s for s, _ in older], [t for _, t in older], []
            return
        edge.older.clear()
        i = bisect.bisect_left(edge.stamps, stamp)
        if i < len(edge.stamps) and edge.stamps[i] == stamp:
            edge.samples[i] = tf
        else:
            edge.stamps.insert(i, stamp)
            edge.samples.insert(i, tf)
        cut = bisect.bisect_left(edge.stamps, edge.stamps[-1] - self._cache_ns)
        if cut:
            del edge.stamps[:cut]
            del edge.samples[:cut]

    def clear(self) -> None:
        with self._cond:
            self._edges.clear()

    def frames(self) -> set[str]:
        with self._cond:
            return self._frames_locked()

    def _frames_locked(self) -> set[str]:
        return set(self._edges) | {e.parent for e in self._edges.values()}

    # ---- queries ------------------------------------------------------------------------
    def lookup(
        self, target_frame: str, source_frame: str, stamp_ns: int, timeout_s: float = 0.0
    ) -> Transform:
        """``T_target_source`` at ``stamp_ns`` (0 = latest), waiting up to ``timeout_s`` for data."""
        target, source = clean_frame(target_frame), clean_frame(source_frame)
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while True:
                try:
                    return self._lookup_locked(target, source, int(stamp_ns))
                except TransformUnavailable as exc:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0.0:
                        if timeout_s > 0.0:
                            raise TransformUnavailable(
                                TIMEOUT,
                                f"no transform from '{source}' to '{target}' at {_fmt_time(stamp_ns)} "
                                f"within {timeout_s:g} s: {exc.reason}",
                            ) from exc
                        raise
                    self._cond.wait(remaining)

    def _chain(self, frame: str) -> list[str]:
        """``frame`` and its ancestors up to its root."""
        chain = [frame]
        while chain[-1] in self._edges:
            chain.append(self._edges[chain[-1]].parent)
            if len(chain) > len(self._edges) + 1:
                raise TransformUnavailable(NOT_CONNECTED, f"the TF tree has a cycle through '{frame}'")
        return chain

    def _check_known(self, frame: str, role: str) -> None:
        if frame in self._edges or any(e.parent == frame for e in self._edges.values()):
            return
        known = sorted(self._frames_locked())
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        if not frame:
            raise TransformUnavailable(INVALID, f"the {role} frame name is empty")
        raise TransformUnavailable(
            UNKNOWN_FRAME, f"{role} frame '{frame}' does not exist in TF (known frames: {listed or 'none'})"
        )

    def _lookup_locked(self, target: str, source: str, stamp: int) -> Transform:
        if target == source and target:
            return Transform.identity()
        self._check_known(source, "source")
        self._check_known(target, "target")
        up_source, up_target = self._chain(source), self._chain(target)
        in_target = set(up_target)
        common = next((f for f in up_source if f in in_target), None)
        if common is None:
            raise TransformUnavailable(
                NOT_CONNECTED,
                f"frames '{source}' and '{target}' are not connected: '{source}' is in the tree rooted "
                f"at '{up_source[-1]}', '{target}' in the tree rooted at '{up_target[-1]}'",
            )
        source_edges = up_source[: up_source.index(common)]
        target_edges = up_target[: up_target.index(common)]
        if stamp == 0:
            stamp = self._latest_common(source_edges + target_edges)
        t_common_source = self._up_to(source_edges, stamp)
        t_common_target = self._up_to(target_edges, stamp)
        return t_common_target.inverse() @ t_common_source

    def _latest_common(self, children: list[str]) -> int:
        dynamic = [self._edges[c].stamps[-1] for c in children if not self._edges[c].static]
        return min(dynamic) if dynamic else 0

    def _up_to(self, children: list[str], stamp: int) -> Transform:
        """``T_ancestor_first`` through the edges of ``children`` (ordered upwards)."""
        tf = Transform.identity()
        for child in children:
            tf = self._edge_at(child, stamp) @ tf
        return tf

    def _edge_at(self, child: str, stamp: int) -> Transform:
        edge = self._edges[child]
        if edge.static:
            return edge.samples[0]
        first, last = edge.stamps[0], edge.stamps[-1]
        if stamp < first - self._tolerance_ns or stamp > last + self._tolerance_ns:
            past = stamp < first
            raise TransformUnavailable(
                EXTRAPOLATION_PAST if past else EXTRAPOLATION_FUTURE,
                f"lookup would require extrapolation into the {'past' if past else 'future'}: requested "
                f"{_fmt_time(stamp)} but '{edge.parent}' -> '{child}' is known from {_fmt_time(first)} "
                f"to {_fmt_time(last)}",
            )
        if stamp <= first:
            return edge.samples[0]
        if stamp >= last:
            return edge.samples[-1]
        i = bisect.bisect_right(edge.stamps, stamp)  # stamps[i-1] <= stamp < stamps[i]
        t0, t1 = edge.stamps[i - 1], edge.stamps[i]
        return interpolate(edge.samples[i - 1], edge.samples[i], (stamp - t0) / (t1 - t0))


# ---------------------------------------------------------------------------------------------
# ROS side
# ---------------------------------------------------------------------------------------------
class _BuiltinBackend:
    """Our own listener on /tf and /tf_static feeding a :class:`TfBuffer`."""

    def __init__(self, node: Any, cache_time_s: float, extrapolation_tolerance_s: float) -> None:
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage

        self.buffer = TfBuffer(cache_time_s, extrapolation_tolerance_s)
        self._node = node
        self._bad_logged = False
        group = MutuallyExclusiveCallbackGroup()

        def qos(durability: DurabilityPolicy) -> QoSProfile:
            return QoSProfile(
                history=HistoryPolicy.KEEP_LAST, depth=100,
                reliability=ReliabilityPolicy.RELIABLE, durability=durability,
            )

        self._subs = [
            node.create_subscription(
                TFMessage, "/tf", lambda m: self._on_message(m, False),
                qos(DurabilityPolicy.VOLATILE), callback_group=group,
            ),
            node.create_subscription(
                TFMessage, "/tf_static", lambda m: self._on_message(m, True),
                qos(DurabilityPolicy.TRANSIENT_LOCAL), callback_group=group,
            ),
        ]

    def _on_message(self, msg: Any, static: bool) -> None:
        items = []
        for ts in msg.transforms:
            try:
                tf = transform_from_msg(ts.transform)
            except ValueError as exc:  # zero or NaN quaternion from a broken publisher
                if not self._bad_logged:
                    self._node.get_logger().warning(
                        f"ignoring transform '{ts.header.frame_id}' -> '{ts.child_frame_id}': {exc}"
                    )
                    self._bad_logged = True
                continue
            items.append((ts.header.frame_id, ts.child_frame_id, to_nanoseconds(ts.header.stamp), tf))
        self.buffer.set_transforms(items, static)

    def lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> Transform:
        return self.buffer.lookup(target, source, stamp_ns, timeout_s)

    def close(self) -> None:
        for sub in self._subs:
            self._node.destroy_subscription(sub)
        self._subs = []


#: tf2 exception class name -> TransformUnavailable.kind (tf2 does not say past or future).
_TF2_KINDS = {
    "LookupException": UNKNOWN_FRAME,
    "ConnectivityException": NOT_CONNECTED,
    "ExtrapolationException": EXTRAPOLATION,
    "TimeoutException": TIMEOUT,
    "InvalidArgumentException": INVALID,
}


class _Tf2RosBackend:
    """tf2_ros's own buffer and listener (used on a ROS 2 install)."""

    def __init__(self, node: Any, cache_time_s: float) -> None:
        from rclpy.duration import Duration

        self._buffer = _tf2_ros.Buffer(cache_time=Duration(seconds=cache_time_s))
        self._listener = _tf2_ros.TransformListener(self._buffer, node, spin_thread=False)

    def lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> Transform:
        from rclpy.duration import Duration
        from rclpy.time import Time

        try:
            msg = self._buffer.lookup_transform(
                target, source, Time(nanoseconds=stamp_ns), timeout=Duration(seconds=timeout_s)
            )
        except _tf2_ros.TransformException as exc:
            kind = _TF2_KINDS.get(type(exc).__name__, TF2_ERROR)
            raise TransformUnavailable(kind, f"{type(exc).__name__}: {exc}") from exc
        return transform_from_msg(msg.transform)

    def close(self) -> None:
        self._listener.unregister()


class TransformLookup:
    """Looks up ``T_target_source`` at a stamp; safe to call from any thread.

    ``use_tf2_ros``: None picks tf2_ros when importable; False forces the built-in listener.
    """

    def __init__(
        self,
        node: Any,
        cache_time_s: float = 10.0,
        use_tf2_ros: bool | None = None,
        extrapolation_tolerance_s: float = 0.0,
    ) -> None:
        if use_tf2_ros is None:
            use_tf2_ros = tf2_ros_available()
        if use_tf2_ros and not tf2_ros_available():
            raise RuntimeError("use_tf2_ros=True but tf2_ros cannot be imported")
        if use_tf2_ros:
            self._impl: _Tf2RosBackend | _BuiltinBackend = _Tf2RosBackend(node, cache_time_s)
            self.backend = "tf2_ros"
        else:
            self._impl = _BuiltinBackend(node, cache_time_s, extrapolation_tolerance_s)
            self.backend = "builtin"

    def lookup(self, target_frame: str, source_frame: str, stamp: Any, timeout_s: float = 0.0) -> Transform:
        """The transform mapping points in ``source_frame`` to ``target_frame`` at ``stamp``.

        ``stamp`` is an ``rclpy`` Time, a ``builtin_interfaces/Time`` or ns (0 = latest). Raises
        :class:`TransformUnavailable` with the reason after waiting at most ``timeout_s``. A leading
        '/' is dropped here, so both backends answer alike (tf2 refuses such names).
        """
        return self._impl.lookup(clean_frame(target_frame), clean_frame(source_frame),
                                 to_nanoseconds(stamp), float(timeout_s))

    def close(self) -> None:
        """Removes the subscriptions (call before destroying the node)."""
        self._impl.close()
