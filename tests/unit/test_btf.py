"""The BTF offsets for a socket's network namespace (kernel/btf.py): right on
the running kernel's BTF and on crafted blobs shaped like it (typedefs,
anonymous nested members, either byte order), and never a crash, a hang or
a wrong answer on truncated, corrupt or hostile ones: None, and the tool
falls back to matching by address."""

from __future__ import annotations

import os
import struct

import pytest

from closewait_trace.kernel import btf

KIND = {"int": 1, "ptr": 2, "struct": 4, "union": 5, "typedef": 8, "const": 10}


class Builder:
    """A BTF blob, type by type (ids from 1, in order of adding)."""

    def __init__(self, endian="<"):
        self.e = endian
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def name(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: str, name: str = "", size_or_type: int = 0, members=(), kflag=False,
            extra: bytes = b"", vlen=None, raw_kind=None) -> int:
        k = raw_kind if raw_kind is not None else KIND[kind]
        n = len(members) if vlen is None else vlen
        info = (k << 24) | n | (1 << 31 if kflag else 0)
        rec = struct.pack(self.e + "III", self.name(name), info, size_or_type) + extra
        for mname, mtype, bit_offset in members:
            rec += struct.pack(self.e + "III", self.name(mname), mtype, bit_offset)
        self.types.append(rec)
        return len(self.types)

    def int(self, name="unsigned int", size=4) -> int:
        return self.add("int", name, size, extra=struct.pack(self.e + "I", size * 8))

    def blob(self) -> bytes:
        types = b"".join(self.types)
        header = struct.pack(self.e + "HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types),
                             len(types), len(self.strings))
        return header + types + bytes(self.strings)


def kernel_like(endian="<", inum_bitfield=False, drop_inum=False) -> bytes:
    """struct sock { struct sock_common __sk_common; } at 0;
    sock_common.skc_net at 48, a typedef (possible_net_t) of an unnamed
    struct { struct net *net; }; struct net.ns at 152; ns_common.inum at 24,
    inside an anonymous union inside an anonymous struct (as 6.18 nests
    ns_common's fields)."""
    b = Builder(endian)
    u32 = b.int()
    u64 = b.int("unsigned long long", 8)
    net_fwd = 3                     # struct net, added below as type 8
    net_ptr = b.add("ptr", "", 0)   # id 3 -> patched to point at net
    possible = b.add("struct", "", 8, [("net", net_ptr, 0)])
    possible_t = b.add("typedef", "possible_net_t", possible)
    sock_common = b.add("struct", "sock_common", 136,
                        [("skc_hash", u32, 0), ("skc_net", possible_t, 48 * 8)])
    b.add("struct", "sock", 800, [("__sk_common", sock_common, 0)])
    inner = [("stashed", u64, 0)] if drop_inum else [("inum", u32, (8 << 24) | 0 if inum_bitfield else 0)]
    union = b.add("union", "", 8, inner, kflag=inum_bitfield)
    const_union = b.add("const", "", union)
    anon = b.add("struct", "", 16, [("__ns_ref", u32, 0), ("", const_union, 8 * 8)])
    ns_common = b.add("struct", "ns_common", 40, [("ops", u64, 0), ("", anon, 16 * 8)])
    net = b.add("struct", "net", 4096, [("passive", u32, 0), ("ns", ns_common, 152 * 8)])
    # point the pointer at struct net
    b.types[net_ptr - 1] = struct.pack(b.e + "III", 0, KIND["ptr"] << 24, net)
    assert net_fwd == net_ptr
    return b.blob()


EXPECTED = btf.NetnsOffsets(sk_net=48, net_inum=152 + 16 + 8)


def test_the_running_kernels_btf_gives_offsets():
    if not os.path.exists(btf.VMLINUX):
        pytest.skip("this kernel has no BTF")
    found = btf.netns_offsets()
    assert found is not None
    parsed = btf.BTF(open(btf.VMLINUX, "rb").read())
    # The two paths agree with their steps read one by one.
    common = parsed.path(b"sock", b"__sk_common")[0]
    skc_net = parsed.path(b"sock_common", b"skc_net")[0]
    assert found.sk_net == common + skc_net + parsed.path(b"sock_common", b"skc_net", b"net")[0] - skc_net
    ns = parsed.path(b"net", b"ns")[0]
    assert found.net_inum == ns + parsed.path(b"ns_common", b"inum")[0]
    assert found.cflags() == [f"-DNETNS_SK_NET_OFF={found.sk_net}",
                              f"-DNETNS_INUM_OFF={found.net_inum}"]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_crafted_kernel_like_btf_in_either_byte_order(endian):
    assert btf.netns_offsets_from(kernel_like(endian)) == EXPECTED


def test_every_truncation_gives_none_or_the_answer_never_an_error():
    blob = kernel_like()
    for n in range(len(blob)):
        assert btf.netns_offsets_from(blob[:n]) in (None, EXPECTED)


def test_every_corrupted_byte_gives_none_or_an_answer_never_an_error():
    blob = kernel_like()
    for i in range(len(blob)):
        for value in (0x00, 0x7F, 0xFF):
            bad = bytearray(blob)
            bad[i] = value
            result = btf.netns_offsets_from(bytes(bad))
            assert result is None or isinstance(result, btf.NetnsOffsets)


@pytest.mark.parametrize("blob", [b"", b"\x9f\xeb", b"\0" * 64, b"not btf at all" * 10])
def test_not_btf_is_none(blob):
    assert btf.netns_offsets_from(blob) is None


def test_missing_member_or_bitfield_is_none():
    assert btf.netns_offsets_from(kernel_like(drop_inum=True)) is None
    assert btf.netns_offsets_from(kernel_like(inum_bitfield=True)) is None


def test_unknown_kind_is_none():
    b = Builder()
    b.int()
    b.add("int", raw_kind=31)
    assert btf.netns_offsets_from(b.blob()) is None


def test_typedef_cycle_ends():
    b = Builder()
    b.add("typedef", "loop", 2)
    b.add("typedef", "pool", 1)
    sock = b.add("struct", "sock", 8, [("__sk_common", 1, 0)])
    assert sock == 3
    assert btf.netns_offsets_from(b.blob()) is None


def test_self_nesting_anonymous_members_end():
    """A struct whose every member is itself, anonymous: nesting and the
    visit budget end the search (65535 members at each of 8 levels would
    otherwise never finish)."""
    b = Builder()
    b.add("struct", "sock", 8, [("", 1, 0)] * 65535)
    assert btf.netns_offsets_from(b.blob()) is None


def test_two_structs_of_one_name_that_disagree_are_none():
    def blob(second_offset):
        b = Builder()
        u32 = b.int()
        ns_common = b.add("struct", "ns_common", 8, [("inum", u32, 0)])
        b.add("struct", "net", 64, [("ns", ns_common, 64)])
        b.add("struct", "net", 64, [("ns", ns_common, second_offset)])
        return btf.BTF(b.blob())
    assert blob(64).path(b"net", b"ns", b"inum") == (8, btf.KIND_INT, 4)
    assert blob(128).path(b"net", b"ns", b"inum") is None


def test_vlen_past_the_section_is_none():
    b = Builder()
    b.add("struct", "sock", 8, [], vlen=60000)
    assert btf.netns_offsets_from(b.blob()) is None


def test_oversized_or_unreadable_file_is_none(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 20)
    assert btf.read_bounded(str(big), limit=4096) is None
    assert btf.netns_offsets(str(tmp_path / "missing")) is None
    small = tmp_path / "small"
    small.write_bytes(kernel_like())
    assert btf.netns_offsets(str(small)) == EXPECTED


# ------------------------------------------------ the parsed answer, cached

def _answers(cache, prefix: str) -> list:
    return [name for name in os.listdir(cache) if name.startswith(prefix + "-")]


def _no_parse(_blob):
    raise AssertionError("parsed again: the cache was not used")


def test_the_answer_is_cached_by_the_btf_contents(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "btf"
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(kernel_like())
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED
    assert oct(os.stat(cache).st_mode & 0o777) == oct(0o700)
    assert oct(os.stat(cache.parent).st_mode & 0o777) == oct(0o700)
    monkeypatch.setattr(btf, "netns_offsets_from", _no_parse)
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED
    # Another kernel's BTF is another key: parsed, and its answer replaces
    # the old one (one file in the cache).
    monkeypatch.undo()
    vmlinux.write_bytes(kernel_like(endian=">"))
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED
    assert len(_answers(cache, "netns")) == 1


def test_no_usable_btf_is_cached_as_none(tmp_path, monkeypatch):
    cache = tmp_path / "btf"
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(kernel_like(drop_inum=True))
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) is None
    monkeypatch.setattr(btf, "netns_offsets_from", _no_parse)
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) is None
    assert btf.netns_offsets_cached(str(tmp_path / "missing"), str(cache)) is None


def test_a_cache_open_to_others_or_a_bad_answer_is_not_believed(tmp_path):
    """Another user who could write the answer would choose where the
    program reads each socket's namespace: such a cache is parsed around."""
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(kernel_like())
    cache = tmp_path / "btf"
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED
    (answer,) = _answers(cache, "netns")
    (cache / answer).write_text("1 2\n")          # a planted answer
    os.chmod(cache, 0o777)
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED
    os.chmod(cache, 0o700)
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == btf.NetnsOffsets(1, 2)
    for bad in ("", "12", "a b\n", "1 2 3\n", "99999999 1\n", "\xff\xfe"):
        (cache / answer).write_text(bad, errors="surrogateescape")
        assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED, bad
    # A link in place of the answer is not followed.
    os.unlink(cache / answer)
    planted = tmp_path / "planted"
    planted.write_text("1 2\n")
    os.symlink(planted, cache / answer)
    assert btf.netns_offsets_cached(str(vmlinux), str(cache)) == EXPECTED


def test_an_unwritable_cache_still_answers(tmp_path):
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(kernel_like())
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert btf.netns_offsets_cached(str(vmlinux), str(blocker / "btf")) == EXPECTED


# ------------------------------------ the state change's fields (raw tracepoint)

def sock_like(endian="<", protocol_bits=16, drop=None, inet_sk_at=0) -> bytes:
    """struct sock_common with the tracepoint's fields (the ports and IPv4
    addresses inside anonymous unions of anonymous structs, as the kernel
    nests them), struct sock with sk_protocol, struct inet_sock beginning
    with its struct sock (or not, inet_sk_at) and holding inet_sport."""
    b = Builder(endian)
    u16 = b.int("unsigned short", 2)
    u32 = b.int()
    be16 = b.add("typedef", "__be16", u16)
    be32 = b.add("typedef", "__be32", u32)
    in6 = b.add("struct", "in6_addr", 16, [("s6_addr32", u32, 0)])
    addrs = b.add("struct", "", 8, [("skc_daddr", be32, 0), ("skc_rcv_saddr", be32, 32)])
    addrpair = b.add("union", "", 8, [("skc_addrpair", b.int("unsigned long long", 8), 0),
                                      ("", addrs, 0)])
    ports = b.add("struct", "", 4, [("skc_dport", be16, 0), ("skc_num", u16, 16)])
    portpair = b.add("union", "", 4, [("skc_portpair", u32, 0), ("", ports, 0)])
    fields = [("", addrpair, 0), ("", portpair, 12 * 8), ("skc_family", u16, 16 * 8),
              ("skc_v6_daddr", in6, 56 * 8), ("skc_v6_rcv_saddr", in6, 72 * 8)]
    fields = [f for f in fields if f[0] != drop]
    common = b.add("struct", "sock_common", 136, fields)
    if protocol_bits == 16:
        protocol = ("sk_protocol", u16, 532 * 8)
    else:       # before 5.6: an 8-bit field of a bitfield group
        protocol = ("sk_protocol", b.add("int", "unsigned char", 1,
                                         extra=struct.pack(endian + "I", protocol_bits)), 532 * 8)
    sock = b.add("struct", "sock", 800, [("__sk_common", common, 0), protocol])
    b.add("struct", "inet_sock", 900, [("sk", sock, inet_sk_at * 8), ("inet_sport", be16, 814 * 8)])
    return b.blob()


STATE_EXPECTED = btf.StateOffsets(family=16, protocol=532, sport=814, dport=12, saddr=4,
                                  daddr=0, v6_saddr=72, v6_daddr=56)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_the_state_fields_are_found_through_anonymous_unions(endian):
    assert btf.state_offsets_from(sock_like(endian)) == STATE_EXPECTED
    assert STATE_EXPECTED.cflags()[0] == "-DRAW_STATE_CHANGE"
    assert "-DSK_SPORT_OFF=814" in STATE_EXPECTED.cflags()


def test_no_state_offsets_when_a_field_is_missing_or_not_what_the_tracepoint_copies():
    # Each field missing, in turn: the program keeps the tracepoint's fields.
    for name in ("skc_family", "skc_v6_daddr", "skc_v6_rcv_saddr"):
        assert btf.state_offsets_from(sock_like(drop=name)) is None, name
    # sk_protocol as before 5.6 (8 bits of a bitfield group).
    assert btf.state_offsets_from(sock_like(protocol_bits=8)) is None
    # An inet_sock that does not begin with its sock: inet_sport would be
    # read at the wrong place from the sock pointer.
    assert btf.state_offsets_from(sock_like(inet_sk_at=8)) is None
    # Not BTF, or cut anywhere: None or the whole answer, never a crash.
    assert btf.state_offsets_from(b"\0" * 64) is None
    blob = sock_like()
    for n in range(0, len(blob), 7):
        assert btf.state_offsets_from(blob[:n]) in (None, STATE_EXPECTED)


def test_the_running_kernels_btf_gives_the_state_fields():
    if not os.path.exists(btf.VMLINUX):
        pytest.skip("this kernel has no BTF")
    found = btf.state_offsets_from(open(btf.VMLINUX, "rb").read())
    assert found is not None
    parsed = btf.BTF(open(btf.VMLINUX, "rb").read())
    common = parsed.path(b"sock", b"__sk_common")[0]
    assert found.family == common + parsed.path(b"sock_common", b"skc_family")[0]
    assert found.dport == common + parsed.path(b"sock_common", b"skc_dport")[0]
    assert found.daddr == common + parsed.path(b"sock_common", b"skc_daddr")[0]
    assert found.v6_daddr == common + parsed.path(b"sock_common", b"skc_v6_daddr")[0]
    assert found.sport == parsed.path(b"inet_sock", b"inet_sport")[0]
    assert parsed.path(b"sock", b"sk_protocol")[2] == 2


def test_both_answers_are_cached_and_a_planted_state_answer_is_not_believed(tmp_path,
                                                                             monkeypatch):
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(sock_like())
    cache = tmp_path / "btf"
    assert btf.offsets_cached(str(vmlinux), str(cache)) == (None, STATE_EXPECTED)
    monkeypatch.setattr(btf, "state_offsets_from", _no_parse)
    monkeypatch.setattr(btf, "netns_offsets_from", _no_parse)
    assert btf.offsets_cached(str(vmlinux), str(cache)) == (None, STATE_EXPECTED)
    monkeypatch.undo()
    (answer,) = _answers(cache, "state")
    (cache / answer).write_text("1 2 3 4 5 6 7 8\n")
    os.chmod(cache, 0o777)           # open to others: parsed around
    assert btf.offsets_cached(str(vmlinux), str(cache))[1] == STATE_EXPECTED
    os.chmod(cache, 0o700)
    assert btf.offsets_cached(str(vmlinux), str(cache))[1] == btf.StateOffsets(1, 2, 3, 4, 5,
                                                                               6, 7, 8)
    for bad in ("1 2\n", "1 2 3 4 5 6 7\n", "1 2 3 4 5 6 7 x\n", "1 2 3 4 5 6 7 99999999\n"):
        (cache / answer).write_text(bad)
        assert btf.offsets_cached(str(vmlinux), str(cache))[1] == STATE_EXPECTED, bad
