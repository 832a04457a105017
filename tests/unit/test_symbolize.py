"""The symbolizer against ELF files built here, and its parsers (no root)."""

import os
import shutil
import subprocess

import pytest

from closewait_trace.evidence import elfindex, procimage, symbolize
from closewait_trace.sockets import identity

SOURCE = os.path.join(os.path.dirname(__file__), "..", "kernel", "data", "hold_socket.c")
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and os.environ.get("CI") != "true",
                                reason="needs gcc (installed by scripts/setup.sh)")


def nm(binary):
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (l.split() for l in out.splitlines())
            if len(parts) == 3}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("elf")
    pie = d / "pie"
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-o", str(pie), SOURCE], check=True)
    nopie = d / "nopie"
    subprocess.run(["gcc", "-O0", "-no-pie", "-o", str(nopie), SOURCE], check=True)
    return pie, nopie


def test_symbols_and_offsets(built):
    for binary in built:
        elfindex.CACHE.clear()
        info, _ = elfindex.load(str(binary))
        addr = nm(binary)["hold_socket_forever"]
        assert info.symbols_from == "symtab" and len(info.build_id) == 40
        assert info.symbol(addr) == ("hold_socket_forever", 0)
        assert info.symbol(addr + 3) == ("hold_socket_forever", 3)
        assert info.fde_for(addr) is not None         # .eh_frame covers it


def test_pie_load_bias_through_maps(built):
    pie = built[0]
    info, _ = elfindex.load(str(pie))
    text_vaddr, text_off, _ = [l for l in info.loads if l[1] > 0][0]
    base = 0x5555_5555_4000
    maps = procimage.parse_maps(
        f"{base:x}-{base + 0x1000:x} r--p 00000000 08:01 42 {pie}\n"
        f"{base + text_off:x}-{base + text_off + 0x1000:x} r-xp {text_off:08x} 08:01 42 {pie}\n")
    m = maps[1]
    addr = nm(pie)["hold_socket_forever"]
    runtime_pc = base + addr + 5          # what a PIE at this base would run
    vaddr = info.vaddr_of_offset(runtime_pc - m.start + m.offset)
    assert info.symbol(vaddr) == ("hold_socket_forever", 5)


def test_stripped_falls_back_to_debug_file_then_dynsym(built, tmp_path):
    pie = built[0]
    stripped = tmp_path / "stripped"
    debug = tmp_path / "stripped.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(pie), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(pie)], check=True)
    info, _ = elfindex.load(str(stripped), debug_roots=(str(tmp_path / "none"),))
    assert info.symbols_from in ("dynsym", "none")
    assert info.symbol(nm(pie)["hold_socket_forever"])[0] != "hold_socket_forever"
    root = tmp_path / "dbg" / ".build-id" / info.build_id[:2]
    root.mkdir(parents=True)
    shutil.copy(debug, root / (info.build_id[2:] + ".debug"))
    elfindex.CACHE.clear()
    info, _ = elfindex.load(str(stripped), debug_roots=(str(tmp_path / "dbg"),))
    assert info.symbols_from == "debug-file"
    assert info.symbol(nm(pie)["hold_socket_forever"]) == ("hold_socket_forever", 0)


def test_not_an_elf_is_none(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\necho hi\n")
    assert elfindex.load(str(junk)) == (None, "")
    assert elfindex.load(str(tmp_path / "missing")) == (None, "")


def test_parse_maps_and_syscall_regs():
    maps = procimage.parse_maps(
        "7f0000000000-7f0000001000 r-xp 00002000 fd:00 1234 /usr/lib/x (deleted)\n"
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]\n"
        "garbage line\n")
    assert len(maps) == 2 and maps[0].deleted and maps[0].offset == 0x2000
    assert maps[1].path == "[stack]"
    text = "34 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd1000 0x7f12345678"
    assert symbolize.parse_syscall_regs(text) == (0x7ffd1000, 0x7f12345678)
    assert symbolize.parse_syscall_regs("running") == (None, None)
    assert symbolize.parse_syscall_regs("-1 0x7ffd2000 0x401000") == (0x7ffd2000, 0x401000)


@pytest.mark.parametrize("text,runtime,cid,pod,unit", [
    ("0::/system.slice/docker-" + "a" * 64 + ".scope\n", "docker", "a" * 64, None, None),
    ("12:pids:/docker/" + "b" * 64 + "\n0::/\n", "docker", "b" * 64, None, None),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_1111_2222_3333_444455556666.slice/cri-containerd-"
     + "c" * 64 + ".scope\n", "containerd", "c" * 64, "1234abcd-1111-2222-3333-444455556666", None),
    ("0::/machine.slice/libpod-" + "d" * 64 + ".scope/container\n", "podman", "d" * 64, None, None),
    ("0::/kubepods.slice/kubepods-pod0f0f0f0f_0000_1111_2222_333344445555.slice/crio-" + "e" * 64 + ".scope\n",
     "cri-o", "e" * 64, "0f0f0f0f-0000-1111-2222-333344445555", None),
    ("0::/system.slice/nginx.service\n", None, None, None, "nginx.service"),
    ("0::/user.slice/user-1000.slice/session-2.scope\n", None, None, None, None),
])
def test_parse_cgroup(text, runtime, cid, pod, unit):
    got = identity.parse_cgroup(text)
    assert (got["container"] or {}).get("runtime") == runtime
    assert (got["container"] or {}).get("id") == cid
    assert got["pod_uid"] == pod and got["unit"] == unit


def _image_with_one_mapping(tmp_path, fstype, their_userns, our_userns="user:[4026531837]"):
    proc = tmp_path / "proc"
    (proc / "7" / "ns").mkdir(parents=True)
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "7" / "maps").write_text(
        "7f0000000000-7f0000010000 r-xp 00000000 00:2a 2   /srv/o/code.bin\n")
    (proc / "7" / "mountinfo").write_text(
        f"74 70 0:42 / /srv/o rw,relatime - {fstype} {fstype} rw\n")
    os.symlink(their_userns, proc / "7" / "ns" / "user")
    os.symlink(our_userns, proc / "self" / "ns" / "user")
    image = procimage.ProcessImage(7, str(proc))
    return image, image.maps[0]


def test_mappings_on_user_served_filesystems_are_never_read(tmp_path):
    """FUSE and network filesystems are answered by someone else's process
    or server: their pages and files are never read; an overlay counts as
    local only in the tracer's own user namespace (in another, a user may
    have stacked it on a FUSE mount: seen in a fresh-eye attack)."""
    image, m = _image_with_one_mapping(tmp_path, "fuse", "user:[4026531837]")
    assert image.unreadable_reason(m) == "not read: on a fuse filesystem"
    assert image.read(m.start, 8) == b"" and image.file_of(m) is None
    image, m = _image_with_one_mapping(tmp_path / "b", "overlay", "user:[4026532999]")
    assert image.unreadable_reason(m) == procimage.UNREAD_USERNS_OVERLAY
    image, m = _image_with_one_mapping(tmp_path / "c", "overlay", "user:[4026531837]")
    assert image.unreadable_reason(m) == ""
    image, m = _image_with_one_mapping(tmp_path / "d", "ext4", "user:[4026532999]")
    assert image.unreadable_reason(m) == ""


def test_a_chrooted_process_s_files_take_their_filesystem_from_the_tracer_s_mounts(tmp_path):
    """A chroot's mountinfo lists only mounts beneath its root: a device not
    in it is looked up among the tracer's own mounts (the same numbering
    for the whole kernel), with the same rules; in neither, unknown."""
    cases = {"ext4": "", "fuse": "not read: on a fuse filesystem",
             None: procimage.UNREAD_UNKNOWN_FS}
    for i, (ours, want) in enumerate(cases.items()):
        image, m = _image_with_one_mapping(tmp_path / str(i), "ext4", "user:[4026531837]")
        proc = tmp_path / str(i) / "proc"
        (proc / "7" / "mountinfo").write_text("80 79 0:50 / / rw - tmpfs tmpfs rw\n")
        (proc / "self" / "mountinfo").write_text(
            "1 0 0:50 / / rw - tmpfs tmpfs rw\n"
            + (f"74 1 0:42 / /srv rw,relatime - {ours} /dev/vda rw\n" if ours else ""))
        image = procimage.ProcessImage(7, str(proc))
        assert image.unreadable_reason(image.maps[0]) == want, ours
