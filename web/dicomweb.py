"""DICOMweb under /dicomweb: QIDO-RS searches (PS3.18 10.6), WADO-RS retrieval of stored
instances, metadata and rendered frames (10.4), and WADO-URI (9) for viewers that load whole
instances through it (OHIF's `wadouri` rendering).

Person-aware as C-FIND: the searches are `linkage.query`'s, so a study search by one Patient ID
returns the studies of every ID that confirmed links join to it, each with its own Patient ID
and issuer, and the person's other IDs in OtherPatientIDsSequence when asked for. Retrieval by
UID finds a linked prior like any other study. The JSON model is `web.dicomweb_json`, the
multipart and rendered bodies `web.dicomweb_wado`, who is asking `web.dicomweb_auth` (the web
session or HTTP Basic; any role reads).

Every search and retrieval writes an audit row: the account, the action, and the Study Instance
UIDs it touched; never the query's values (a Patient ID or name typed into a search).
Query strings carry match keys here, as the standard has it (the pages never do): the node keeps
no access log, and a TLS proxy in front keeps them off the wire.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from db.records_linkage import InstanceRecord
from linkage.query import (OTHER_ID_KEYS, OUT_OF_RESOURCES, SEARCH, Refused, check_keys, match_values,
                           retrieve_selection, ticker)
from web.auth import CurrentUser
from web.dicomweb_auth import dicomweb_user
from web.dicomweb_json import DEFAULT_FIELDS, LEVEL_TABLES, attribute_keyword, match_json, metadata_json, returnable
from web.dicomweb_wado import (ANY, RENDERED, NotRenderable, file_bytes, media_ranges, multipart, render,
                               rendered_type, send_syntax, wanted_syntaxes)

log = logging.getLogger("dicom_node.web")
router = APIRouter(prefix="/dicomweb", include_in_schema=False)

DICOM_JSON = "application/dicom+json"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = r"\d{8}"
_TIME = r"\d{2}(:?\d{2}(:?\d{2}(\.\d{1,6})?)?)?"
RANGE = {"date": re.compile(rf"^({_DATE})?-?({_DATE})?$"), "time": re.compile(rf"^({_TIME})?-?({_TIME})?$")}
RETRY_AFTER_S = 2
_TURNS = threading.Lock()


# ----- requests ------------------------------------------------------------------------------

def _bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def _uid(value: str | None, what: str) -> str:
    value = (value or "").strip()
    if len(value) > 64 or not UID.match(value):
        raise _bad(f"{what}: not a UID (digits and dots, at most 64 characters)")
    return value


def _keyword(name: str) -> str:
    try:
        return attribute_keyword(name)
    except ValueError as error:
        raise _bad(str(error)) from None


def _match_value(keyword: str, kind: str, value: str, before):
    """A query parameter's value as `linkage.query` takes it; 400 when it cannot be a value of its VR."""
    text = value.strip()
    if text in ("", "*"):
        return text                     # universal: a return key
    if kind in ("uid", "multi"):       # a list: comma-separated (PS3.18) or backslash (DICOM) values
        values = [v.strip() for v in re.split(r"[,\\]", text) if v.strip()]
        if kind == "uid":
            values = [_uid(v, keyword) for v in values]
        return (before if isinstance(before, list) else []) + values
    if before is not None:
        raise _bad(f"{keyword} is given more than once")
    if kind in RANGE and (text == "-" or not RANGE[kind].match(text)):
        form = "YYYYMMDD" if kind == "date" else "HHMMSS"
        raise _bad(f"{keyword}: {form}, or a range {form}-{form} (either end may be left open)")
    return text


def _count(name: str, value: str, least: int) -> int:
    text = value.strip()
    # ASCII digits only, and few: int() takes other scripts' digits and refuses 4300+ digits.
    if not (text.isascii() and text.isdigit() and len(text) <= 12) or int(text) < least:
        raise _bad(f"{name}: a whole number from {least}")
    return int(text)


def parse_query(level: str, fixed: dict[str, str], items: list[tuple[str, str]], limits
                ) -> tuple[dict, set[str], int, int]:
    """(match keys for `linkage.query`, attributes to return, limit, offset) of a QIDO-RS query."""
    table = {keyword: spec for part in LEVEL_TABLES[level] for keyword, spec in part.items()}
    keys: dict[str, object] = dict(fixed)
    fields = set(DEFAULT_FIELDS[level]) | set(fixed)
    # A search not scoped to a study (or series) returns the parents' attributes too (PS3.18 10.6.3.3).
    if level == "IMAGE" and "SeriesInstanceUID" not in fixed:
        fields |= set(DEFAULT_FIELDS["SERIES"])
    if level in ("SERIES", "IMAGE") and "StudyInstanceUID" not in fixed:
        fields |= set(DEFAULT_FIELDS["STUDY"])
    limit, offset = limits.max_matches, 0
    for name, value in items:
        lower = name.strip().lower()
        if lower == "includefield":
            for item in filter(None, (part.strip() for part in value.split(","))):
                fields |= returnable(level) if item.lower() == "all" else {_keyword(item)}
        elif lower == "limit":
            limit = min(_count(name, value, 1), limits.max_matches)
        elif lower == "offset":
            offset = _count(name, value, 0)
        elif lower == "fuzzymatching":
            continue                    # names match case-insensitively with wildcards anyway
        else:
            keyword = _keyword(name)
            if keyword in fixed:
                raise _bad(f"{keyword} is given by the path")
            kind = table.get(keyword, ("none",))[0]
            if kind in ("none", "count") and value.strip() not in ("", "*"):
                why = "is returned, not matched" if kind == "count" else f"cannot be matched at {level} level"
                matchable = sorted(k for k, (kind_, _) in table.items() if kind_ != "count")
                raise _bad(f"{keyword} {why}; match keys here: {', '.join(matchable)}")
            if kind not in ("none", "count"):
                keys[keyword] = _match_value(keyword, kind, value, keys.get(keyword))
            fields.add(keyword)
    fields &= returnable(level)
    if level == "STUDY" and fields & set(OTHER_ID_KEYS):
        keys["OtherPatientIDsSequence"] = ""      # asks linkage.query for the person's other IDs
    try:
        check_keys(keys, table, limits.max_values, limits.max_key_length)
    except Refused as refused:
        raise _bad(refused.comment) from None
    return keys, fields, limit, offset


def _accept_json(request: Request) -> None:
    if not any(media in (DICOM_JSON, "application/json", "application/*", "*/*")
               for media, _ in media_ranges(request.headers.get("accept"))):
        raise HTTPException(406, f"this answer is {DICOM_JSON}")


def _turns(request: Request) -> threading.BoundedSemaphore:
    """Searches matched at once ([query] max_concurrent, as C-FIND has, in slots of their own)."""
    state = request.app.state
    with _TURNS:
        if not hasattr(state, "dicomweb_turns"):
            state.dicomweb_turns = threading.BoundedSemaphore(state.ctx.settings.query.max_concurrent)
    return state.dicomweb_turns


def _refused(refused: Refused) -> HTTPException:
    if refused.status == OUT_OF_RESOURCES:
        return HTTPException(503, refused.comment, headers={"Retry-After": str(RETRY_AFTER_S)})
    return _bad(refused.comment)


def _database_down(error: SQLAlchemyError) -> HTTPException:
    log.error("DICOMweb: database unavailable: %s", type(error).__name__)
    return HTTPException(503, "database unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


# ----- QIDO-RS -------------------------------------------------------------------------------

def _search(request: Request, user: CurrentUser, level: str, fixed: dict[str, str]) -> Response:
    ctx, limits = request.app.state.ctx, request.app.state.ctx.settings.query
    _accept_json(request)
    keys, fields, limit, offset = parse_query(level, fixed, request.query_params.multi_items(), limits)
    turns = _turns(request)
    if not turns.acquire(timeout=limits.timeout_s):
        raise HTTPException(503, f"all {limits.max_concurrent} search slots busy: try again",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        matched, total = SEARCH[level](ctx.links, keys, offset + limit, ticker(limits.timeout_s, lambda: False))
    except Refused as refused:
        raise _refused(refused) from None
    except SQLAlchemyError as error:
        raise _database_down(error) from None
    finally:
        turns.release()
    page = [match_values(level, match) for match in matched[offset:]]
    ctx.accounts.audit(user.name, "dicomweb_search", f"dicomweb:{level.lower()}",
                       {"matches": len(page), "studies": sorted({values["StudyInstanceUID"] for values, _ in page})})
    headers = {}
    if total > offset + len(page):
        headers["Warning"] = (f'299 dicom-node "{total} matches, {len(page)} returned from offset {offset}; '
                              f'ask for more with offset={offset + len(page)}"')
    if not page:
        return Response(status_code=204, headers=headers)
    body = json.dumps([match_json(values, other, fields) for values, other in page])
    return Response(body, media_type=DICOM_JSON, headers=headers)


@router.get("/studies")
def search_studies(request: Request, user: CurrentUser = Depends(dicomweb_user)):
    return _search(request, user, "STUDY", {})


@router.get("/series")
def search_series(request: Request, user: CurrentUser = Depends(dicomweb_user)):
    return _search(request, user, "SERIES", {})


@router.get("/instances")
def search_instances(request: Request, user: CurrentUser = Depends(dicomweb_user)):
    return _search(request, user, "IMAGE", {})


@router.get("/studies/{study}/series")
def search_study_series(request: Request, study: str, user: CurrentUser = Depends(dicomweb_user)):
    return _search(request, user, "SERIES", {"StudyInstanceUID": _uid(study, "study")})


@router.get("/studies/{study}/instances")
def search_study_instances(request: Request, study: str, user: CurrentUser = Depends(dicomweb_user)):
    return _search(request, user, "IMAGE", {"StudyInstanceUID": _uid(study, "study")})


@router.get("/studies/{study}/series/{series}/instances")
def search_series_instances(request: Request, study: str, series: str, user: CurrentUser = Depends(dicomweb_user)):
    return _search(request, user, "IMAGE", {"StudyInstanceUID": _uid(study, "study"),
                                            "SeriesInstanceUID": _uid(series, "series")})


# ----- WADO-RS -------------------------------------------------------------------------------

def _selection(study: str, series: str | None = None, instance: str | None = None) -> tuple[str, dict]:
    keys = {"StudyInstanceUID": _uid(study, "study")}
    if series is not None:
        keys["SeriesInstanceUID"] = _uid(series, "series")
    if instance is not None:
        keys["SOPInstanceUID"] = _uid(instance, "instance")
    return ("STUDY", "SERIES", "IMAGE")[len(keys) - 1], keys


def _instances(request: Request, level: str, keys: dict) -> list[InstanceRecord]:
    ctx = request.app.state.ctx
    try:
        found = retrieve_selection(ctx.links, level, keys, ticker(ctx.settings.query.timeout_s, lambda: False))
    except Refused as refused:
        raise _refused(refused) from None
    except SQLAlchemyError as error:
        raise _database_down(error) from None
    if not found:
        raise HTTPException(404, f"no such {'study' if level == 'STUDY' else level.lower()} here")
    return found


def _path(request: Request, record: InstanceRecord):
    """The stored file of a record, which must lie under the storage directory and exist."""
    root = request.app.state.ctx.settings.storage_dir.resolve()
    path = (root / record.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        log.error("DICOMweb: the stored file of instance %d is missing (%s)", record.instance_pk, record.path)
        raise HTTPException(500, "a stored file is missing (logged on the server)")
    return path


def _audit(request: Request, user: CurrentUser, action: str, level: str, records: list[InstanceRecord]) -> None:
    request.app.state.ctx.accounts.audit(user.name, action, f"dicomweb:{level.lower()}",
                                         {"instances": len(records), "studies": sorted({r.study_uid for r in records})})


def _retrieve(request: Request, user: CurrentUser, study: str, series: str | None = None,
              instance: str | None = None) -> StreamingResponse:
    wanted = wanted_syntaxes(request.headers.get("accept"))
    if not wanted:
        raise HTTPException(406, 'instances are sent as multipart/related; type="application/dicom"')
    level, keys = _selection(study, series, instance)
    records = _instances(request, level, keys)
    plan = []
    for record in records:
        syntax = send_syntax(record.transfer_syntax_uid, wanted)
        if syntax is None:
            raise HTTPException(406, f"an instance is stored as {record.transfer_syntax_uid}, which the Accept "
                                     "header leaves out: accept it, transfer-syntax=*, or 1.2.840.10008.1.2.1 "
                                     "where pydicom can convert it")
        plan.append((_path(request, record), record.transfer_syntax_uid, syntax))
    _audit(request, user, "dicomweb_retrieve", level, records)
    boundary = secrets.token_hex(16)
    return StreamingResponse(multipart(plan, boundary),
                             media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study}")
def retrieve_study(request: Request, study: str, user: CurrentUser = Depends(dicomweb_user)):
    return _retrieve(request, user, study)


@router.get("/studies/{study}/series/{series}")
def retrieve_series(request: Request, study: str, series: str, user: CurrentUser = Depends(dicomweb_user)):
    return _retrieve(request, user, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(request: Request, study: str, series: str, instance: str,
                      user: CurrentUser = Depends(dicomweb_user)):
    return _retrieve(request, user, study, series, instance)


def _metadata(request: Request, user: CurrentUser, study: str, series: str | None = None,
              instance: str | None = None) -> StreamingResponse:
    _accept_json(request)
    level, keys = _selection(study, series, instance)
    records = _instances(request, level, keys)
    paths = [_path(request, record) for record in records]
    _audit(request, user, "dicomweb_metadata", level, records)

    def array():                        # one file read at a time, however large the study
        yield b"["
        first = True
        for path in paths:
            item = metadata_json(path)
            if item is not None:
                yield (b"" if first else b",") + json.dumps(item).encode()
                first = False
        yield b"]"

    return StreamingResponse(array(), media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata")
def study_metadata(request: Request, study: str, user: CurrentUser = Depends(dicomweb_user)):
    return _metadata(request, user, study)


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(request: Request, study: str, series: str, user: CurrentUser = Depends(dicomweb_user)):
    return _metadata(request, user, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(request: Request, study: str, series: str, instance: str,
                      user: CurrentUser = Depends(dicomweb_user)):
    return _metadata(request, user, study, series, instance)


def _rendered(request: Request, user: CurrentUser, study: str, series: str, instance: str, frame: str,
              accept: str | None) -> Response:
    media = rendered_type(accept)
    if media is None:
        raise HTTPException(406, f"rendered images are {' or '.join(RENDERED)}")
    number = _count("frame", frame, 1)
    level, keys = _selection(study, series, instance)
    records = _instances(request, level, keys)
    try:
        data = render(_path(request, records[0]), number, media)
    except NotRenderable as error:
        raise HTTPException(404, f"no image to render: {error}") from None
    _audit(request, user, "dicomweb_rendered", level, records)
    return Response(data, media_type=media)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
def rendered_instance(request: Request, study: str, series: str, instance: str,
                      user: CurrentUser = Depends(dicomweb_user)):
    """The first frame; `?accept=` overrides the header, as PS3.18 lets a browser link ask."""
    accept = request.query_params.get("accept") or request.headers.get("accept")
    return _rendered(request, user, study, series, instance, "1", accept)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered")
def rendered_frame(request: Request, study: str, series: str, instance: str, frame: str,
                   user: CurrentUser = Depends(dicomweb_user)):
    accept = request.query_params.get("accept") or request.headers.get("accept")
    return _rendered(request, user, study, series, instance, frame, accept)


# ----- WADO-URI ------------------------------------------------------------------------------

@router.get("/wado")
def wado_uri(request: Request, user: CurrentUser = Depends(dicomweb_user)):
    """?requestType=WADO&studyUID=&seriesUID=&objectUID=[&contentType=][&transferSyntax=][&frameNumber=]:
    the stored file (contentType=application/dicom) or a rendered frame (image/jpeg, the default,
    or image/png). Parameter names are matched case-insensitively, as clients spell them variously."""
    params = {name.lower(): value for name, value in request.query_params.items()}
    if params.get("requesttype", "").upper() != "WADO":
        raise _bad("requestType=WADO is required")
    study, series, instance = params.get("studyuid"), params.get("seriesuid"), params.get("objectuid")
    content = params.get("contenttype", "image/jpeg").split(",")[0].strip().lower()
    if content != "application/dicom":
        return _rendered(request, user, _uid(study, "studyUID"), _uid(series, "seriesUID"),
                         _uid(instance, "objectUID"), params.get("framenumber", "1"), content)
    level, keys = _selection(_uid(study, "studyUID"), _uid(series, "seriesUID"), _uid(instance, "objectUID"))
    record = _instances(request, level, keys)[0]
    syntax = send_syntax(record.transfer_syntax_uid, {params.get("transfersyntax") or ANY})
    if syntax is None:
        raise HTTPException(406, f"the instance is stored as {record.transfer_syntax_uid}")
    path = _path(request, record)
    _audit(request, user, "dicomweb_retrieve", level, [record])
    return StreamingResponse(file_bytes(path, record.transfer_syntax_uid, syntax), media_type="application/dicom")
