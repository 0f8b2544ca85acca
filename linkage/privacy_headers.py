"""Header check of a de-identified export: attributes left that the DICOM Basic Application Level
Confidentiality Profile removes or replaces (PS3.15 Annex E, Table E.1-1, column "Basic Prof.").

Why a table here: neither maintained Python de-identifier carries the profile's table in a usable
form. `deid` 0.4.13 ships a site recipe (REMOVE endswith:Date, contains:UID, ... of one
institution), not Table E.1-1 with its action codes; `dicognito` 0.19.0 keeps its own keyword
lists inside its anonymizer classes. So the attributes below, with the profile's action codes, are
transcribed from PS3.15 Table E.1-1 (a subset: the identifying attributes an imaging export
carries in practice; all private attributes are checked as the profile's rule for them says).

Actions: X remove; Z empty or dummy value; D dummy value; U replaced UID (consistent within the
set); X/Z, X/D, Z/D, X/Z/D one of those. What is checked, per attribute anywhere in a data set
(sequence items included):

- X: present with a value -> left in.
- Z, D and combinations: present with a value other than the export's pseudonym (Patient ID)
  -> "holds a value": the profile empties it or puts a dummy, which a header alone cannot tell
  from the real value, so a site reads these as "check".
- dates and times: as above, unless Longitudinal Temporal Information Modified (0028,0303) is
  MODIFIED (the profile's Retain Longitudinal Temporal Information with Modified Dates option).
- U (UIDs): always present (they are required); they are the archive's own when the node's store
  holds them (`uids_in_archive`, with --against-store), else nothing can be said.
- private attributes (odd groups): removed by the basic profile.
- Burned In Annotation (0028,0301) YES: the pixels carry text. The pixels are not read here:
  `privacy-audit --ocr` reads them (linkage.privacy_pixels).

Values are never returned: the report names attributes, counts files and lists pseudonyms only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

# keyword: (tag, action, category), from PS3.15 Table E.1-1, "Basic Prof." column
ANNEX_E: dict[str, tuple[int, str, str]] = {
    # names and identifiers of the patient
    "PatientName": (0x00100010, "Z", "name"),
    "PatientID": (0x00100020, "Z", "identifier"),
    "IssuerOfPatientID": (0x00100021, "X", "identifier"),
    "PatientBirthDate": (0x00100030, "Z", "date"),
    "PatientBirthTime": (0x00100032, "X", "date"),
    "PatientSex": (0x00100040, "Z", "patient characteristic"),
    "OtherPatientIDs": (0x00101000, "X", "identifier"),
    "OtherPatientNames": (0x00101001, "X", "name"),
    "OtherPatientIDsSequence": (0x00101002, "X", "identifier"),
    "PatientBirthName": (0x00101005, "X", "name"),
    "PatientAge": (0x00101010, "X", "patient characteristic"),
    "PatientSize": (0x00101020, "X", "patient characteristic"),
    "PatientWeight": (0x00101030, "X", "patient characteristic"),
    "PatientAddress": (0x00101040, "X", "address"),
    "PatientMotherBirthName": (0x00101060, "X", "name"),
    "MilitaryRank": (0x00101080, "X", "patient characteristic"),
    "MedicalRecordLocator": (0x00101090, "X", "identifier"),
    "PatientTelephoneNumbers": (0x00102154, "X", "address"),
    "EthnicGroup": (0x00102160, "X", "patient characteristic"),
    "Occupation": (0x00102180, "X", "patient characteristic"),
    "AdditionalPatientHistory": (0x001021B0, "X", "free text"),
    "PatientReligiousPreference": (0x001021F0, "X", "patient characteristic"),
    "PatientComments": (0x00104000, "X", "free text"),
    "ReferencedPatientSequence": (0x00081120, "X", "identifier"),
    # the visit and the order
    "AccessionNumber": (0x00080050, "Z", "identifier"),
    "StudyID": (0x00200010, "Z", "identifier"),
    "AdmissionID": (0x00380010, "X", "identifier"),
    "RequestedProcedureID": (0x00401001, "X", "identifier"),
    "PerformedProcedureStepID": (0x00400253, "X", "identifier"),
    "ReasonForTheRequestedProcedure": (0x00401002, "X", "free text"),
    "RequestAttributesSequence": (0x00400275, "X", "free text"),
    "AdmittingDiagnosesDescription": (0x00081080, "X", "free text"),
    # staff
    "ReferringPhysicianName": (0x00080090, "Z", "name"),
    "ReferringPhysicianAddress": (0x00080092, "X", "address"),
    "ReferringPhysicianTelephoneNumbers": (0x00080094, "X", "address"),
    "PhysiciansOfRecord": (0x00081048, "X", "name"),
    "PerformingPhysicianName": (0x00081050, "X", "name"),
    "NameOfPhysiciansReadingStudy": (0x00081060, "X", "name"),
    "OperatorsName": (0x00081070, "X", "name"),
    "RequestingPhysician": (0x00321032, "X", "name"),
    # place and device
    "InstitutionName": (0x00080080, "X/Z/D", "institution"),
    "InstitutionAddress": (0x00080081, "X", "address"),
    "InstitutionalDepartmentName": (0x00081040, "X", "institution"),
    "StationName": (0x00081010, "X/Z/D", "device"),
    "DeviceSerialNumber": (0x00181000, "X/Z/D", "device"),
    "DeviceUID": (0x00181002, "U", "uid"),
    "PlateID": (0x00181004, "X", "device"),
    "GantryID": (0x00181008, "X", "device"),
    "DetectorID": (0x0018700A, "X/D", "device"),
    "PerformedStationName": (0x00400241, "X", "device"),
    "PerformedLocation": (0x00400243, "X", "institution"),
    # dates and times
    "StudyDate": (0x00080020, "Z", "date"),
    "SeriesDate": (0x00080021, "X/D", "date"),
    "AcquisitionDate": (0x00080022, "X/Z", "date"),
    "ContentDate": (0x00080023, "Z/D", "date"),
    "InstanceCreationDate": (0x00080012, "X/D", "date"),
    "AcquisitionDateTime": (0x0008002A, "X/D", "date"),
    "StudyTime": (0x00080030, "Z", "date"),
    "SeriesTime": (0x00080031, "X/D", "date"),
    "AcquisitionTime": (0x00080032, "X/Z", "date"),
    "ContentTime": (0x00080033, "Z/D", "date"),
    # free text
    "StudyDescription": (0x00081030, "X", "free text"),
    "SeriesDescription": (0x0008103E, "X", "free text"),
    "ImageComments": (0x00204000, "X", "free text"),
    "DerivationDescription": (0x00082111, "X", "free text"),
    "ProtocolName": (0x00181030, "X/D", "free text"),
    "PerformedProcedureStepDescription": (0x00400254, "X", "free text"),
    "RequestedProcedureDescription": (0x00321060, "X/Z", "free text"),
    "ContentSequence": (0x0040A730, "X", "free text"),
    # UIDs
    "StudyInstanceUID": (0x0020000D, "U", "uid"),
    "SeriesInstanceUID": (0x0020000E, "U", "uid"),
    "SOPInstanceUID": (0x00080018, "U", "uid"),
    "FrameOfReferenceUID": (0x00200052, "U", "uid"),
}
BY_TAG = {tag: (keyword, action, category) for keyword, (tag, action, category) in ANNEX_E.items()}
LONGITUDINAL_MODIFIED = 0x00280303
BURNED_IN = 0x00280301
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
NOT_CHECKED = "burned-in text not checked by the header check: --ocr reads the pixels (linkage.privacy_pixels)"


@dataclass
class HeaderTally:
    """What the files of an export hold, as counts (no values): fed one data set at a time."""

    files: int = 0
    dates_modified: int = 0
    burned_in: int = 0
    identity_removed: int = 0

    def __post_init__(self) -> None:
        self.found: dict[str, set[str]] = defaultdict(set)        # keyword -> pseudonyms of the files
        self.counts: dict[str, int] = defaultdict(int)            # keyword -> files
        self.private: dict[str, int] = defaultdict(int)           # private creator (or group) -> files
        self.uids: set[str] = set()

    def add(self, ds, pseudonym: str) -> None:
        self.files += 1
        modified = str(ds.get(LONGITUDINAL_MODIFIED).value if LONGITUDINAL_MODIFIED in ds else "").upper()
        self.dates_modified += modified == "MODIFIED"
        burned = ds.get(BURNED_IN)
        self.burned_in += burned is not None and str(burned.value).upper() == "YES"
        removed = ds.get(0x00120062)
        self.identity_removed += removed is not None and str(removed.value).upper() == "YES"
        seen, private = set(), set()
        for element in ds.iterall():
            tag = int(element.tag)
            if element.tag.is_private:
                if element.tag.is_private_creator:
                    continue
                creator = element.private_creator if hasattr(element, "private_creator") else None
                private.add(f"({element.tag.group:04X},xx) {creator}" if creator else f"group {element.tag.group:04X}")
                continue
            entry = BY_TAG.get(tag)
            if entry is None or _empty(element.value):
                continue
            keyword, action, category = entry
            if keyword in UID_KEYWORDS:
                self.uids.add(str(element.value))
            if action == "U" or keyword == "PatientID":
                continue                                          # judged against the archive / is the pseudonym
            if "X" not in action and str(element.value).strip() == pseudonym:
                continue                                          # the pseudonym put in as the dummy value
            if category == "date" and modified == "MODIFIED":
                continue                                          # shifted dates, kept under the profile's option
            seen.add(keyword)
        for keyword in seen:
            self.counts[keyword] += 1
            self.found[keyword].add(pseudonym)
        for name in private:
            self.private[name] += 1

    def result(self, uids_in_archive: set[str] | None = None, key: dict[str, str] | None = None,
               pseudonyms: set[str] | None = None) -> dict:
        """Findings (attribute, action, category, files, a few pseudonyms), sorted by category; plus the
        private attributes, the UIDs the archive holds (when checked), pseudonyms equal to their
        original Patient ID (with a key) and what was not checked."""
        findings = []
        for keyword, files in self.counts.items():
            tag, action, category = ANNEX_E[keyword]
            findings.append({"attribute": keyword, "tag": f"({tag >> 16:04X},{tag & 0xFFFF:04X})", "action": action,
                             "category": category, "files": files, "left": "left in" if action.startswith("X")
                             else "holds a value (the profile empties it or puts a dummy)",
                             "pseudonyms": sorted(self.found[keyword])[:5]})
        findings.sort(key=lambda f: (f["category"], f["attribute"]))
        out = {"profile": "DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile (Table E.1-1)",
               "files": self.files, "findings": findings,
               "private_attributes": [{"creator": k, "files": v} for k, v in sorted(self.private.items())],
               "patient_identity_removed_yes": self.identity_removed,
               "dates_marked_modified": self.dates_modified,
               "burned_in_annotation_yes": self.burned_in, "burned_in_text": NOT_CHECKED}
        if uids_in_archive is not None:
            out["uids_in_archive"] = len(self.uids & uids_in_archive)
            out["uids_checked"] = len(self.uids)
        if key is not None and pseudonyms is not None:
            out["pseudonyms_equal_to_patient_id"] = sorted(p for p in pseudonyms if key.get(p) == p)
        return out


def issues(result: dict) -> int:
    """How many kinds of finding a header check has (attributes, private attributes, archive UIDs, ...)."""
    return (len(result["findings"]) + bool(result["private_attributes"]) + bool(result.get("uids_in_archive"))
            + bool(result.get("pseudonyms_equal_to_patient_id")) + bool(result["burned_in_annotation_yes"]))


def _empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return not value.strip() if isinstance(value, str) else not value
    try:
        return len(value) == 0
    except TypeError:
        return False
