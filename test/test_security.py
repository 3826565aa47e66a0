"""Security: command cap, no file path or import from a topic or service, safetensors only, no remote code.

The node listens on DDS, where anyone on the network can publish or call. What arrives there is
data (images, commands to *find* something), never a file to open, a module to import or a
model to load. Those come from parameters set at start-up only (read-only parameters), and
weights load through safetensors only: a pickle is never unpickled (every test here that
offers one also makes unpickling fail the test, and the pickle would leave a marker behind).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import pickle
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
from geometry_msgs.msg import TransformStamped
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from tf2_msgs.msg import TFMessage

from qwen3vl_seg_ros.commands import clean_command
from qwen3vl_seg_ros.model import checkpoint, loading
from qwen3vl_seg_ros.model.checkpoint import DecoderCheckpointError, load_decoder
from qwen3vl_seg_ros.model.configuration import DECODER_SIZES, MaskDecoderConfig
from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros.parameters import BY_NAME
from qwen3vl_seg_ros.types import InputError, SegmenterError

from reliability_helpers import System
from ros_harness import Scene, camera_info_msg, image_msg, must_call_service

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qwen3vl_seg_ros"
NODE = "/security/qwen3vl_seg"


@pytest.fixture(scope="module")
def system():
    s = System("security")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# the command length cap
# ---------------------------------------------------------------------------------------------
def test_command_length_is_capped_before_any_processing():
    with pytest.raises(InputError, match="1001 characters long; the limit is max_command_length=1000"):
        clean_command("a" * 1001, 1000)
    assert clean_command("a" * 1000, 1000)[0] == "a" * 1000


@pytest.mark.ros
def test_the_cap_itself_is_capped(system):
    """max_command_length cannot be raised past 100,000 characters (nor lowered below 1)."""
    from rclpy.parameter import Parameter

    assert not system.node.set_parameters([Parameter("max_command_length", value=10_000_000)])[0].successful
    assert not system.node.set_parameters([Parameter("max_command_length", value=0)])[0].successful
    assert system.node.p("max_command_length") == 1000


# ---------------------------------------------------------------------------------------------
# no file path, module or model ever comes from a topic or service
# ---------------------------------------------------------------------------------------------
_AUDIT = {"on": False, "events": []}
_WATCHED = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "shutil.copyfile", "import",
            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "exec", "compile", "socket.connect",
            "urllib.Request", "pickle.find_class", "ctypes.dlopen")


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["on"] and event in _WATCHED:
        try:
            text = repr(args)[:2000]
        except Exception:  # a repr may fail during interpreter internals
            text = "<unrepresentable>"
        _AUDIT["events"].append((event, text))


def _string_param(name: str, value: str) -> ParameterMsg:
    return ParameterMsg(name=name, value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value))


@pytest.mark.ros
def test_strings_from_topics_and_services_are_never_opened_imported_or_run(system, tmp_path):
    """Python's audit hooks see every open, import, exec and subprocess of the process; strings
    that look like paths, URLs and module specs go in through every door (topics, the service,
    TF, the parameter and lifecycle services); none of them may appear in such an event."""
    mark = f"sec{uuid.uuid4().hex}"
    paths = [f"/tmp/{mark}/weights.safetensors", f"file:///tmp/{mark}/model.pt", f"../../{mark}/etc/passwd",
             f"doubles.{mark}:Evil", f"https://example.com/{mark}.bin", f"$(touch /tmp/{mark})", f"{mark}.json"]
    if not getattr(sys, "_qwen3vl_seg_audit", False):
        sys.addaudithook(_audit)  # cannot be removed: it is switched off by the flag after the test
        sys._qwen3vl_seg_audit = True  # type: ignore[attr-defined]
    _AUDIT["events"].clear()
    _AUDIT["on"] = True
    try:
        scene = Scene()
        client = system.client
        for path in paths:
            stamp = client.node.get_clock().now().to_msg()
            img = image_msg(scene.rgb(), "rgb8", frame_id=path, stamp=stamp)
            client.image_pub.publish(img)
            client.depth_pub.publish(image_msg(scene.depth_m(), "32FC1", frame_id=path, stamp=stamp))
            info = camera_info_msg(scene, frame_id=path, stamp=stamp)
            info.distortion_model = path
            client.info_pub.publish(info)
            tf = TransformStamped(child_frame_id=path)
            tf.header.frame_id = f"{path}/parent"
            tf.transform.rotation.w = 1.0
            client.node.create_publisher(TFMessage, "/tf", 10).publish(TFMessage(transforms=[tf]))
            result = client.call(f"red {path}", request_id=path).result
            assert result.status == SegmentationResult.OK and result.request_id == path
            client.send_command(f"red {path}")
        client.send_command("")
        # the parameters that name files or code are read-only: the parameter service refuses them
        names = ("model", "decoder", "segmenter", "compile_cache_dir")
        answer = must_call_service(
            system.client.node, SetParameters, f"{NODE}/set_parameters",
            SetParameters.Request(parameters=[_string_param(n, paths[k]) for k, n in enumerate(names)]),
            answer_wait_s=15.0)
        assert [r.successful for r in answer.results] == [False] * len(names)
        assert all("read-only" in r.reason for r in answer.results), [r.reason for r in answer.results]
        # ... so configuring again through the lifecycle service loads what the launch said
        for transition in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                           Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert must_call_service(system.client.node, ChangeState, f"{NODE}/change_state",
                                     ChangeState.Request(transition=Transition(id=transition)),
                                     answer_wait_s=15.0).success
        assert system.node._segmenter.name == "color_blob_double"
        system.client.wait_connected()
        system.client.publish_frame(scene)
        assert system.client.call("red").result.status == SegmentationResult.OK
        # positive control: the hook does see a path when one is opened
        (tmp_path / f"{mark}-control").write_text("x")
    finally:
        _AUDIT["on"] = False
    events = list(_AUDIT["events"])
    control = [e for e in events if e[0] == "open" and f"{mark}-control" in e[1]]
    assert control, "the audit hook saw nothing: the test would prove nothing"
    leaks = [e for e in events if mark in e[1] and e not in control]
    assert leaks == []


def test_topic_and_service_callbacks_never_touch_files_or_imports():
    """A static guard for the node's input callbacks (a new one must not add such calls)."""
    tree = ast.parse((PACKAGE / "ros" / "node.py").read_text())
    callbacks = {"_on_image", "_on_depth", "_on_camera_info", "_on_command", "_on_segment", "_serve", "_refusal",
                 "_on_set_parameters"}
    banned = {"open", "Path", "import_module", "__import__", "load_segmenter_class", "create_segmenter",
              "_segmenter_factory", "eval", "exec", "system", "Popen", "load", "loads"}
    seen = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in callbacks:
            seen.add(fn.name)
            names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
            assert not names & banned, (fn.name, names & banned)
    assert seen == callbacks
    factory_users = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                     and any(isinstance(n, ast.Attribute) and n.attr == "_segmenter_factory"
                             and isinstance(n.ctx, ast.Load) for n in ast.walk(fn))}
    assert factory_users == {"_configure"}  # the lifecycle's configure step, and only it:
    configure_callers = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                         and any(isinstance(n, ast.Attribute) and n.attr == "_configure"
                                 and isinstance(n.ctx, ast.Load) for n in ast.walk(fn))}
    assert configure_callers == {"on_configure"}


def test_parameters_naming_files_or_code_are_startup_only():
    for name in ("segmenter", "model", "decoder", "compile_cache_dir", "local_files_only"):
        assert BY_NAME[name].read_only, name
    assert BY_NAME["local_files_only"].default is True  # never reach the network unless the launch says so
    assert not BY_NAME["score_threshold"].read_only


# ---------------------------------------------------------------------------------------------
# weights: safetensors only, a pickle is refused and never unpickled
# ---------------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this creates a folder: the proof that a pickle was executed."""

    marker = ""

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def _evil_pickle(path: Path, marker: Path) -> None:
    _Evil.marker = str(marker)
    path.write_bytes(pickle.dumps({"weight": _Evil()}))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any call into pickle or torch.load fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was about to be loaded")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


def _tiny_decoder_config(folder: Path) -> None:
    MaskDecoderConfig(vit_dim=32, vit_layers=(0,), visual_token_dim=32, llm_dim=32, **DECODER_SIZES["tiny"]).save(
        folder / checkpoint.DECODER_CONFIG)


def test_pickle_decoder_checkpoints_are_refused(tmp_path, no_unpickling):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "decoder"
    folder.mkdir()
    _tiny_decoder_config(folder)
    for name in ("mask_decoder.pt", "mask_decoder.bin", "mask_decoder.ckpt", "mask_decoder.pkl", "mask_decoder.pth"):
        _evil_pickle(folder / name, marker)
    with pytest.raises(DecoderCheckpointError, match=r"lacks mask_decoder\.safetensors; found .* which are not loaded"):
        load_decoder(folder)
    with pytest.raises(DecoderCheckpointError, match="is a pickle-based file; only safetensors"):
        load_decoder(folder / "mask_decoder.pt")
    assert not marker.exists()


def test_a_pickle_renamed_to_safetensors_is_not_unpickled(tmp_path, no_unpickling):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "decoder"
    folder.mkdir()
    _tiny_decoder_config(folder)
    _evil_pickle(folder / checkpoint.DECODER_WEIGHTS, marker)
    with pytest.raises(Exception) as info:
        load_decoder(folder)
    assert "pickle was about to be loaded" not in str(info.value)
    assert not marker.exists()


def _qwen_folder(folder: Path, weights: dict[str, bytes]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    for name, data in weights.items():
        (folder / name).write_bytes(data)
    return folder


def test_pickle_model_weights_are_refused(tmp_path, no_unpickling):
    marker = tmp_path / "unpickled"
    folder = _qwen_folder(tmp_path / "model", {})
    _evil_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(SegmenterError, match=r"has no \.safetensors weights"):
        loading.check_qwen3vl_folder(folder)
    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    with pytest.raises(SegmenterError, match=r"has no \.safetensors weights"):
        Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu"))
    assert not marker.exists()


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a2146b1c5bb55e5ac5c1d7e3c6c7e9b0a7f1f5fa1e1c3d0f7a5b0c8e9d1a2\nsize 11534336\n")


def test_weights_that_are_git_lfs_pointers_or_corrupt_are_named(tmp_path):
    """A model repository cloned without git-lfs holds pointer files where the weights should be;
    safetensors' own error ("header too large") used to surface as an internal error."""
    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    folder = build_tiny_checkpoint(tmp_path / "model", answer=({"bbox_2d": [0, 0, 10, 10], "label": "x"},))
    weights = sorted(folder.glob("model*.safetensors"))
    assert weights
    weights[0].write_bytes(LFS_POINTER)
    with pytest.raises(SegmenterError, match=rf"cannot load the Qwen3-VL weights .*{weights[0].name} is a Git "
                                             r"LFS pointer, not the weights: run `git lfs install && git lfs pull`"):
        Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu"))
    weights[0].write_bytes(b"\xff" * 64)  # corrupt: no pointer note, but the file's folder is named
    with pytest.raises(SegmenterError, match="cannot load the Qwen3-VL weights from") as info:
        Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu"))
    assert "LFS" not in str(info.value)

    decoder = tmp_path / "decoder"
    decoder.mkdir()
    _tiny_decoder_config(decoder)
    (decoder / checkpoint.DECODER_WEIGHTS).write_bytes(LFS_POINTER)
    with pytest.raises(DecoderCheckpointError, match=r"is not a valid safetensors file .*is a Git LFS pointer"):
        load_decoder(decoder)


def test_weights_missing_from_a_checkpoint_are_an_error_not_random_values(tmp_path):
    """A truncated merge or export: transformers filled the missing layer with random values and
    only printed a table, so the node answered nonsense without an error."""
    from safetensors.torch import load_file, save_file

    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    folder = build_tiny_checkpoint(tmp_path / "model", answer=({"bbox_2d": [0, 0, 10, 10], "label": "x"},))
    (weights,) = sorted(folder.glob("model*.safetensors"))
    tensors = load_file(str(weights))
    dropped = [k for k in tensors if ".layers.1." in k and "language_model" in k]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(SegmenterError, match=r"do not fit its config.json: tensors missing \[.*layers\.1\."):
        Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu"))


# ---------------------------------------------------------------------------------------------
# trust_remote_code is never set; hub downloads fetch no code and no pickles
# ---------------------------------------------------------------------------------------------
def test_trust_remote_code_appears_nowhere_in_the_package():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                assert all(k.arg != "trust_remote_code" for k in node.keywords), path


class _Recorder:
    """Stands in for from_pretrained / snapshot_download and records their keyword arguments."""

    def __init__(self, result=None, exc: Exception | None = None):
        self.calls: list[dict] = []
        self.result = result
        self.exc = exc
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls.append(kwargs)
        if self.exc is not None:
            raise self.exc
        return self.result


def test_loading_passes_safetensors_only_and_never_trusts_remote_code(tmp_path, monkeypatch):
    folder = _qwen_folder(tmp_path / "model", {"model.safetensors": b"not really"})
    model_load = _Recorder(exc=OSError("stop here"))
    processor_load = _Recorder(exc=OSError("stop here"))
    hub = _Recorder(result=str(folder))
    monkeypatch.setattr(loading.Qwen3VLForConditionalGeneration, "from_pretrained", model_load)
    monkeypatch.setattr(loading.AutoProcessor, "from_pretrained", processor_load)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    with pytest.raises(SegmenterError):
        loading.load_qwen3vl(folder, torch.device("cpu"), torch.float32)
    with pytest.raises(SegmenterError):
        loading.load_processor(folder)
    assert loading.resolve_model_folder("some-org/some-model", local_files_only=True) == folder
    for calls in (model_load.calls, processor_load.calls, hub.calls):
        assert calls and all(not c.get("trust_remote_code") for c in calls)
        assert all(c.get("local_files_only") is True for c in calls)
    assert model_load.calls[0].get("use_safetensors") is True


@pytest.mark.parametrize("name", ["modeling_evil.py", "pytorch_model.bin", "model.pt", "weights.pth",
                                  "weights.pkl", "model.ckpt", "optimizer.pt"])
def test_hub_downloads_fetch_no_code_and_no_pickles(name):
    assert not any(fnmatch.fnmatch(name, p) for p in loading._HUB_PATTERNS), name


def test_hub_download_patterns_match_no_python_file_named_like_a_tokenizer():
    assert not any(fnmatch.fnmatch("tokenizer_evil.py", p) for p in loading._HUB_PATTERNS)


def test_remote_code_in_a_checkpoint_folder_is_not_run(tmp_path):
    """A folder whose config asks for custom code (auto_map) next to the code itself."""
    marker = tmp_path / "remote_code_ran"
    folder = _qwen_folder(tmp_path / "model", {"model.safetensors": b"not really"})
    config = {"model_type": "qwen3_vl", "auto_map": {"AutoProcessor": "evil.EvilProcessor",
                                                     "AutoModel": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps({"auto_map": config["auto_map"],
                                                                 "processor_class": "EvilProcessor"}))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).mkdir()\n"
                                    "class EvilProcessor: pass\nclass EvilModel: pass\n")
    with pytest.raises(SegmenterError):
        loading.load_processor(folder)
    assert not marker.exists()
