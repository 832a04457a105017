"""sock_diag requests and replies, byte for byte."""

import socket
import struct

import pytest

from closewait_trace import sockdiag, tcpstates


def test_sockdiag_request_and_reply_round_trip():
    req = sockdiag.build_request(socket.AF_INET, [tcpstates.CLOSE_WAIT, tcpstates.LISTEN])
    length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 16 + 56 and kind == 20 and flags & 0x300
    assert struct.unpack_from("=I", req, 20)[0] == (1 << 8) | (1 << 10)
    src = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    dst = socket.inet_pton(socket.AF_INET, "10.0.0.9") + bytes(12)
    body = struct.pack("=BBBB", socket.AF_INET, tcpstates.LISTEN, 0, 0) + \
        (8080).to_bytes(2, "big") + (0).to_bytes(2, "big") + src + dst + \
        struct.pack("=I8sIIIII", 0, bytes(8), 0, 3, 128, 1000, 555)
    msg = struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    rows, finished = sockdiag.parse_messages(msg + done)
    assert finished and len(rows) == 1
    row = rows[0]
    assert (row.endpoints.laddr, row.endpoints.lport, row.endpoints.raddr) == ("127.0.0.1", 8080, "10.0.0.9")
    assert (row.state, row.rx_queue, row.tx_queue, row.uid, row.inode) == (tcpstates.LISTEN, 3, 128, 1000, 555)
    err = struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", -13)
    with pytest.raises(OSError):
        sockdiag.parse_messages(err)
