"""procimage.ProcessImage._held: the file behind a descriptor is believed
to be a mapping's only when it is that very file (device and inode as the
kernel holds them; a btrfs subvolume's own device matched through the
descriptor's mount)."""

import os

from closewait_trace.evidence import procimage
from closewait_trace.evidence.procimage import ProcessImage


def _exe_mapping(image):
    exe = os.path.realpath("/proc/self/exe")
    return next(m for m in image.maps if m.path == exe)


def test_the_mapping_s_own_file_is_held_and_another_is_not(monkeypatch):
    image = ProcessImage(os.getpid())
    try:
        m = _exe_mapping(image)
        fd = os.open(m.path, os.O_PATH)
        path = image._held(fd, m)
        assert path == f"/proc/self/fd/{fd}"
        assert os.stat(path).st_ino == m.inode
        other = os.open("/proc/self/status", os.O_PATH)     # another file
        assert image._held(other, m) is None
        try:
            os.fstat(other)
            raise AssertionError("a refused descriptor was left open")
        except OSError:
            pass
        # btrfs: statx says a subvolume's device, not the one maps says;
        # the descriptor's mount (of the mapping's device) decides.
        real = procimage._cached_identity
        dev, ino, mount = real(os.open(m.path, os.O_PATH))
        monkeypatch.setattr(procimage, "_cached_identity", lambda fd: ("0:4242", ino, mount))
        assert image._held(os.open(m.path, os.O_PATH), m) is not None
        # The same inode number on another mount (a FUSE server chooses its
        # inode numbers): refused.
        monkeypatch.setattr(procimage, "_cached_identity", lambda fd: ("0:4242", ino, 1 << 40))
        assert image._held(os.open(m.path, os.O_PATH), m) is None
        monkeypatch.setattr(procimage, "_cached_identity", lambda fd: None)   # no statx
        assert image._held(os.open(m.path, os.O_PATH), m) is None
    finally:
        image.close()
