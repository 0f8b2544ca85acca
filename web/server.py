"""The web pages inside `dicom-node serve`: uvicorn in a thread, started after the DICOM
listener and stopped with it; and the session-signing key file."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from sqlalchemy import Engine

from dicom_node.config import Settings

log = logging.getLogger("dicom_node.web")


def session_secret(path: Path) -> str:
    """The key that signs session cookies; created with mode 0600 when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("web session key %s is readable by others (mode %o): chmod 600 it", path, mode)
        secret = path.read_text(encoding="ascii").strip()
        if len(secret) < 32:
            raise ValueError(f"web session key {path} is too short (delete it to make a new one)")
        return secret
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.info("created web session key %s", path)
    return path.read_text(encoding="ascii").strip()


class WebServer:
    """uvicorn serving `web.app.create_app` in a background thread."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        import uvicorn

        from web.app import create_app

        web = settings.web
        tls = web.tls_cert_file is not None
        app = create_app(settings, engine, session_secret(settings.resolve(web.session_secret_file)))
        config = uvicorn.Config(
            app, host=web.host, port=web.port, log_level="warning",
            access_log=False,          # an access log would hold URLs, user agents and addresses
            server_header=False, proxy_headers=False, lifespan="off",
            ssl_certfile=str(settings.resolve(web.tls_cert_file)) if tls else None,
            ssl_keyfile=str(settings.resolve(web.tls_key_file)) if tls else None)
        self.scheme = "https" if tls else "http"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self, timeout: float = 30) -> WebServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start (port in use? see the log above)")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.server.config.port

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_web(settings: Settings, engine: Engine) -> WebServer | None:
    if not settings.web.enabled:
        return None
    return WebServer(settings, engine).start()
