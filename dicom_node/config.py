"""Typed settings, read from TOML and validated in one place.

Every key in `node.toml` maps to a field here; an unknown key or a wrong value
stops start-up with a message naming the key (pydantic does the checking).
Relative paths are resolved against the directory of the config file, so the
node behaves the same whatever the working directory is.
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path("node.toml")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    ae_title: str = Field("LINKNODE", min_length=1, max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(10, ge=1)
    # Receiver processes accepting on `port` (SO_REUSEPORT); 0: one per core. One process uses one
    # core, so ingest scales with cores; scheduler, pipeline and web stay in `serve` itself.
    receivers: int = Field(0, ge=0, le=64)
    max_pending_connections: int = Field(20, ge=1)
    association_setup_timeout_s: float = Field(10.0, gt=0)
    check_called_ae_title: bool = True
    max_pdu_size: int = Field(4_194_304, ge=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_dataset_bytes: int = Field(1 << 30, ge=1024)
    max_dataset_elements: int = Field(1_000_000, ge=100)
    max_sequence_depth: int = Field(32, ge=1, le=200)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_phi: bool = False
    # This node's name among several `serve` processes sharing one database and storage folder
    # (README "Several nodes, one archive"); empty: host name and port. Its writes in progress go
    # under the storage folder's tmp/<instance>/, which only it clears at start-up.
    instance: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9._-]*$")

    @field_validator("ae_title")
    @classmethod
    def _ae_title_chars(cls, value: str) -> str:
        if not value.strip() or "\\" in value or any(ord(c) < 32 for c in value):
            raise ValueError("AE title must be 1-16 printable characters, no backslash")
        return value.strip()


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/node.db"
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"


class StorageSettings(_Section):
    dir: Path = Path("var/storage")
    fsync: bool = True
    duplicate_policy: Literal["reject", "replace"] = "reject"
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)


class SeriesSettings(_Section):
    stable_after_s: float = Field(30.0, gt=0)
    check_interval_s: float = Field(5.0, gt=0)


class PeerSettings(_Section):
    ae_title: str = Field(min_length=1, max_length=16)
    hosts: list[str] = Field(default_factory=list)


class TLSSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @field_validator("cert_file", "key_file", "ca_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value


class PipelineSettings(_Section):
    # Run the pipeline workers inside `serve` (off: only `dicom-node process` embeds).
    enabled: bool = True
    workers: int = Field(1, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1)
    # CPU threads torch may use (process-wide). One per worker keeps inference
    # steady when ingest and workers share a small machine.
    torch_threads: int = Field(1, ge=1)
    # Trained weights and model cards, one folder per route (see models/weights/README.md).
    weights_dir: Path = Path("models/weights")
    # Below this router confidence a series is stored but not linked.
    min_route_confidence: float = Field(0.5, ge=0, le=1)
    max_attempts: int = Field(3, ge=1)
    retry_base_delay_s: float = Field(30.0, ge=0)
    lease_s: float = Field(600.0, gt=0)
    # Optional enhancement steps per route, e.g. {chest_xr = ["clahe"]};
    # steps: "clahe", "denoise", "edges".
    enhance: dict[str, list[Literal["clahe", "denoise", "edges"]]] = Field(default_factory=dict)


class LinkageSettings(_Section):
    # Link each embedded series inside `serve` and `process` (off: embeddings only).
    enabled: bool = True
    # An open link is listed for review from this probability; from confident_probability
    # it is marked "confident" (still never merged automatically).
    review_probability: float = Field(0.5, gt=0, lt=1)
    confident_probability: float = Field(0.95, gt=0, lt=1)
    # Prior probability that a candidate pair of Patient IDs is one person, and that a
    # study is filed under the wrong patient; they set how much evidence a flag needs.
    prior_same_person: float = Field(1e-3, gt=0, lt=1)
    prior_misfiled: float = Field(1e-3, gt=0, lt=1)
    # Nearest stored series per new series (faiss), and patients per shared birth date,
    # that are compared in full.
    candidates: int = Field(10, ge=1, le=200)
    max_birth_date_block: int = Field(50, ge=0)
    # Image evidence per route is clipped to +- this many nats, so one modality cannot
    # outvote everything else on its own.
    max_image_llr: float = Field(12.0, gt=0)
    # Routes are not independent (a family shares its anatomy on every route): the strongest
    # route counts in full, each further one this factor times the one before, and the sum of
    # one pair's image evidence is bounded to +- max_image_total nats.
    further_route_factor: float = Field(0.5, ge=0, le=1)
    max_image_total: float = Field(16.0, gt=0)
    # Below review_probability, links from this probability are kept in a ranked "worth a look"
    # list (`links --status worth-a-look`, the web queue's second tab), never counted as flags.
    # 0 switches the list off.
    worth_a_look_probability: float = Field(0.05, ge=0, lt=1)
    # A study against its ID's other studies: how strongly two of those comparisons correlate.
    # 1: the median over them (one comparison's worth); below 1 they add up, m studies counting as
    # m / (1 + (m - 1) x study_dependence) independent ones (linkage.decide.study_set_evidence).
    study_dependence: float = Field(0.1, ge=0, le=1)
    # Where the candidate index is saved between runs (relative to storage.dir): each node its own
    # under nodes/<node.instance>/, the checked series' features shared (linkage.engine.node_index_dir).
    index_dir: Path = Path("linkage-index")
    # Check compared image pairs geometrically for the models whose card asks for it
    # (models/inference/verification.py; reads the compared series' images again). Off: the cosine
    # alone, with the card's cosine calibration, e.g. while a whole archive is imported.
    check_image_pairs: bool = True
    # Keep the checked series' image features on disk (under index_dir), so restarts and series
    # that left the memory cache do not read and describe their images again.
    keep_check_features: bool = True


class QuerySettings(_Section):
    # Limits on one C-FIND, so that a broad or hostile query cannot hold up the node.
    # Matches sent per query; a broader query gets this many (oldest first), then 0xA700 with a
    # comment to narrow it (Success would claim that every match was sent, PS3.4 C.4.1.3).
    max_matches: int = Field(1000, ge=1)
    # Longest value of a matched key, in characters (PN: up to 3 x 64); longer: refused (0xC000).
    max_key_length: int = Field(128, ge=1, le=10_000)
    # Most values of one key (a list of UIDs, of modalities); more: refused (0xC000).
    max_values: int = Field(1000, ge=1, le=10_000)
    # A query still being matched after this many seconds ends with 0xA700.
    timeout_s: float = Field(10.0, gt=0)
    # Queries matched at once (matching is CPU work); further ones wait up to timeout_s for a
    # turn, then get 0xA700. Sending the matches does not hold a turn.
    max_concurrent: int = Field(2, ge=1)


class DestinationSettings(_Section):
    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    # Open the association with TLS (the node's [security.tls] certificate as client certificate
    # where one is set, ca_file to verify the destination).
    tls: bool = False


class RetrieveSettings(_Section):
    # Where C-MOVE may send: AE title -> host and port. A separate, explicit list: being allowed to
    # connect ([[security.peers]]) never makes a peer a destination.
    destinations: list[DestinationSettings] = Field(default_factory=list)
    # Instances one C-MOVE or C-GET may select (the standard's counters stop at 65535); a broader
    # request is refused (0xA701/0xA702) with a comment to retrieve study by study.
    max_instances: int = Field(10_000, ge=1, le=65_535)
    # Retrievals served at once (each reads files and sends them); further ones wait up to
    # query.timeout_s for a turn, then get 0xA701/0xA702.
    max_concurrent: int = Field(2, ge=1)

    @field_validator("destinations")
    @classmethod
    def _unique_titles(cls, value):
        titles = [d.ae_title.strip() for d in value]
        if len(titles) != len(set(titles)):
            raise ValueError("each destination AE title may be listed once")
        return value


class WebSettings(_Section):
    # Web pages and JSON API for archivists and clinicians, served inside `serve`.
    enabled: bool = False
    # Localhost by default: put a TLS reverse proxy in front to reach it from elsewhere.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Key that signs session cookies; created (mode 0600) at first start when missing.
    session_secret_file: Path = Path("var/web-session.key")
    # A login lasts this long, however active the user is.
    session_lifetime_s: int = Field(8 * 3600, ge=60)
    # HTTPS served by the node itself (PEM files); both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Mark the session cookie Secure (always so with TLS above; set true behind a TLS proxy).
    secure_cookies: bool = False
    # argon2 password checks run at once (each holds 64 MiB); a login finding none free within a
    # second is answered 503 with Retry-After.
    max_concurrent_password_checks: int = Field(2, ge=1, le=64)

    @field_validator("tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class SecuritySettings(_Section):
    require_known_ae: bool = True
    peers: list[PeerSettings] = Field(default_factory=list)
    tls: TLSSettings = TLSSettings()


class Settings(_Section):
    node: NodeSettings = NodeSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    series: SeriesSettings = SeriesSettings()
    security: SecuritySettings = SecuritySettings()
    pipeline: PipelineSettings = PipelineSettings()
    linkage: LinkageSettings = LinkageSettings()
    query: QuerySettings = QuerySettings()
    retrieve: RetrieveSettings = RetrieveSettings()
    web: WebSettings = WebSettings()
    # Directory that relative paths were resolved against.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def storage_dir(self) -> Path:
        return self.resolve(self.storage.dir)

    @property
    def instance_name(self) -> str:
        """`node.instance`, else this host's name and the DICOM port."""
        return self.node.instance or f"{socket.gethostname()}-{self.node.port}"

    @property
    def partial_dir(self) -> str:
        """This node's folder for writes in progress, relative to the storage folder."""
        return f"tmp/{self.instance_name}"

    @property
    def database_url(self) -> str:
        """The database URL, with a relative SQLite path made absolute."""
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
            return prefix + str(self.resolve(Path(url[len(prefix):])))
        return url


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown setting '{key}'")
        else:
            lines.append(f"setting '{key}': {item['msg']}")
    return "; ".join(lines)


def settings_from_dict(data: dict, base_dir: Path | None = None) -> Settings:
    try:
        settings = Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None
    return settings.model_copy(update={"base_dir": (base_dir or Path.cwd()).resolve()})


def load_settings(path: Path | None = None) -> Settings:
    """Read and validate the config; without a path, `node.toml` if present, else defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return settings_from_dict({})
        path = DEFAULT_CONFIG
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    if "base_dir" in data:
        raise ConfigError("unknown setting 'base_dir'")
    return settings_from_dict(data, base_dir=path.resolve().parent)
