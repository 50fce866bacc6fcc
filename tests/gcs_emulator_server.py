"""The `gcp-storage-emulator` server with two behaviours of real GCS added that this framework
relies on and the emulator (2026.7) lacks:

* media downloads carry the `x-goog-generation` / `x-goog-metageneration` headers. TensorStore
  reads an object's generation from them; without them Orbax's OCDBT checkpoints fail with
  "Malformed StorageGeneration" as soon as a manifest is read back.
* uploads and deletes honour `ifGenerationMatch` (412 Precondition Failed otherwise), the
  precondition research/lease.py writes the workdir lease with.

Everything else is the package's own server. Run as
`python tests/gcs_emulator_server.py --host 127.0.0.1 --port PORT` (in memory).
"""

from __future__ import annotations

import argparse
import json
from http import HTTPStatus
from http import server as http_server

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert, _delete = objects.download, objects.insert, objects.delete


def _generation(storage, bucket: str, name: str | None) -> str:
    """The object's current generation, "0" when it does not exist (GCS's convention)."""
    try:
        return str(storage.get_file_obj(bucket, name)["generation"]) if name else "0"
    except NotFound:
        return "0"


def _precondition_failed(request, response, storage, name: str | None) -> bool:
    want = request.query.get("ifGenerationMatch")
    if not want or want[0] == _generation(storage, request.params["bucket_name"], name):
        return False
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                             "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
    return True


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def insert(request, response, storage, *args, **kwargs):
    name = request.query["name"][0] if "name" in request.query else None
    if name is None and isinstance(request.data, dict):
        meta = request.data.get("meta") if "meta" in request.data else request.data
        name = (meta or {}).get("name")
    if "upload_id" not in request.query and _precondition_failed(request, response, storage, name):
        return
    _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, response, storage, request.params.get("object_id")):
        return
    _delete(request, response, storage, *args, **kwargs)


def _patch_routes() -> None:
    swap = {_download: download, _insert: insert, _delete: delete}
    objects.download, objects.insert, objects.delete = download, insert, delete
    server.HANDLERS = tuple((regex, {m: swap.get(f, f) for m, f in handlers.items()})
                            for regex, handlers in server.HANDLERS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _patch_routes()
    # gcsfs sends a batch of requests at once (fsspec's get of a directory: one per file). The
    # package's http.server.HTTPServer answers one at a time with a listen backlog of 5: the
    # connections past it were dropped and retried after seconds of TCP SYN backoff (a 40-file
    # download took 12-109 s instead of 0.2 s). A longer backlog queues them instead.
    http_server.HTTPServer.request_queue_size = 128
    srv = server.create_server(args.host, args.port, in_memory=True)
    srv.run()


if __name__ == "__main__":
    main()
