import os

import pytest

from closewait_trace import kernel_headers as kh
from closewait_trace.errors import UserError


def make_debian_split(src):
    common = src / "linux-headers-6.1.0-9-common"
    arch = src / "linux-headers-6.1.0-9-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("/* common */")
    (common / "include/linux/types.h").write_text("/* common types */")
    (common / "arch/x86/include/asm").mkdir(parents=True)
    (common / "arch/x86/include/asm/x.h").write_text("/* asm */")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "include/generated/autoconf.h").write_text("#define CONFIG_X 1")
    (arch / "include/linux").mkdir(parents=True)
    (arch / "include/linux/types.h").write_text("/* arch override */")
    (arch / "Makefile").write_text(f"include {common}/Makefile\n")
    (common / "Makefile").write_text("")
    kbuild = src / "kbuild-scripts"
    kbuild.mkdir()
    os.symlink("../kbuild-scripts", arch / "scripts")
    return arch, common


def test_running_kernel_headers_win(tmp_path):
    build = tmp_path / "lm/6.18.0/build"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/linux").mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("")
    (build / "include/linux/kconfig.h").write_text("")
    choice = kh.choose_headers(release="6.18.0", lib_modules=str(tmp_path / "lm"),
                               usr_src=str(tmp_path / "src"), environ={}, machine="x86_64")
    assert choice.kind == "running" and choice.path is None


def test_env_override_is_respected(tmp_path):
    choice = kh.choose_headers(release="x", lib_modules=str(tmp_path), usr_src=str(tmp_path),
                               environ={"BCC_KERNEL_SOURCE": "/opt/k"})
    assert choice.kind == "env" and choice.path == "/opt/k"


def test_generic_debian_split_is_merged_into_private_cache(tmp_path):
    src = tmp_path / "src"
    arch, common = make_debian_split(src)
    cache = tmp_path / "cache" / "kernel-headers"
    choice = kh.choose_headers(release="6.18.44-custom", lib_modules=str(tmp_path / "lm"),
                               usr_src=str(src), cache_dir=str(cache), machine="x86_64",
                               environ={})
    assert choice.kind == "generic"
    tree = choice.path
    assert tree.startswith(str(cache))
    assert open(os.path.join(tree, "include/linux/kconfig.h")).read() == "/* common */"
    assert open(os.path.join(tree, "include/linux/types.h")).read() == "/* arch override */"
    assert os.path.isfile(os.path.join(tree, "arch/x86/include/asm/x.h"))
    assert os.path.realpath(os.path.join(tree, "scripts")) == str(src / "kbuild-scripts")
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    # Second call reuses the tree as is.
    stamp = os.path.join(tree, ".closewait-trace-complete")
    before = os.stat(stamp).st_mtime_ns
    again = kh.choose_headers(release="6.18.44-custom", lib_modules=str(tmp_path / "lm"),
                              usr_src=str(src), cache_dir=str(cache), machine="x86_64",
                              environ={})
    assert again.path == tree and os.stat(stamp).st_mtime_ns == before


def test_cache_writable_by_others_is_refused(tmp_path):
    src = tmp_path / "src"
    make_debian_split(src)
    cache = tmp_path / "cache" / "kernel-headers"
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with pytest.raises(UserError):
        kh.merged_tree(str(src / "linux-headers-6.1.0-9-amd64"), str(cache))
