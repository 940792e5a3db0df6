"""A local Cloud Storage emulator for the tests of ``gs://`` paths.

``gcp-storage-emulator`` (PyPI, test extra) serves the GCS JSON API on
127.0.0.1; gcsfs and google-cloud-storage reach it through
``STORAGE_EMULATOR_HOST``, tensorstore (orbax's checkpoints) through
``TENSORSTORE_GCS_HTTP_URL``: the same client code a run on Cloud Storage
uses, with no credentials.

Three gaps of the emulator are filled here: its media downloads lack the
``x-goog-generation`` header that Cloud Storage sends and tensorstore
requires ("Malformed StorageGeneration" otherwise); it answers the
objects ``moveTo`` call (gcsfs's rename) with 501, which gcsfs retries for
35 s before copying and deleting: here the call copies and deletes at once,
as Cloud Storage's move does; and it reads a multipart upload (gcsfs's
``put_file`` of a small file) with Python's email parser, which drops a
final ``\r`` of the file's bytes (one random file in 256; a test's random
checkpoint bytes failed so): here the file's bytes are cut out of the
request body at the part boundary, exactly. The emulator does not check write
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


def _exact_multipart_media(read_data, decode_raw_data):
  """``server._read_data`` with a multipart upload's file bytes taken verbatim from the
  body: the part after the metadata part, between its blank line and the line break before
  the closing delimiter (RFC 2046's CRLF, or the bare LF gcsfs writes); the file's bytes may
  hold the boundary itself. ``decode_raw_data`` is wrapped to keep the body it gives."""
  def keep(raw, handler):
    handler._midpo_body = decode_raw_data(raw, handler)  # pylint: disable=protected-access
    return handler._midpo_body  # pylint: disable=protected-access

  def wrapped(handler, query):
    data = read_data(handler, query)
    content_type = handler.headers.get("Content-Type") or ""
    body = getattr(handler, "_midpo_body", None)
    if (not content_type.startswith("multipart/related") or not isinstance(data, dict)
        or not body):
      return data
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    delimiter = b"--" + boundary.encode()
    newline = b"\r\n" if body.startswith(delimiter + b"\r\n") else b"\n"  # gcsfs: bare LFs
    second = body.find(newline + delimiter + newline)  # the media part's delimiter line
    end = body.rfind(newline + delimiter + b"--")  # the closing delimiter, after the media
    if second < 0 or end <= second:
      return data
    start = second + len(newline + delimiter + newline)
    head, blank, _ = body[start:end].partition(newline * 2)
    if not blank or b"content-transfer-encoding" in head.lower():
      return data  # encoded parts (base64) survive the email parser
    return {**data, "content": body[start + len(head) + len(blank):end]}

  return keep, wrapped


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
    # pylint: disable-next=protected-access
    server_lib._decode_raw_data, server_lib._read_data = _exact_multipart_media(
        server_lib._read_data, server_lib._decode_raw_data)  # pylint: disable=protected-access
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  return server, {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
