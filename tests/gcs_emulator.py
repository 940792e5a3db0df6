"""A local Cloud Storage emulator for the tests of ``gs://`` paths.

``gcp-storage-emulator`` (PyPI, test extra) serves the GCS JSON API on
127.0.0.1; gcsfs and google-cloud-storage reach it through
``STORAGE_EMULATOR_HOST``, tensorstore (orbax's checkpoints) through
``TENSORSTORE_GCS_HTTP_URL``: the same client code a run on Cloud Storage
uses, with no credentials.

Two gaps of the emulator are filled here: its media downloads lack the
``x-goog-generation`` header that Cloud Storage sends and tensorstore
requires ("Malformed StorageGeneration" otherwise); and it answers the
objects ``moveTo`` call (gcsfs's rename) with 501, which gcsfs retries for
35 s before copying and deleting: here the call copies and deletes at once,
as Cloud Storage's move does. The emulator does not check write
preconditions (``ifGenerationMatch``), so what it tests is one writer per
object, which is what a run is.
"""

import os
import socket

BUCKET = "midpo-test"


def _add_generation_header(download):
  def wrapped(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  (NotFound: the handler answers 404)
      obj = None
    if obj is not None:
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return download(request, response, storage, *args, **kwargs)
  return wrapped


def _move(request, response, storage, *args, **kwargs):
  from http import HTTPStatus
  from urllib.parse import unquote
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  bucket = request.params["bucket_name"]
  src, dst = unquote(request.params["object_id"]), unquote(request.params["dest_object_id"])
  try:
    obj = objects._copy(request.base_url, storage, bucket, src, bucket, dst)  # pylint: disable=protected-access
    storage.delete_file(bucket, src)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  response.json(obj)


def start():
  """Starts the emulator on a free port of 127.0.0.1 with bucket ``BUCKET``; returns
  ``(server, environment variables that point clients at it)``."""
  from gcp_storage_emulator import server as server_lib
  from gcp_storage_emulator.handlers import objects

  if not getattr(objects.download, "_midpo_patched", False):
    original = objects.download
    patched = _add_generation_header(original)
    patched._midpo_patched = True
    objects.download = patched  # objects.get(alt=media) calls it by name
    for _, methods in server_lib.HANDLERS:
      for method, handler in list(methods.items()):
        if handler is original:
          methods[method] = patched
    move = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.+)/moveTo/o/"
            r"(?P<dest_object_id>.+)$")
    server_lib.HANDLERS = ((move, {"POST": _move}),) + tuple(server_lib.HANDLERS)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  return server, {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
