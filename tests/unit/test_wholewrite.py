"""wholewrite.py: a buffer written whole whatever the descriptor returns
(tests/bounds/test_whole_writes.py has the real interrupted pipes)."""

import io
import os
import threading
import time

import pytest

from closewait_trace import wholewrite


def test_a_nonblocking_pipe_gets_everything_as_its_reader_makes_room():
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    data = os.urandom(3 << 20)          # 48 times what the pipe holds
    got = bytearray()

    def reader():
        while True:
            time.sleep(0.001)
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    wholewrite.write_all(write_end, data)
    os.close(write_end)
    thread.join(timeout=60)
    os.close(read_end)
    assert bytes(got) == data


def test_partial_writes_are_taken_up_where_they_ended(monkeypatch):
    written = []

    def a_few_bytes_at_a_time(fd, view):
        written.append(bytes(view[:3]))
        return len(written[-1])

    monkeypatch.setattr(os, "write", a_few_bytes_at_a_time)
    wholewrite.write_all(99, b"0123456789")
    assert b"".join(written) == b"0123456789" and len(written) == 4


def test_a_write_that_takes_nothing_is_an_error_not_a_loop(monkeypatch):
    monkeypatch.setattr(os, "write", lambda fd, view: 0)
    with pytest.raises(OSError) as failed:
        wholewrite.write_all(99, b"x")
    assert failed.value.errno == wholewrite.errno.EIO


def test_unbuffered_is_a_text_stream_straight_over_its_descriptor(tmp_path):
    path = tmp_path / "out"
    with open(path, "wb", buffering=0) as raw:
        assert wholewrite.is_unbuffered(io.TextIOWrapper(raw, write_through=True))
    with open(path, "w") as buffered:
        assert not wholewrite.is_unbuffered(buffered)
    assert not wholewrite.is_unbuffered(io.StringIO())
