"""Inference engines: run a torch feature module in torch eager or, exported once to ONNX, in ONNX Runtime or
OpenVINO.

An engine maps a float32 input batch (B, 3, S, S) to the module's outputs as float32 arrays. The ONNX graph is
cached on disk under a key of everything that shapes it, so the export happens once per backbone, weights,
input size, levels and package version. Any module returning a tuple of tensors with the batch first can be
exported (pooled vectors, followed by spatial feature maps when map levels are asked for). ``auto`` runs a graph in
whichever of ONNX Runtime and OpenVINO is faster on it here, where both give the same features
(:func:`fastest_engine`, measured once per graph and cached beside the graphs).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from ..version import __version__
from ..errors import GaussadError
from .files import write_atomic
from . import ENGINES

if TYPE_CHECKING:
    import onnx
    from torch import nn

OPSET = 17
# What the exported graphs compute beyond their key's settings, in the cache key so that graphs cached before a change
# are rebuilt: 2 = pooled means taken as means of row means (issue 34; PooledLevels).
GRAPH_REVISION = 2


class Engine(Protocol):
    """What the feature pipeline needs from an engine."""

    name: str

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs of the module for a float32 (B, 3, S, S) batch, as float32 arrays."""
        ...


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported here, and onnx (for the export) is installed.

    onnx is looked up, not imported: importing it takes most of a second and only an export needs it.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return _onnx_installed()


def openvino_available() -> bool:
    """Whether OpenVINO can be imported here, and onnx (for the export) is installed."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return _onnx_installed()


def _onnx_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("onnx") is not None
    except ValueError:  # a module entry without a spec (sys.modules["onnx"] = None)
        return False


AUTO_ENGINE_VARIABLE = "GAUSSAD_AUTO_ENGINE"  # "onnxruntime": engine 'auto' never times OpenVINO (default "fastest")


def auto_runtimes() -> tuple[str, ...]:
    """The runtimes engine 'auto' chooses between for an ONNX graph: onnxruntime, and openvino where it is installed,
    unless $GAUSSAD_AUTO_ENGINE is "onnxruntime" (the same runtime in every process and on every machine, without
    timing; the test suite sets it)."""
    pinned = os.environ.get(AUTO_ENGINE_VARIABLE, "fastest")
    if pinned not in ("fastest", "onnxruntime"):
        raise GaussadError(f"${AUTO_ENGINE_VARIABLE} is {pinned!r}; it may be 'fastest' (the default: the faster of "
                           "ONNX Runtime and OpenVINO where both are installed) or 'onnxruntime'")
    return ("onnxruntime", "openvino") if pinned == "fastest" and openvino_available() else ("onnxruntime",)


def resolve_engine(engine: str) -> str:
    """The engine family for a requested name: ``auto`` is onnxruntime when installed (with onnx; where OpenVINO is
    installed too, :func:`fastest_engine` may then run the graph in OpenVINO instead), else openvino when installed,
    else torch; an engine asked for by name that is not installed is an error naming the packages."""
    if engine not in ENGINES:
        raise GaussadError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "auto":
        return "onnxruntime" if onnxruntime_available() else "openvino" if openvino_available() else "torch"
    if engine == "onnxruntime" and not onnxruntime_available():
        raise GaussadError("engine 'onnxruntime' needs the onnx and onnxruntime packages (pip install onnx "
                           "onnxruntime); or use engine 'torch'")
    if engine == "openvino" and not openvino_available():
        raise GaussadError("engine 'openvino' needs the onnx and openvino packages (pip install onnx openvino, or "
                           "gaussad's extra: pip install 'gaussad[openvino]'); or use engine 'onnxruntime'")
    return engine


_THREADS: dict[str, int | None] = {"n": None}


def set_threads(n: int | None) -> None:
    """Size this process's engines and decoding threads to ``n`` cores (None: every core it may run on); a Dask
    worker sharing its machine with others sets its share (:mod:`gaussad.tools.distributed`)."""
    _THREADS["n"] = None if n is None else max(1, int(n))


def cpu_count() -> int:
    """Cores this process may use: those set by :func:`set_threads`, else those it may run on."""
    if _THREADS["n"] is not None:
        return _THREADS["n"]
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cache_dir() -> Path:
    """Where exported graphs are kept: $GAUSSAD_CACHE, else ~/.cache/gaussad."""
    env = os.environ.get("GAUSSAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gaussad"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TorchEngine:
    """The module in torch eager, under inference mode."""

    name = "torch"

    def __init__(self, module: "nn.Module"):
        self.module = module.eval()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return [o.numpy() for o in self.module(torch.from_numpy(batch))]


class OnnxRuntimeEngine:
    """An ONNX graph in an ONNX Runtime CPU session with one intra-op thread per core."""

    name = "onnxruntime"

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_count()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Decoding threads share the cores: idle ORT workers sleep instead of spinning. Without the memory
        # pattern ORT holds about 170 MB less at batch 16 (measured), at no measurable cost in speed. Without its
        # CPU arena (which keeps every block it grew to, for the input shapes seen so far) a process extracting
        # features of 7,000 aspect-resized tile images held about 100 MB less and its peak stopped growing after the
        # first 2,000 images, again at no measurable cost in speed (EXPERIMENTS.md, issue 16, seventh session).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_mem_pattern = False
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        source = model if isinstance(model, bytes) else os.fspath(model)
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        # Each output's second axis (channels): static in every exported graph, known without torch.
        self.channels = [o.shape[1] for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})


class OpenVinoEngine:
    """An ONNX graph compiled by OpenVINO for its CPU plugin: fp32 arithmetic, one stream using one thread per core.

    OpenVINO's CPU plugin computes in bfloat16 by default on CPUs with AVX-512 BF16 or AMX (outputs up to 3e-2 of
    their scale off, EXPERIMENTS.md); the precision hint keeps fp32, so that its features equal ONNX Runtime's and
    torch's. A QDQ int8 graph runs with OpenVINO's own int8 kernels. Each thread gets its own infer request (the service's worker threads
    share one engine).
    """

    name = "openvino"

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        import openvino as ov

        core = ov.Core()
        graph = core.read_model(model if isinstance(model, bytes) else os.fspath(model))
        self.compiled = core.compile_model(graph, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads or cpu_count()})
        self.channels = [o.get_partial_shape()[1].get_length() for o in self.compiled.outputs]
        # the ONNX file's metadata properties (the graph's cache key), which OpenVINO's reader keeps as "framework"
        framework = graph.get_rt_info()["framework"] if graph.has_rt_info("framework") else {}
        self.metadata = {k: v.astype(str) for k, v in framework.items()}
        self._local = threading.local()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        # copies: the request's output tensors are overwritten by its next inference
        return [np.array(request.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]


GraphEngine = OnnxRuntimeEngine | OpenVinoEngine
GRAPH_ENGINES: dict[str, Callable[[str | os.PathLike | bytes], GraphEngine]] = {
    "onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}


def export_onnx(module: "nn.Module", input_size: int, meta: dict[str, str] | None = None,
                any_size: bool = False) -> bytes:
    """Serialised ONNX graph of ``module`` for a (batch, 3, input_size, input_size) input, batch axis dynamic;
    with ``any_size`` the height and width axes (and those of spatial outputs) are dynamic too."""
    import onnx
    import torch

    example = torch.zeros(2, 3, input_size, input_size)
    with torch.inference_mode():
        shapes = [o.shape for o in module(example)]
    outputs = [f"out{i}" for i in range(len(shapes))]
    spatial = {2: "height", 3: "width"} if any_size else {}
    axes = {"input": {0: "batch", **spatial}}
    for name, shape in zip(outputs, shapes):
        axes[name] = {0: "batch", **({2: f"{name}_height", 3: f"{name}_width"} if any_size and len(shape) == 4 else {})}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=OPSET, input_names=["input"], output_names=outputs,
            dynamic_axes=axes,
        )
    model = onnx.load_from_string(buf.getvalue())
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def graph_key(graph: str, backbone: str, weights: str | os.PathLike | None, input_size: int,
              levels: Sequence[int], map_levels: Sequence[int] = ()) -> dict[str, str]:
    """Everything that determines an exported graph, as strings (stored in the graph's metadata too).

    ``graph`` names what the module computes (e.g. "pooled"); ``weights`` is the file the backbone loads. A
    weights path that is not a readable file hashes as "none": no graph is ever cached under it, since
    building the backbone from it fails with the loader's own error.
    """
    try:
        weights_sha256 = file_digest(weights) if weights is not None else "none"
    except OSError:
        weights_sha256 = "none"
    return {
        "gaussad.graph": graph,
        "gaussad.backbone": backbone,
        "gaussad.weights_sha256": weights_sha256,
        "gaussad.input_size": str(int(input_size)),
        "gaussad.levels": ",".join(map(str, levels)),
        "gaussad.map_levels": ",".join(map(str, map_levels)),
        "gaussad.version": __version__,
        "gaussad.torch": metadata.version("torch"),
        "gaussad.opset": str(OPSET),
        "gaussad.graph_revision": str(GRAPH_REVISION),
    }


def _cache_path(key: dict[str, str], directory: str | os.PathLike | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(directory) if directory is not None else cache_dir()
    return path / f"{key['gaussad.backbone']}-{key['gaussad.graph']}-{digest}.onnx"


def _cached(build: Callable[[], "nn.Module"], input_size: int, key: dict[str, str],
            directory: str | os.PathLike | None, any_size: bool,
            engine: str = "onnxruntime") -> tuple[Path | None, bytes | None, GraphEngine | None]:
    """(cache file, or None when it cannot be written; the graph's bytes when just exported; an ``engine`` of a valid
    cached file)."""
    path = _cache_path(key, directory)
    if path.is_file():
        try:
            runner = GRAPH_ENGINES[engine](path)
        except Exception:  # the runtimes raise their own types for a truncated or foreign file: rebuild it
            runner = None
        if runner is not None and all(runner.metadata.get(k) == v for k, v in key.items()):
            return path, None, runner
    data = export_onnx(build(), input_size, key, any_size)
    try:
        write_atomic(path, data, "ONNX graph")
    except GaussadError as exc:
        warnings.warn(f"gaussad: cannot cache the ONNX graph in {path.parent} ({exc}); exporting it on each run",
                      stacklevel=3)
        return None, data, None
    return path, data, None


def cached_onnx_engine(build: Callable[[], "nn.Module"], input_size: int, key: dict[str, str],
                       directory: str | os.PathLike | None = None, any_size: bool = False,
                       engine: str = "onnxruntime") -> GraphEngine:
    """An engine of the ONNX graph of the module ``build()`` makes, built and exported only when no valid cached
    graph matches ``key``: ``engine`` "onnxruntime", "openvino", or "fastest" (:func:`fastest_engine` of the two).

    A cache file that is damaged or was made for another key is rebuilt; an unwritable cache folder means
    the graph is exported to memory for this process only.
    """
    path, data, runner = _cached(build, input_size, key, directory, any_size,
                                 "onnxruntime" if engine == "fastest" else engine)
    graph = path if path is not None else data
    if engine == "fastest":
        return fastest_engine(graph, input_size, runner, directory)
    return runner if runner is not None else GRAPH_ENGINES[engine](graph)


def cached_onnx_graph(build: Callable[[], "nn.Module"], input_size: int, key: dict[str, str],
                      directory: str | os.PathLike | None = None, any_size: bool = False) -> bytes:
    """The serialised fp32 ONNX graph that :func:`cached_onnx_engine` runs, from the same on-disk cache."""
    path, data, _ = _cached(build, input_size, key, directory, any_size)
    return data if data is not None else path.read_bytes()


# engine 'auto' where OpenVINO is installed: the graph runs in OpenVINO only where its outputs equal ONNX Runtime's to
# AGREEMENT (each output's largest difference over its largest magnitude) and it ran the timing batch faster.
AGREEMENT = 1e-5
CHOICE_BATCH, CHOICE_REPEATS = 4, 3  # the timing: random (4, 3, S, S) inputs, best of 3 runs after one warm-up each


def relative_difference(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The largest over the outputs of max |a - b| / max |b|: how far one engine's outputs are from another's, in
    units of each output's scale (an element-wise ratio would be dominated by features near 0)."""
    worst = 0.0
    for a, b in zip(outputs, reference, strict=True):
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        gap = float(np.max(np.abs(a.astype(np.float64) - b))) if b.size else 0.0
        worst = max(worst, gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf))
    return worst


def choose_engine(seconds: dict[str, float], outputs: dict[str, Sequence[np.ndarray]]) -> str:
    """The engine 'auto' runs a graph in, from each engine's time on the same batch and its outputs there: openvino
    where its outputs agree with onnxruntime's to :data:`AGREEMENT` (:func:`relative_difference`) and it took less
    time, else onnxruntime."""
    if relative_difference(outputs["openvino"], outputs["onnxruntime"]) > AGREEMENT:
        return "onnxruntime"
    return "openvino" if seconds["openvino"] < seconds["onnxruntime"] else "onnxruntime"


def measure_engines(engines: dict[str, GraphEngine], batch: np.ndarray,
                    repeats: int = CHOICE_REPEATS) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
    """Each engine's best time over ``repeats`` runs of ``batch`` (the engines taking turns, after one untimed run
    each) and its outputs."""
    outputs = {name: engine.run(batch) for name, engine in engines.items()}
    seconds = {name: math.inf for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.run(batch)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds, outputs


def _choice_path(graph: bytes, directory: str | os.PathLike | None) -> Path:
    """Where the choice of 'auto' for ``graph`` is kept: keyed by the graph's bytes, both runtimes' versions and the
    threads the engines run with (what the timing depends on)."""
    parts = [hashlib.sha256(graph).hexdigest(), metadata.version("onnxruntime"), metadata.version("openvino"),
             str(cpu_count())]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]
    return (Path(directory) if directory is not None else cache_dir()) / f"engine-choice-{digest}.json"


def fastest_engine(graph: str | os.PathLike | bytes, input_size: int, onnxruntime: OnnxRuntimeEngine | None = None,
                   directory: str | os.PathLike | None = None) -> GraphEngine:
    """An engine of ``graph`` (a file or its bytes) in the runtime 'auto' chose for it (:func:`choose_engine`): read
    from the cache folder, else measured now on a random batch of ``input_size`` inputs and kept there (a JSON file
    holding the times and the difference too; or OpenVINO's error where it cannot compile or run the graph, which then
    stays in ONNX Runtime). ``onnxruntime``: an ONNX Runtime engine of ``graph`` already built."""
    data = graph if isinstance(graph, bytes) else Path(graph).read_bytes()
    path = _choice_path(data, directory)
    try:
        choice = json.loads(path.read_text())["engine"]
    except (OSError, ValueError, KeyError, TypeError):
        choice = None
    if choice not in GRAPH_ENGINES:
        engines: dict[str, GraphEngine] = {"onnxruntime": onnxruntime or OnnxRuntimeEngine(graph)}
        batch = np.random.default_rng(0).standard_normal((CHOICE_BATCH, 3, input_size, input_size), dtype=np.float32)
        try:
            engines["openvino"] = OpenVinoEngine(graph)
            seconds, outputs = measure_engines(engines, batch)
        except Exception as exc:  # OpenVINO cannot compile or run this graph: ONNX Runtime, as without OpenVINO
            choice = "onnxruntime"
            record = {"engine": choice, "openvino_error": str(exc)[:500], "cpu": cpu_isa()}
        else:
            choice = choose_engine(seconds, outputs)
            record = {"engine": choice, "seconds": seconds, "batch": list(batch.shape), "threads": cpu_count(),
                      "relative_difference": relative_difference(outputs["openvino"], outputs["onnxruntime"]),
                      "agreement": AGREEMENT, "cpu": cpu_isa()}
        try:
            write_atomic(path, json.dumps(record, indent=1).encode(), "engine choice")
        except GaussadError as exc:
            warnings.warn(f"gaussad: cannot keep the engine choice in {path.parent} ({exc}); measuring it on each run",
                          stacklevel=3)
        return engines[choice]
    if choice == "onnxruntime" and onnxruntime is not None:
        return onnxruntime
    return GRAPH_ENGINES[choice](graph)


# int8: ONNX Runtime's static quantization, as measured in bench/speed/int8.py (BENCHMARKS.md, "int8"): shape inference and
# graph optimisation first (without them ONNX Runtime fuses no quantized operator and int8 is no faster), then QDQ
# with uint8 activations, their ranges the minima and maxima over the calibration inputs, and the weights of
# INT8_FORMAT.
INT8_CALIBRATION_IMAGES = 64


@dataclass(frozen=True)
class Int8Format:
    """How an int8 network is quantized: its weights (activations are always uint8) and which convolutions stay fp32.

    On x86-64 without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with ``VPMADDUBSW``, whose
    16-bit sums of two products saturate where both are large (its quantization guide, "data type selection"):
    full-range int8 weights then give features tens of per cent off there, and only there. Weights quantized to 7
    bits (``reduce_range``) cannot saturate that sum, so they score alike on every CPU. Depthwise convolutions are
    computed with 32-bit sums on every CPU, so ``depthwise_full_range`` keeps their 8 bits (half the feature error of
    7 bits there). The ``fp32_first`` and ``fp32_last`` convolutions of the graph (EfficientNet: the stem and first
    block, at half the input side; the head) stay fp32: most of the error of the levels they feed, for a few per
    cent of the arithmetic (EXPERIMENTS.md, "int8 on CPUs without VNNI").
    """

    name: str
    weight_type: str  # "int8" or "uint8"
    per_channel: bool
    reduce_range: bool
    depthwise_full_range: bool = False
    fp32_first: int = 0
    fp32_last: int = 0

    @property
    def saturates_without_vnni(self) -> bool:
        """Whether x86-64 CPUs without VNNI compute this format's products with saturating 16-bit sums."""
        return self.weight_type == "int8" and not self.reduce_range

    def fp32_nodes(self, graph: "onnx.ModelProto") -> list[str]:
        """The names of the convolutions of ``graph`` this format leaves in fp32."""
        convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
        return convs[:self.fp32_first] + (convs[-self.fp32_last:] if self.fp32_last else [])

    def overrides(self, graph: "onnx.ModelProto") -> dict[str, list[dict]]:
        """ONNX Runtime's per-tensor overrides of this format: the depthwise weights of ``graph`` at full range."""
        if not (self.depthwise_full_range and self.reduce_range):
            return {}
        return {n.input[1]: [{"axis": 0, "reduce_range": False}] for n in graph.graph.node
                if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)}


INT8_FORMATS: dict[str, Int8Format] = {f.name: f for f in (
    # gaussad 0.1.0's int8 models: every convolution with per-channel 8-bit signed weights (right only on CPUs with
    # VNNI, or not x86)
    Int8Format("u8s8", "int8", per_channel=True, reduce_range=False),
    # per-channel 7-bit signed weights, 8-bit in depthwise convolutions, the first three convolutions and the last
    # in fp32: the same features on every CPU
    Int8Format("u8s7-dw8-ends", "int8", per_channel=True, reduce_range=True, depthwise_full_range=True,
               fp32_first=3, fp32_last=1),
)}
INT8_FORMAT = "u8s7-dw8-ends"  # what fit writes
LEGACY_INT8_FORMAT = "u8s8"  # what int8 model files that record no format were written with


def cpu_isa() -> str:
    """The instruction set that decides ONNX Runtime's int8 kernels here: ``x86_64+avx512vnni``, ``x86_64+avxvnni``,
    ``x86_64+avx2``, ``x86_64``, or the machine's name elsewhere (``arm64``, ...).

    Read from the CPUID flags NumPy detected (what the operating system enables, as ONNX Runtime sees them); AVX-VNNI,
    which NumPy does not name, from /proc/cpuinfo on Linux.
    """
    import platform

    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return machine or "unknown"
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    if features.get("AVX512VNNI"):
        return "x86_64+avx512vnni"
    if features.get("AVX2") and _cpuinfo_flag("avx_vnni"):
        return "x86_64+avxvnni"
    return "x86_64+avx2" if features.get("AVX2") else "x86_64"


def _cpuinfo_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return any(line.startswith("flags") and flag in line.split() for line in fh)
    except OSError:
        return False


def int8_saturates(fmt: str, isa: str) -> bool:
    """Whether an int8 network of format ``fmt`` scores differently on a CPU of instruction set ``isa`` (see
    :class:`Int8Format`) than where it was calibrated: x86-64 without VNNI and 8-bit signed weights."""
    return INT8_FORMATS[fmt].saturates_without_vnni and isa.startswith("x86_64") and "vnni" not in isa


def int8_summary(fmt: str, calibrated_on: str | None) -> dict:
    """What the service says of a fitted int8 network: its format, the instruction set it was calibrated on, this
    CPU's, and whether the format saturates here."""
    here = cpu_isa()
    return {"format": fmt, "calibrated_on": calibrated_on, "this_cpu": here, "saturates_here": int8_saturates(fmt, here)}


_WARNED: set[str] = set()


def warn_if_int8_saturates(fmt: str, source: str | os.PathLike) -> None:
    """Warn, once per process and format, where an int8 network of format ``fmt`` (from ``source``) scores
    differently on this CPU than where it was fitted (:func:`int8_saturates`), naming the remedy."""
    isa = cpu_isa()
    if fmt in _WARNED or not int8_saturates(fmt, isa):
        return
    _WARNED.add(fmt)
    warnings.warn(f"gaussad: {source}: its int8 network ({fmt} format, 8-bit weights) saturates on this CPU ({isa}, "
                  f"no VNNI): its features and scores here differ from those of the CPU it was fitted on. Refit it "
                  f"with this gaussad (format {INT8_FORMAT}, right on every CPU) or use an fp32 model", stacklevel=4)


def calibration_order(n: int, k: int = INT8_CALIBRATION_IMAGES) -> list[int]:
    """Positions of ``n`` training images in the order int8 calibration reads them: ``k`` spread evenly over the
    list first (files sorted by name are often sorted by acquisition run, and ranges taken from the first ``k``
    alone missed the later runs: magnetic tile, EXPERIMENTS.md), then the others, in order, to replace unreadable
    ones."""
    spread = np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)).tolist() if n else []
    chosen = set(spread)
    return spread + [i for i in range(n) if i not in chosen]


def quantize_int8(graph: bytes, inputs: Sequence[np.ndarray], fmt: Int8Format | None = None) -> bytes:
    """The serialised int8 graph of an fp32 ONNX ``graph`` (input named "input"), its activation ranges calibrated
    on ``inputs`` (prepared (3, H, W) float32 network inputs, one image each), its weights in format ``fmt``
    (default :data:`INT8_FORMAT`)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fmt = fmt or INT8_FORMATS[INT8_FORMAT]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {"input": np.ascontiguousarray(x[None], dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="gaussad-int8-") as tmp:
        fp32, pre, int8 = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(graph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ONNX Runtime's advice to pre-process, which is done
            quant_pre_process(str(fp32), str(pre))
            prepared = onnx.load(str(pre))
            quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=fmt.per_channel,
                            reduce_range=fmt.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8 if fmt.weight_type == "int8" else QuantType.QUInt8,
                            nodes_to_exclude=fmt.fp32_nodes(prepared),
                            extra_options={"TensorQuantOverrides": fmt.overrides(prepared)})
        return int8.read_bytes()


RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "fastest": "ONNX Runtime or OpenVINO"}


def int8_engine(network: bytes, input_size: int, engine: str = "onnxruntime") -> GraphEngine:
    """An engine of a model file's int8 network: ``engine`` "onnxruntime", "openvino", or "fastest" of the two
    (:func:`fastest_engine`, timed at ``input_size``); a graph the runtime cannot load is one clear error."""
    if engine != "openvino" and not onnxruntime_available():
        raise GaussadError("this model's network is int8 (precision='int8'), run by ONNX Runtime: pip install onnx "
                           "onnxruntime")
    try:
        return fastest_engine(network, input_size) if engine == "fastest" else GRAPH_ENGINES[engine](network)
    except Exception as exc:  # the runtimes raise their own types for a graph they cannot load
        raise GaussadError(f"the model's int8 network cannot be loaded by {RUNTIMES[engine]} "
                           f"({str(exc)[:200]})") from None
