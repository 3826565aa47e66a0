"""The RGB-D synchronizer's pairing rules (ROS-free: stamps and arrivals are plain floats)."""

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
