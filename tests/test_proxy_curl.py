"""curl as the client: its own framing choices (Expect: 100-continue, chunked uploads, HTTP/1.0)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

from upstreams import origin, pattern_sha256

CURL = shutil.which("curl") or "curl"  # installed by .ci/system-deps; a missing curl fails loudly


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--noproxy", "*", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_curl_upload_with_expect_continue_and_chunked(make_proxy, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: curl sends Expect: 100-continue for bodies this size
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    want = {"len": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr])
        rc, out, err = await curl("-v", "--data-binary", f"@{upload}", f"{proxy.url}/upload")
        assert rc == 0, err
        assert b"> Expect: 100-continue" in err and b"< HTTP/1.1 100 Continue" in err
        assert json.loads(out) == want
        rc, out, err = await curl(
            "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", f"{proxy.url}/upload"
        )
        assert rc == 0, err
        assert json.loads(out) == want


async def test_curl_http10_download_and_head(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr])
        rc, out, err = await curl("--http1.0", f"{proxy.url}/bytes/300000?chunked=1")
        assert rc == 0, err
        assert hashlib.sha256(out).hexdigest() == pattern_sha256(300000)
        rc, out, err = await curl("-I", f"{proxy.url}/bytes/5000")
        assert rc == 0, err
        head = out.decode().lower()
        assert (
            head.startswith("http/1.1 200") and "content-length: 5000" in head and "via: 1.1 bgproxy" in head
        )
