"""Special files where images or shards are expected (a list file naming them, a link to them, a pattern
matching them): a fifo, whose open waits for a writer forever, and a device, whose read may never end,
are refused as 'not a regular file' without being read, as a bad file (skipped) or a bad shard."""
import io
import os
import tarfile
import threading

import pytest

from seer.data import DataSourceError, open_source
from tests.images import image_bytes


class _FifoWriter:
    """A fifo at ``path`` that a thread writes ``payload`` into for every reader that opens it, so that a
    reader which waits for a writer (the defect) gets bytes and the test fails instead of hanging."""

    def __init__(self, path, payload: bytes):
        os.mkfifo(path)
        self.path, self.payload, self.stop = str(path), payload, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                with open(self.path, "wb") as f:  # blocks until a reader opens the fifo
                    if not self.stop.is_set():
                        f.write(self.payload)
            except BrokenPipeError:  # the reader went without reading (refused it)
                pass

    def close(self):
        self.stop.set()
        # A writer still waiting in open() is released by a reader; it then sees stop and leaves.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.thread.join()
        os.close(fd)


def _tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_list_naming_a_fifo_or_a_device_reads_them_as_bad_files(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(0))
    fifo = _FifoWriter(tmp_path / "pipe.jpg", image_bytes(0))
    try:
        (tmp_path / "zero.jpg").symlink_to("/dev/null")  # a character device (as /dev/zero, whose read never ends)
        (tmp_path / "folder.jpg").mkdir()
        names = ["good.png", "pipe.jpg", "zero.jpg", "folder.jpg"]
        (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
        src = open_source(str(tmp_path / "list.txt"), cache=tmp_path / "idx")
        assert [os.path.basename(src.name(i)) for i in range(len(src))] == names
        assert src.read(0) == good.read_bytes()
        for i, what in ((1, "a fifo"), (2, "a character device"), (3, "a folder")):
            with pytest.raises(OSError, match=rf"not a regular file \({what}\)"):
                src.read(i)
    finally:
        fifo.close()


def test_a_fifo_matched_as_a_tar_shard_is_refused_not_waited_on(tmp_path):
    fifo = _FifoWriter(tmp_path / "b.tar", _tar("x.png", image_bytes(0)))
    try:
        with pytest.raises(DataSourceError, match=r"cannot read tar shard .*b\.tar.*not a regular file \(a fifo\)"):
            open_source(str(tmp_path / "*.tar"), cache=tmp_path / "idx")
    finally:
        fifo.close()
