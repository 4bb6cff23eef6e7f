"""QueryVectors for moto's S3 Vectors emulation, and the checks around it.

moto 5.2.5 emulates the S3 Vectors control plane and PutVectors / GetVectors / ListVectors /
DeleteVectors, but not QueryVectors, so an adapter's searches could not be tested end to end.
This module adds it as an exact (brute-force) search over every vector of the index, with the
request and response shapes of the AWS API and the semantics the S3 Vectors user guide
documents:

* distance metrics per index: ``cosine`` (1 - cos) and ``euclidean`` (L2), computed on the
  float32 values AWS stores;
* ``topK`` 1..100, ``returnDistance`` / ``returnMetadata`` (both default false);
* metadata filters: ``$eq $ne $gt $gte $lt $lte $in $nin $exists $and $or``, a bare value
  meaning ``$eq``, several keys of one object meaning AND, and a list-valued metadata key
  matching when any element matches (``{"tags": "x"}`` matches ``"tags": ["x", "y"]``);
* errors as AWS shapes them: ``ValidationException`` (wrong dimension, bad filter, filter on a
  non-filterable key, topK out of range), ``NotFoundException`` (missing index).

moto also lets through requests AWS refuses, which would hide adapter bugs behind a green
test, so the same patch makes the emulator stricter where the adapter depends on it:

* CreateIndex on an existing name is a ``ConflictException`` (moto silently replaced the
  index and dropped its vectors); index names are checked; ``metadataConfiguration`` is kept
  (its non-filterable keys cannot be filtered on) and returned by GetIndex; dimension 4096 is
  allowed (moto refused it);
* PutVectors: 1..500 vectors per call, finite values, no zero vector in a cosine index,
  metadata an object of at most 50 keys, filterable metadata at most 2 KB and all metadata at
  most 40 KB (sizes measured as compact JSON: AWS does not document its exact measure);
* GetVectors at most 100 keys, DeleteVectors at most 500.

Not emulated: full-text and hybrid search (``queryTexts`` is refused), pagination of query
results (an exact search returns at most topK hits in one page), approximate-search recall
(AWS may miss a neighbour; this never does).

``serve.py`` installs this patch (with the others) and starts ``moto_server``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, Callable

from moto.core.exceptions import ServiceException
from moto.core.responses import ActionResult
from moto.s3vectors import urls as s3vectors_urls
from moto.s3vectors.exceptions import ValidationError
from moto.s3vectors.models import Index
from moto.s3vectors.responses import S3VectorsResponse

# Limits of the S3 Vectors user guide ("Limitations and restrictions").
MAX_TOP_K = 100
MAX_PUT_VECTORS = 500
MAX_DELETE_VECTORS = 500
MAX_GET_VECTORS = 100
MAX_DIMENSION = 4096
MAX_METADATA_KEYS = 50
MAX_FILTERABLE_METADATA_BYTES = 2 * 1024
MAX_METADATA_BYTES = 40 * 1024
MAX_NON_FILTERABLE_KEYS = 10

INDEX_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{1,61})[a-z0-9]$")

Predicate = Callable[[dict], bool]


class ConflictError(ServiceException):
    code = "ConflictException"


# --------------------------------------------------------------------------- filters


def _is_number(value: Any) -> bool:
    # bool is an int subclass in Python; metadata keeps booleans and numbers apart.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_primitive(value: Any) -> bool:
    return isinstance(value, (str, bool)) or _is_number(value)


def _same(a: Any, b: Any) -> bool:
    """Equality of two metadata primitives: numbers by value (1 == 1.0), otherwise same type."""
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _elements(value: Any) -> list:
    """A metadata value as the list of values a comparison looks at: a list's elements (any of
    them may match), else the value itself."""
    return value if isinstance(value, list) else [value]


def _field_matches(key: str, op: str, operand: Any) -> Predicate:
    """The predicate of one ``{key: {op: operand}}`` condition (operand already validated)."""
    if op == "$eq":
        return lambda md: key in md and any(_same(v, operand) for v in _elements(md[key]))
    if op == "$ne":
        # The negation of $eq, so a vector without the key matches (as $nin below).
        return lambda md: not (
            key in md and any(_same(v, operand) for v in _elements(md[key]))
        )
    if op in ("$gt", "$gte", "$lt", "$lte"):
        compare = {
            "$gt": lambda v: v > operand,
            "$gte": lambda v: v >= operand,
            "$lt": lambda v: v < operand,
            "$lte": lambda v: v <= operand,
        }[op]
        return lambda md: key in md and any(
            _is_number(v) and compare(v) for v in _elements(md[key])
        )
    if op == "$in":
        return lambda md: key in md and any(
            _same(v, o) for v in _elements(md[key]) for o in operand
        )
    if op == "$nin":
        return lambda md: not (
            key in md and any(_same(v, o) for v in _elements(md[key]) for o in operand)
        )
    if op == "$exists":
        return lambda md: (key in md) == operand
    raise ValidationError(f"Invalid filter: unsupported operator '{op}' on key '{key}'")


def _check_operand(key: str, op: str, operand: Any) -> None:
    if op in ("$eq", "$ne"):
        if not _is_primitive(operand):
            raise ValidationError(
                f"Invalid filter: '{op}' on key '{key}' needs a string, number or boolean"
            )
    elif op in ("$gt", "$gte", "$lt", "$lte"):
        if not _is_number(operand):
            raise ValidationError(f"Invalid filter: '{op}' on key '{key}' needs a number")
    elif op in ("$in", "$nin"):
        if (
            not isinstance(operand, list)
            or not operand
            or not all(_is_primitive(o) for o in operand)
        ):
            raise ValidationError(
                f"Invalid filter: '{op}' on key '{key}' needs a non-empty array of "
                "strings, numbers or booleans"
            )
    elif op == "$exists":
        if not isinstance(operand, bool):
            raise ValidationError(f"Invalid filter: '$exists' on key '{key}' needs a boolean")
    else:
        raise ValidationError(f"Invalid filter: unsupported operator '{op}' on key '{key}'")


def _all_of(predicates: list[Predicate]) -> Predicate:
    return lambda md: all(p(md) for p in predicates)


def _any_of(predicates: list[Predicate]) -> Predicate:
    return lambda md: any(p(md) for p in predicates)


def compile_filter(doc: Any, non_filterable: frozenset[str] = frozenset()) -> Predicate:
    """Validate a filter document and turn it into a predicate over a vector's metadata.

    The whole filter is validated up front, as AWS refuses a malformed filter even when no
    vector would reach the faulty branch.
    """
    if not isinstance(doc, dict):
        raise ValidationError("Invalid filter: a filter must be a JSON object")
    predicates: list[Predicate] = []
    for key, value in doc.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise ValidationError(
                    f"Invalid filter: '{key}' needs a non-empty array of filters"
                )
            parts = [compile_filter(part, non_filterable) for part in value]
            predicates.append(_all_of(parts) if key == "$and" else _any_of(parts))
        elif key.startswith("$"):
            raise ValidationError(f"Invalid filter: unsupported operator '{key}' at top level")
        else:
            if key in non_filterable:
                raise ValidationError(
                    f"Invalid filter: metadata key '{key}' is non-filterable in this index"
                )
            if isinstance(value, dict):
                if not value:
                    raise ValidationError(f"Invalid filter: empty condition on key '{key}'")
                for op, operand in value.items():
                    _check_operand(key, op, operand)
                    predicates.append(_field_matches(key, op, operand))
            elif _is_primitive(value):
                predicates.append(_field_matches(key, "$eq", value))
            else:
                raise ValidationError(
                    f"Invalid filter: key '{key}' needs a string, number, boolean or an "
                    "operator object"
                )
    return _all_of(predicates)


# --------------------------------------------------------------------------- vectors


def _float32(values: list) -> list[float]:
    """Values as AWS stores them (float32), refusing what it refuses."""
    out = []
    for v in values:
        if not _is_number(v) or not math.isfinite(v):
            raise ValidationError("Invalid vector data: values must be finite numbers")
        try:
            out.append(struct.unpack("f", struct.pack("f", float(v)))[0])
        except OverflowError:
            raise ValidationError("Invalid vector data: value out of float32 range") from None
    return out


def _vector_values(data: Any) -> list:
    if not isinstance(data, dict) or not isinstance(data.get("float32"), list):
        raise ValidationError("Invalid vector data: expected {\"float32\": [...]}")
    return data["float32"]


def _distance(metric: str, query: list[float], query_norm: float, vector: list[float]) -> float:
    if metric == "euclidean":
        return math.sqrt(sum((q - v) ** 2 for q, v in zip(query, vector)))
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        # A zero vector has no direction; PutVectors refuses them in cosine indexes, so this
        # only happens for vectors stored before that check (never, in this emulator).
        return 1.0
    dot = sum(q * v for q, v in zip(query, vector))
    # Rounding can push |cos| a hair past 1; AWS's range is [0, 2].
    return min(2.0, max(0.0, 1.0 - dot / (query_norm * norm)))


def _non_filterable(index: Index) -> frozenset[str]:
    config = getattr(index, "metadata_configuration", None) or {}
    return frozenset(config.get("nonFilterableMetadataKeys") or [])


def _index_of(response: S3VectorsResponse) -> Index:
    bucket = response._get_param("vectorBucketName")
    name = response._get_param("indexName")
    arn = response._get_param("indexArn")
    response._validate_index_params(arn, name, bucket)
    return response.s3vectors_backend.get_index(
        vector_bucket_name=bucket, index_name=name, index_arn=arn
    )


def query_vectors(self: S3VectorsResponse) -> ActionResult:
    index = _index_of(self)

    if self._get_param("queryTexts"):
        raise ValidationError(
            "queryTexts (full-text and hybrid search) is not supported by this emulator"
        )
    top_k = self._get_param("topK")
    if not _is_number(top_k) or int(top_k) != top_k or not 1 <= top_k <= MAX_TOP_K:
        raise ValidationError(
            f"1 validation error detected. Value at '/topK' failed to satisfy constraint: "
            f"Member must be between 1 and {MAX_TOP_K}, inclusive"
        )
    top_k = int(top_k)
    raw_query = self._get_param("queryVector")
    if raw_query is None:
        raise ValidationError("queryVector is required")
    query = _float32(_vector_values(raw_query))
    if len(query) != index.dimension:
        raise ValidationError(
            f"Query vector contains invalid dimensions: expected {index.dimension}, "
            f"got {len(query)}"
        )
    query_norm = math.sqrt(sum(q * q for q in query))
    if index.distance_metric == "cosine" and query_norm == 0.0:
        raise ValidationError("Invalid query vector: zero vectors are not allowed for cosine")

    raw_filter = self._get_param("filter")
    matches = (
        compile_filter(raw_filter, _non_filterable(index))
        if raw_filter is not None
        else (lambda md: True)
    )
    return_distance = self._get_bool_param("returnDistance", False)
    return_metadata = self._get_bool_param("returnMetadata", False)

    scored = []
    # A snapshot: the server is threaded and writes may land while this query runs.
    for vector in list(index.vectors.values()):
        metadata = vector.metadata if isinstance(vector.metadata, dict) else {}
        if not matches(metadata):
            continue
        values = _float32(_vector_values(vector.data))
        scored.append((_distance(index.distance_metric, query, query_norm, values), vector))
    # Nearest first; equal distances in key order, so results are repeatable.
    scored.sort(key=lambda item: (item[0], item[1].key))

    hits = []
    for distance, vector in scored[:top_k]:
        hit: dict[str, Any] = {"key": vector.key}
        if return_distance:
            hit["distance"] = distance
        if return_metadata:
            hit["metadata"] = vector.metadata
        hits.append(hit)
    return ActionResult({"vectors": hits, "distanceMetric": index.distance_metric})


# --------------------------------------------------------------------------- stricter writes


def create_index(self: S3VectorsResponse) -> ActionResult:
    bucket_name = self._get_param("vectorBucketName")
    bucket_arn = self._get_param("vectorBucketArn")
    name = self._get_param("indexName")
    data_type = self._get_param("dataType")
    dimension = self._get_param("dimension")
    metric = self._get_param("distanceMetric")
    config = self._get_param("metadataConfiguration") or {}

    if not isinstance(name, str) or not INDEX_NAME.match(name):
        raise ValidationError(
            "Invalid index name: 3-63 lowercase letters, numbers, hyphens and dots, "
            "starting and ending with a letter or number"
        )
    if data_type != "float32":
        raise ValidationError(
            "1 validation error detected. Value at '/dataType' failed to satisfy constraint: "
            "Member must satisfy enum value set: [float32]"
        )
    if not _is_number(dimension) or not 1 <= dimension <= MAX_DIMENSION:
        raise ValidationError(
            "1 validation error detected. Value at '/dimension' failed to satisfy constraint: "
            f"Member must be between 1 and {MAX_DIMENSION}, inclusive"
        )
    if metric not in ("euclidean", "cosine"):
        raise ValidationError(
            "1 validation error detected. Value at '/distanceMetric' failed to satisfy "
            "constraint: Member must satisfy enum value set: [euclidean, cosine]"
        )
    non_filterable = config.get("nonFilterableMetadataKeys") or []
    if len(non_filterable) > MAX_NON_FILTERABLE_KEYS or not all(
        isinstance(k, str) and 1 <= len(k) <= 63 for k in non_filterable
    ):
        raise ValidationError(
            f"Invalid metadataConfiguration: at most {MAX_NON_FILTERABLE_KEYS} "
            "non-filterable keys of 1-63 characters"
        )

    backend = self.s3vectors_backend
    bucket = backend.get_vector_bucket(
        vector_bucket_name=bucket_name, vector_bucket_arn=bucket_arn
    )
    if any(index.index_name == name for index in bucket.indexes.values()):
        raise ConflictError("An index with the specified name already exists")
    backend.create_index(
        vector_bucket_name=bucket_name,
        vector_bucket_arn=bucket_arn,
        index_name=name,
        data_type=data_type,
        dimension=dimension,
        distance_metric=metric,
        tags=self._get_param("tags"),
    )
    created = next(i for i in bucket.indexes.values() if i.index_name == name)
    # Picked up by GetIndex's serializer (metadataConfiguration -> metadata_configuration).
    created.metadata_configuration = {"nonFilterableMetadataKeys": list(non_filterable)}
    return ActionResult({})


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _check_metadata(key: str, metadata: Any, non_filterable: frozenset[str]) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ValidationError(f"Invalid record for key '{key}': metadata must be a JSON object")
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValidationError(
            f"Invalid record for key '{key}': at most {MAX_METADATA_KEYS} metadata keys"
        )
    for name, value in metadata.items():
        ok = _is_primitive(value) or (
            isinstance(value, list) and all(_is_primitive(v) for v in value)
        )
        if not ok:
            raise ValidationError(
                f"Invalid record for key '{key}': metadata '{name}' must be a string, "
                "number, boolean or a list of those"
            )
    filterable = {k: v for k, v in metadata.items() if k not in non_filterable}
    if _json_size(filterable) > MAX_FILTERABLE_METADATA_BYTES:
        raise ValidationError(
            f"Invalid record for key '{key}': filterable metadata exceeds "
            f"{MAX_FILTERABLE_METADATA_BYTES} bytes"
        )
    if _json_size(metadata) > MAX_METADATA_BYTES:
        raise ValidationError(
            f"Invalid record for key '{key}': metadata exceeds {MAX_METADATA_BYTES} bytes"
        )


def _checked_put_vectors(original: Callable) -> Callable:
    def put_vectors(self: S3VectorsResponse) -> Any:
        vectors = self._get_param("vectors") or []
        if not 1 <= len(vectors) <= MAX_PUT_VECTORS:
            raise ValidationError(
                "1 validation error detected. Value at '/vectors' failed to satisfy "
                f"constraint: Member must have length between 1 and {MAX_PUT_VECTORS}, inclusive"
            )
        index = _index_of(self)
        non_filterable = _non_filterable(index)
        for vector in vectors:
            key = vector.get("key", "")
            values = _float32(_vector_values(vector.get("data")))
            if (
                index.distance_metric == "cosine"
                and len(values) == index.dimension
                and not any(values)
            ):
                raise ValidationError(
                    f"Invalid record for key '{key}': zero vectors are not allowed for cosine"
                )
            _check_metadata(key, vector.get("metadata"), non_filterable)
        # moto checks the dimension and stores the vectors.
        return original(self)

    return put_vectors


def _limited_keys(original: Callable, limit: int) -> Callable:
    def handler(self: S3VectorsResponse) -> Any:
        keys = self._get_param("keys") or []
        if not 1 <= len(keys) <= limit:
            raise ValidationError(
                "1 validation error detected. Value at '/keys' failed to satisfy constraint: "
                f"Member must have length between 1 and {limit}, inclusive"
            )
        return original(self)

    return handler


# --------------------------------------------------------------------------- install


def install() -> None:
    """Register QueryVectors and the stricter handlers on moto's S3 Vectors service.

    Must run before the server builds its per-service app (on the first request), which reads
    the URL table once.
    """
    if hasattr(S3VectorsResponse, "query_vectors"):
        # A moto that has its own QueryVectors: decide which to keep instead of silently
        # shadowing it.
        raise RuntimeError("moto already implements S3 Vectors QueryVectors; review this patch")
    S3VectorsResponse.query_vectors = query_vectors
    S3VectorsResponse.create_index = create_index
    S3VectorsResponse.put_vectors = _checked_put_vectors(S3VectorsResponse.put_vectors)
    S3VectorsResponse.get_vectors = _limited_keys(S3VectorsResponse.get_vectors, MAX_GET_VECTORS)
    S3VectorsResponse.delete_vectors = _limited_keys(
        S3VectorsResponse.delete_vectors, MAX_DELETE_VECTORS
    )
    s3vectors_urls.url_paths["{0}/QueryVectors$"] = S3VectorsResponse.dispatch

