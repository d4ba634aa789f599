"""Passwords of store URLs never reach a record: masked in text, params, tags, log lines and the
artifacts of a run (gradalign.credentials); and a tracking server behind basic auth is probed
with the credentials of its URL."""

import base64
import http.server
import logging
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from gradalign import credentials, tracking
from gradalign.tracking import store as tracking_store

SECRET = "pa:ss@w0rd"  # a colon and an at sign, as users type them unencoded


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql+psycopg://ci:s3cret@127.0.0.1:5432/optuna",
            "postgresql+psycopg://ci:***@127.0.0.1:5432/optuna",
        ),
        (f"storage: mysql://me:{SECRET}@db/x\n", "storage: mysql://me:***@db/x\n"),
        ("http://user:tok%40en@host:5000", "http://user:***@host:5000"),
        (
            "['hydra.sweeper.storage=postgresql://a:b@h/d']",
            "['hydra.sweeper.storage=postgresql://a:***@h/d']",
        ),
        (
            "postgresql://h/db?user=a&password=s3cret&x=1",
            "postgresql://h/db?user=a&password=***&x=1",
        ),
        (  # as Hydra writes an override in .hydra/overrides.yaml
            "- tracking.uri=http\\://me\\:pw@127.0.0.1\\:5000",
            "- tracking.uri=http\\://me\\:***@127.0.0.1\\:5000",
        ),
        # no password: unchanged
        ("postgresql://ci@127.0.0.1/db", "postgresql://ci@127.0.0.1/db"),
        ("http://127.0.0.1:5000/api?email=a@b", "http://127.0.0.1:5000/api?email=a@b"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("optimizer.lr=0.001", "optimizer.lr=0.001"),
    ],
)
def test_mask_replaces_the_password_of_every_url(text, expected):
    assert credentials.mask(text) == expected
    assert credentials.mask(expected) == expected  # idempotent


def test_two_urls_in_one_line_are_both_masked():
    line = "postgresql://a:one1@h/o and http://b:two2@h:5000"
    assert credentials.mask(line) == "postgresql://a:***@h/o and http://b:***@h:5000"


def test_masked_mapping_leaves_other_values_alone():
    values = {"storage": "postgresql://a:b@h/d", "n_trials": 3, "none": None}
    assert credentials.masked(values) == {
        "storage": "postgresql://a:***@h/d",
        "n_trials": 3,
        "none": None,
    }


def test_log_lines_and_tracebacks_are_masked_whatever_the_handler(caplog):
    logger = logging.getLogger("gradalign.test_credentials")
    previous = logging.getLogRecordFactory()
    try:
        credentials.mask_logs()
        installed = logging.getLogRecordFactory()
        credentials.mask_logs()  # idempotent
        assert logging.getLogRecordFactory() is installed
        logger.warning("Storage: %s", f"postgresql://ci:{SECRET}@h/d")
        try:
            raise RuntimeError(f"cannot reach postgresql://ci:{SECRET}@h/d")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logging.setLogRecordFactory(previous)
    text = "\n".join(caplog.handler.format(record) for record in caplog.records)
    assert "Storage: postgresql://ci:***@h/d" in text
    assert "RuntimeError: cannot reach postgresql://ci:***@h/d" in text
    assert SECRET not in text


def test_a_masked_copy_masks_text_files_and_copies_the_rest(tmp_path):
    source = tmp_path / ".hydra"
    source.mkdir()
    (source / "hydra.yaml").write_text(f"storage: postgresql://ci:{SECRET}@h/d\n")
    (source / "overrides.yaml").write_text("- optimizer=gao\n")
    (source / "blob.bin").write_bytes(b"\xff\xfe" + SECRET.encode())
    copy = credentials.masked_copy(source, tmp_path / "copy" / ".hydra")
    assert (copy / "hydra.yaml").read_text() == "storage: postgresql://ci:***@h/d\n"
    assert (copy / "overrides.yaml").read_text() == "- optimizer=gao\n"
    assert (copy / "blob.bin").read_bytes() == b"\xff\xfe" + SECRET.encode()  # not text
    assert SECRET in (source / "hydra.yaml").read_text()  # the user's own file is left alone


def store(tmp_path):
    db = tmp_path / "mlflow.db"
    return OmegaConf.create(
        {
            "uri": f"sqlite:///{db}",
            "experiment": "exp",
            "flush_interval_s": 0.0,
            "root": "/",
            "store_wait_s": 60,
        }
    )


def test_a_run_records_no_password_in_tags_params_reasons_or_artifacts(tmp_path):
    cfg = store(tmp_path)
    url = f"postgresql+psycopg://ci:{SECRET}@127.0.0.1:5432/optuna"
    hydra_dir = tmp_path / "job" / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "hydra.yaml").write_text(f"sweeper:\n  storage: {url}\n")
    with (
        pytest.raises(RuntimeError),
        tracking.start_run(
            cfg,
            run_name="masked",
            tags={"where": url},
            params={"sweeper.storage": url},
            artifacts_dir=hydra_dir,
        ) as run,
    ):
        raise RuntimeError(f"lost {url}")
    client = MlflowClient(cfg.uri)
    recorded = client.get_run(run.run_id)
    masked = "postgresql+psycopg://ci:***@127.0.0.1:5432/optuna"
    assert recorded.data.tags["where"] == masked
    assert recorded.data.params["sweeper.storage"] == masked
    assert recorded.data.tags["failure_reason"] == f"RuntimeError: lost {masked}"
    artifact = client.download_artifacts(run.run_id, ".hydra/hydra.yaml", str(tmp_path / "dl"))
    assert Path(artifact).read_text() == f"sweeper:\n  storage: {masked}\n"


def test_a_sweep_parent_records_no_password(tmp_path):
    cfg = store(tmp_path)
    url = f"postgresql://ci:{SECRET}@h/optuna"
    run_id = tracking.open_sweep_parent(
        tracking.connect(cfg),
        sweep_id="optuna:s",
        run_name="p",
        tags={"t": url},
        params={"sweeper.storage": url},
    )
    data = MlflowClient(cfg.uri).get_run(run_id).data
    assert data.params["sweeper.storage"] == data.tags["t"] == "postgresql://ci:***@h/optuna"


class _BasicAuthMlflow(http.server.BaseHTTPRequestHandler):
    """Answers /health and the API only with the right basic-auth header."""

    expected = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()

    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_a_server_url_with_credentials_is_probed_with_basic_auth_and_masked_in_errors():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        tracking_store.check_reachable(f"http://user:pa%3Ass%40w0rd@127.0.0.1:{port}")
        server.shutdown()
        server.server_close()
        with pytest.raises(tracking.TrackingUnavailable) as error:
            tracking_store.check_reachable(f"http://user:{SECRET}@127.0.0.1:{port}", timeout_s=2)
    finally:
        server.shutdown()
    assert SECRET not in str(error.value)
    assert f"http://user:***@127.0.0.1:{port}" in str(error.value)


def test_the_doctor_reaches_a_masked_storage_only_through_one_given_in_full(tmp_path):
    from gradalign.doctor import storages_to_clean

    full = f"postgresql://ci:{SECRET}@h/optuna"
    recorded = [credentials.mask(full), "sqlite:///outputs/optuna.db"]
    assert storages_to_clean(recorded, [full], tmp_path) == sorted(
        [full, f"sqlite:///{tmp_path.resolve()}/outputs/optuna.db"]
    )
    assert credentials.mask(full) in storages_to_clean(recorded, [], tmp_path)
