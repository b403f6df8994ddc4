"""Shared fixtures: a tiny synthetic data set in MVTec layout and the path of the real shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

def in_child(work) -> tuple[int, str]:
    """Run ``work()`` (returning (exit code, text)) in a forked child, so that dropped privileges, audit hooks and
    monkeypatches die with it; its exit code and text."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read)
            code, text = work()
            os.write(write, text.encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        text = fh.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()

# Small settings that keep every backbone test fast: low resolution, the first levels only.
TINY = {"backbone": "efficientnet-lite0", "input_size": 64, "levels": ["stem", "stage1", "stage2", "stage3"],
        "preset": "paper"}


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Path:
    """Exported ONNX graphs go to a per-session folder, never the user's cache; engine 'auto' stays ONNX Runtime in
    this process and the children it starts (where OpenVINO is installed it would pick the faster of the two by
    timing them, whose outcome varies with the load; tests/test_openvino.py tests that choice)."""
    import os

    path = tmp_path_factory.mktemp("onnx-cache")
    saved = {name: os.environ.get(name) for name in ("GAUSSAD_CACHE", "GAUSSAD_AUTO_ENGINE")}
    os.environ.update(GAUSSAD_CACHE=str(path), GAUSSAD_AUTO_ENGINE="onnxruntime")
    yield path
    for name, old in saved.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A small texture data set with two categories, built once per test session."""
    from gaussad.tools.synthetic import build_texture_dataset

    root = tmp_path_factory.mktemp("textures")
    return build_texture_dataset(root, size=64, n_train=10, n_test_good=6, n_test_bad=6, categories=["brick", "gravel"])


@pytest.fixture(scope="session")
def tiny_category(tiny_root) -> Path:
    return tiny_root / "brick"


def needs_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test where the shared data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


def record_coresets(monkeypatch, chunk: int) -> list:
    """Shrink the streaming coresets' buffer to ``chunk`` rows and collect every coreset a fit makes (for the
    structural memory tests of one-process and distributed fits)."""
    import gaussad.core.bank as bank_mod
    from gaussad.detector.fitting import Trainer

    monkeypatch.setattr(bank_mod, "CHUNK", chunk)
    made: list = []
    real = Trainer.coresets

    def recorded(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        made.extend(out)
        return out

    monkeypatch.setattr(Trainer, "coresets", recorded)
    return made
