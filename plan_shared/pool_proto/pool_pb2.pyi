from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OfferRequest(_message.Message):
    __slots__ = ("manifest_part", "signature")
    MANIFEST_PART_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    manifest_part: bytes
    signature: bytes
    def __init__(self, manifest_part: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class OfferReply(_message.Message):
    __slots__ = ("bundle_id", "duplicate", "need", "need_report", "message")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    NEED_FIELD_NUMBER: _ClassVar[int]
    NEED_REPORT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    duplicate: bool
    need: _containers.RepeatedScalarFieldContainer[int]
    need_report: bool
    message: str
    def __init__(self, bundle_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., need: _Optional[_Iterable[int]] = ..., need_report: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("index", "report", "offset", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    report: bool
    offset: int
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., report: _Optional[bool] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("manifest_part", "signature", "chunks")
    MANIFEST_PART_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    manifest_part: bytes
    signature: bytes
    chunks: _containers.RepeatedCompositeFieldContainer[FileChunk]
    def __init__(self, manifest_part: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., chunks: _Optional[_Iterable[_Union[FileChunk, _Mapping]]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("bundle_id", "duplicate", "n_images", "n_new_files", "bytes_received", "message")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    N_NEW_FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    duplicate: bool
    n_images: int
    n_new_files: int
    bytes_received: int
    message: str
    def __init__(self, bundle_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., n_images: _Optional[int] = ..., n_new_files: _Optional[int] = ..., bytes_received: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("site_id", "paged", "page_token")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGED_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    paged: bool
    page_token: str
    def __init__(self, site_id: _Optional[str] = ..., paged: _Optional[bool] = ..., page_token: _Optional[str] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("bundle_id", "site_id", "n_images", "n_bytes", "created", "received", "generator_sha256", "config_sha256", "per_class", "per_method")
    class PerClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PerMethodEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    N_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    PER_METHOD_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    site_id: str
    n_images: int
    n_bytes: int
    created: str
    received: str
    generator_sha256: str
    config_sha256: str
    per_class: _containers.ScalarMap[str, int]
    per_method: _containers.ScalarMap[str, int]
    def __init__(self, bundle_id: _Optional[str] = ..., site_id: _Optional[str] = ..., n_images: _Optional[int] = ..., n_bytes: _Optional[int] = ..., created: _Optional[str] = ..., received: _Optional[str] = ..., generator_sha256: _Optional[str] = ..., config_sha256: _Optional[str] = ..., per_class: _Optional[_Mapping[str, int]] = ..., per_method: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("bundles", "next_page_token")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    next_page_token: str
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CatalogRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class CatalogEntry(_message.Message):
    __slots__ = ("bundle_id", "site_id", "sha256", "class_name", "size", "record_json", "generator_sha256", "config_sha256", "generator_round", "created")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    site_id: str
    sha256: str
    class_name: str
    size: int
    record_json: str
    generator_sha256: str
    config_sha256: str
    generator_round: int
    created: str
    def __init__(self, bundle_id: _Optional[str] = ..., site_id: _Optional[str] = ..., sha256: _Optional[str] = ..., class_name: _Optional[str] = ..., size: _Optional[int] = ..., record_json: _Optional[str] = ..., generator_sha256: _Optional[str] = ..., config_sha256: _Optional[str] = ..., generator_round: _Optional[int] = ..., created: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("sha256", "offset", "data", "last")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    data: bytes
    last: bool
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class FetchReply(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[FetchChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[FetchChunk, _Mapping]]] = ...) -> None: ...

class CatalogReply(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CatalogEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[CatalogEntry, _Mapping]]] = ...) -> None: ...

class ProgressRequest(_message.Message):
    __slots__ = ("stage", "event", "task", "done", "total", "unit", "elapsed_s", "eta_s", "index", "n_stages", "failed", "prev", "prev_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    N_STAGES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    PREV_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    event: str
    task: str
    done: int
    total: int
    unit: str
    elapsed_s: float
    eta_s: float
    index: int
    n_stages: int
    failed: bool
    prev: str
    prev_s: float
    def __init__(self, stage: _Optional[str] = ..., event: _Optional[str] = ..., task: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., unit: _Optional[str] = ..., elapsed_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., index: _Optional[int] = ..., n_stages: _Optional[int] = ..., failed: _Optional[bool] = ..., prev: _Optional[str] = ..., prev_s: _Optional[float] = ...) -> None: ...

class ProgressReply(_message.Message):
    __slots__ = ("recorded", "message")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    recorded: bool
    message: str
    def __init__(self, recorded: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
