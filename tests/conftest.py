"""Shared test settings and fixtures.

Settings: headless plotting, hypothesis without deadlines (CI machines are slow), the stand-in network.
Fixtures: a tiny checkpoint, generated scenes, a Tianchi folder, one LocalCluster for the session, and
``rsseg_cli`` to run the ``rsseg`` command in this process (its output, error line and exit status), and
``http_root``: a folder served on 127.0.0.1 with HTTP Range requests, for /vsicurl/ and s3:// reads.
"""

import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import settings

os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile("rsseg", deadline=None, print_blob=True)
settings.load_profile("rsseg")


@pytest.fixture
def stand_ins(monkeypatch):
    """``model.arch`` of the tiny test network, importable in the child processes a test starts too."""
    from stand_ins import TINY_ARCH

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    return TINY_ARCH


@pytest.fixture(autouse=True)
def _entry_point_settings_stay_out_of_pytest(monkeypatch):
    """``rsseg.cli.main`` configures the process it runs in (allocator, threads, exported variables); tests that
    call it in pytest's own process leave pytest as it is. Fresh processes (test_side_effects.py,
    test_process.py, Dask workers) still apply the settings."""
    from rsseg.pipeline import process

    monkeypatch.setattr(process, "configure_process", lambda *args, **kwargs: None)


class CliResult(NamedTuple):
    """What a user sees of one ``rsseg`` command: exit status, stdout and stderr."""

    exit_code: int
    stdout: str
    stderr: str


def run_rsseg(*args: object) -> CliResult:
    """Run ``rsseg ARGS`` in this process through the console script's ``main`` (errors: one line, exit 2)."""
    from click.testing import CliRunner

    from rsseg.cli import main

    code = 0
    with CliRunner().isolation() as (out, err, _):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture
def rsseg_cli():
    """``rsseg_cli("run", path, "--set", "k=v")`` -> :class:`CliResult`, in this process."""
    return run_rsseg


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (but fixed) small U-Net checkpoint: for tests about plumbing, not accuracy."""
    import torch

    from rsseg.models import create_model, model_config, save_checkpoint

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    small = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    model = create_model(encoder="resnet18", **small)
    torch.random.set_rng_state(state)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_checkpoint(path, model, model_config(model, arch="unet", encoder="resnet18", in_channels=3,
                                                     classes=1, **small), meta={"threshold": 0.5})


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated 256x256 scenes (EPSG:32650) with their footprints: ``scene_00{0,1}.tif`` and
    ``scene_00{0,1}.buildings.geojson``. Read-only: copy before changing."""
    from rsseg.synth.generate import make_scene

    folder = tmp_path_factory.mktemp("scenes")
    for i in range(2):
        make_scene(folder / f"scene_{i:03d}.tif", size=256, seed=11 + i, progress=False)
    return folder


@pytest.fixture(scope="session")
def tianchi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Tianchi folder of 10 training images (the training tests' data). Read-only."""
    from rsseg.synth.generate import make_tianchi

    root = tmp_path_factory.mktemp("tianchi") / "data"
    make_tianchi(root, n_train=10, n_test=0, seed=5, progress=False)
    return root


@pytest.fixture(scope="session")
def tianchi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Tianchi folder (12 train, 2 test images). Read-only."""
    from rsseg.synth.generate import make_tianchi

    folder = tmp_path_factory.mktemp("tianchi") / "tianchi"
    make_tianchi(folder, n_train=12, n_test=2, seed=5, progress=False)
    return folder


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[str]:
    """The address of one LocalCluster (2 single-threaded worker processes) shared by the session's tests."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address
def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests selected (``-m gpu``) on a machine without CUDA are skipped, not failed."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA device")
            for item in gpu:
                item.add_marker(skip)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the files under ``server.root`` with HTTP Range support (GDAL's /vsicurl/ reads byte ranges)."""

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.server.root / self.path.split("?", 1)[0].lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, end = 0, len(data) - 1
        if wanted:
            start, end = int(wanted[1]), min(int(wanted[2] or end), end)
        self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end + 1 - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data[start : end + 1])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, list]:
    """A folder served on 127.0.0.1 (with Range requests) for the test's duration, its base URL, the requests."""
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")  # no directory listing requests
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "20")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.root, server.requests, server.daemon_threads = root, [], True
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    stop = threading.Timer(300, server.shutdown)  # bounded: stops by itself even if the test hangs
    stop.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        stop.cancel()
        server.shutdown()
        server.server_close()
        thread.join(10)
