"""The RGB-D synchronizer's pairing rules (ROS-free: stamps and arrivals are plain floats)."""

import random
import re

from qwen3vl_seg_ros.ros.sync import RgbdSynchronizer


def test_pairs_image_with_closest_depth_within_slop():
    sync = RgbdSynchronizer(slop_s=0.02)
    sync.add_image("img1", stamp=10.00, arrival=100.0)
    sync.add_depth("d_far", stamp=10.05, arrival=100.0)
    sync.add_depth("d_near", stamp=10.01, arrival=100.0)
    frame = sync.latest(now=100.1)
    assert frame.image == "img1" and frame.depth == "d_near" and frame.depth_stamp == 10.01


def test_the_closest_of_several_depths_within_slop_is_paired_whatever_their_order():
    for order in ((10.015, 10.004), (10.004, 10.015)):
        sync = RgbdSynchronizer(slop_s=0.02)
        sync.add_image("img", stamp=10.0, arrival=100.0)
        for stamp in order:
            sync.add_depth(f"d{stamp}", stamp=stamp, arrival=100.0)
        assert sync.latest(now=100.1).depth_stamp == 10.004


def test_waits_for_depth_while_depth_stream_is_active():
    sync = RgbdSynchronizer(slop_s=0.02, depth_timeout_s=1.0)
    sync.add_depth("d0", stamp=9.0, arrival=99.5)
    sync.add_image("img1", stamp=10.0, arrival=100.0)
    assert sync.latest(now=100.1) is None  # depth is flowing but none matches yet
    assert "no depth image within sync_slop_s" in sync.explain(now=100.1)
    sync.add_depth("d1", stamp=10.01, arrival=100.2)
    assert sync.latest(now=100.2).depth == "d1"


def test_depth_later_than_the_colour_queue_spans_suggests_a_longer_queue():
    """Depth 0.4 s late at 30 Hz with 10 colour images kept (0.3 s): each depth's colour image
    is gone by the time it arrives; the cure is a longer queue, not another clock."""
    sync = RgbdSynchronizer(slop_s=0.02, queue_size=10)
    for k in range(30):
        t = 10.0 + k / 30
        sync.add_image(f"img{k}", stamp=t, arrival=t + 0.01)
        sync.add_depth(f"d{k}", stamp=t - 0.4, arrival=t + 0.01)
    assert sync.latest(now=11.0) is None
    reason = sync.explain(now=11.0)
    assert "raise sync_queue_size (the 10 kept colour images span 0.300 s)" in reason
    sync.add_depth("d_now", stamp=10.0 + 29 / 30, arrival=11.0)  # one pairs: the hint goes
    assert sync.latest(now=11.0) is not None


def test_depth_from_a_newer_clock_does_not_suggest_a_longer_queue():
    sync = RgbdSynchronizer(slop_s=0.02, queue_size=10)
    sync.add_image("img", stamp=10.0, arrival=100.0)
    sync.add_depth("d", stamp=20.0, arrival=100.0)
    reason = sync.explain(now=100.1)
    assert "no depth image within sync_slop_s" in reason and "sync_queue_size" not in reason


def test_a_paired_frame_that_is_only_old_is_not_blamed_on_depth():
    """A slow camera: the frame has its depth, it is just older than max_input_age_s; telling the
    user to check depth alignment ("closest stamp gap 0.000 s") sent them the wrong way."""
    sync = RgbdSynchronizer(slop_s=0.05, depth_timeout_s=1.0)
    sync.add_image("img", stamp=10.0, arrival=100.0)
    sync.add_depth("d", stamp=10.0, arrival=100.0)
    reason = sync.explain(now=100.8)
    assert reason.startswith("newest colour image arrived 0.80 s ago") and "depth" not in reason


def test_falls_back_to_newest_older_pair_when_newest_image_has_no_depth_yet():
    sync = RgbdSynchronizer(slop_s=0.02)
    sync.add_image("img1", 10.0, 100.0)
    sync.add_depth("d1", 10.0, 100.0)
    sync.add_image("img2", 10.1, 100.1)  # its depth has not arrived
    frame = sync.latest(now=100.11)
    assert (frame.image, frame.depth) == ("img1", "d1")


def test_colour_only_when_depth_stops_or_is_disabled():
    sync = RgbdSynchronizer(slop_s=0.02, depth_timeout_s=0.5)
    sync.add_depth("d0", 9.0, 99.0)
    sync.add_image("img1", 10.0, 100.0)
    frame = sync.latest(now=100.0)  # last depth 1 s ago > timeout: depth considered absent
    assert frame.image == "img1" and frame.depth is None
    disabled = RgbdSynchronizer(use_depth=False)
    disabled.add_depth("d", 10.0, 100.0)
    disabled.add_image("img", 10.0, 100.0)
    assert disabled.latest(100.0).depth is None


def test_sequence_numbers_increase_and_camera_info_is_attached():
    sync = RgbdSynchronizer(use_depth=False)
    assert sync.latest(0.0) is None
    assert "no colour image received yet" in sync.explain(0.0)
    s1 = sync.add_image("a", 1.0, 1.0)
    sync.add_camera_info("info", 1.0)
    s2 = sync.add_image("b", 2.0, 2.0)
    frame = sync.latest(2.0)
    assert s2 > s1 and frame.seq == s2 and frame.camera_info == "info"
    assert frame.age(2.5) == 0.5


def test_queue_is_bounded_and_clear_forgets_everything():
    sync = RgbdSynchronizer(queue_size=3, use_depth=False)
    for k in range(10):
        sync.add_image(k, float(k), float(k))
    assert len(sync._images) == 3
    sync.clear()
    assert sync.latest(10.0) is None and sync.last_arrivals() == {"image": None, "depth": None, "camera_info": None}


def test_clear_can_resize_the_queues():
    """sync_queue_size applies at activate: clear() with a size keeps that many of each stream."""
    sync = RgbdSynchronizer(queue_size=3)
    sync.clear(queue_size=5)
    for k in range(10):
        sync.add_image(k, float(k), float(k))
        sync.add_depth(k, float(k), float(k))
    assert len(sync._images) == 5 and len(sync._depths) == 5


def linear_scan_pair(images, depths, slop_s):
    """The reference: the newest colour image with a depth within slop_s, paired with the
    closest one, and of equally close ones the last added (what pairing has always picked)."""
    for img in reversed(images):
        best, best_dt = None, slop_s
        for d in depths:
            if abs(d[1] - img[1]) <= best_dt:
                best, best_dt = d, abs(d[1] - img[1])
        if best is not None:
            return img[0], best[0]
    return None


def test_pairing_picks_what_a_scan_of_every_depth_picks():
    """Stamps with few decimals (ties on both sides, repeated stamps of a looping bag) and stamps
    of 1e-20 s next to 0.03 s (different stamps whose gaps are equal once rounded): the same
    pair and the same closest gap."""
    rng = random.Random(7)
    for case in range(3000):
        slop = rng.choice([0.0, 0.01, 0.05, 0.2])
        sync = RgbdSynchronizer(slop_s=slop, queue_size=rng.randint(1, 12))
        for k in range(rng.randint(1, 20)):
            if rng.random() < 0.3:
                stamp = rng.randint(0, 4) * 1e-20
            else:
                stamp = round(rng.uniform(0, 0.3), rng.choice([1, 2, 3]))
            (sync.add_image if rng.random() < 0.5 else sync.add_depth)(f"m{k}", stamp, 0.0)
        images = [(i.msg, i.stamp) for i in sync._images]
        depths = [(d.msg, d.stamp) for d in sync._depths]
        frame = sync.latest(0.0)
        if not depths:
            continue
        assert (frame and (frame.image, frame.depth)) == linear_scan_pair(images, depths, slop), case
        said = re.search(r"closest stamp gap (\S+) s", sync.explain(0.0))
        if images and frame is None:
            closest = min(abs(d[1] - i[1]) for i in images for d in depths)
            assert said and said.group(1) == f"{closest:.3f}", case
        else:
            assert said is None, case


def _counted(name: str):
    """float's operator ``name``, counting its calls in CountingStamp.ops."""
    def op(self, other):
        CountingStamp.ops += 1
        return getattr(float, name)(self, other)
    return op


class CountingStamp(float):
    """A stamp that counts the subtractions and comparisons made with it."""

    ops = 0
    __sub__, __rsub__ = _counted("__sub__"), _counted("__rsub__")
    __lt__, __le__, __gt__, __ge__ = _counted("__lt__"), _counted("__le__"), _counted("__gt__"), _counted("__ge__")
    __eq__, __ne__ = _counted("__eq__"), _counted("__ne__")
    __hash__ = float.__hash__


def test_pairing_a_long_queue_never_compares_every_image_with_every_depth():
    """sync_queue_size 1000 and depth from another clock (it never pairs): the scheduler pairs
    under its lock on every frame, and a scan of every depth per colour image (a million steps
    for latest(), more for explain()) held it for a tenth of a second."""
    n = 1000
    sync = RgbdSynchronizer(slop_s=0.02, queue_size=n)
    for k in range(n):
        sync.add_image(k, CountingStamp(1e6 + k / 30), arrival=100.0)
        sync.add_depth(k, CountingStamp(k / 30), arrival=100.0)
    CountingStamp.ops = 0
    assert sync.latest(now=100.0) is None
    assert "no depth image within sync_slop_s" in sync.explain(now=100.0)
    assert CountingStamp.ops < 100 * n, CountingStamp.ops
